"""Pure parts of training: schedule, parameter groups, run plan, resumable sampler, streams."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import clipvip
from clipvip.engine import TrainPlan, learning_rate_at, lr_multiplier, param_groups
from clipvip.engine.optim import OptimizerSettings, build_optimizer, set_learning_rate
from clipvip.data.loader import MixedStream, ResumableSampler
from clipvip.engine.guard import PendingUpdate
from clipvip.loss import LossOutput

from tiny_models import ListStream, tensor_reads


def original_lr(step, decay, lr, total, warmup_ratio):
    """The original get_lr_sched, written out: warmup_steps = int(ratio * total)."""
    warmup = int(warmup_ratio * total)
    if decay == "linear":
        m = step / warmup if step < warmup else max(0, (total - step) / (total - warmup))
    else:
        m = step / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
    value = lr * m
    return value if value > 0 else 1e-8


@pytest.mark.parametrize("decay", ["cosine", "linear"])
@pytest.mark.parametrize("total, ratio", [(1000, 0.01), (50, 0.1), (7, 0.0)])
def test_schedule_matches_original(decay, total, ratio):
    cfg = clipvip.load_config(None, ["--learning_rate", "1e-4", "--decay", decay, "--warmup_ratio", str(ratio)])
    for step in range(1, total + 1):
        assert learning_rate_at(step, OptimizerSettings.from_config(cfg), total) == pytest.approx(original_lr(step, decay, 1e-4, total, ratio))


def test_schedule_shape():
    assert lr_multiplier(5, 100, 0.1, "cosine") == pytest.approx(0.5)  # mid-warmup
    assert lr_multiplier(10, 100, 0.1, "cosine") == pytest.approx(1.0)  # warmup done
    assert lr_multiplier(55, 100, 0.1, "cosine") == pytest.approx(0.5)  # half-way through the decay
    assert lr_multiplier(100, 100, 0.1, "linear") == 0.0
    with pytest.raises(clipvip.ConfigError, match="unknown decay"):
        lr_multiplier(1, 10, 0.0, "step")


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(2, 2)
        self.norm = nn.LayerNorm(2)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))
        self.frozen = nn.Parameter(torch.zeros(1), requires_grad=False)


def test_param_groups_decay_and_lr_mul():
    model = Toy()
    groups = param_groups(model.named_parameters(), weight_decay=0.2, lr_mul=10, lr_mul_prefix="logit_scale")
    by_param = {id(p): g for g in groups for p in g["params"]}
    assert by_param[id(model.encoder.weight)]["weight_decay"] == 0.2
    assert by_param[id(model.norm.weight)]["weight_decay"] == 0.2  # "LayerNorm.*" matches nothing in CLIP
    assert by_param[id(model.encoder.bias)]["weight_decay"] == 0.0
    assert by_param[id(model.logit_scale)]["weight_decay"] == 0.0 and by_param[id(model.logit_scale)]["lr_scale"] == 10
    assert by_param[id(model.encoder.weight)]["lr_scale"] == 1
    assert id(model.frozen) not in by_param
    cfg = clipvip.load_config(None, ["--lr_mul", "10", "--lr_mul_prefix", "logit_scale", "--learning_rate", "1e-6"])
    optimizer = build_optimizer(model, OptimizerSettings.from_config(cfg))
    set_learning_rate(optimizer, 2e-6)
    lrs = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lrs[id(model.logit_scale)] == pytest.approx(2e-5) and lrs[id(model.encoder.weight)] == pytest.approx(2e-6)


def test_plan_follows_the_original_formulas():
    cfg = clipvip.load_config("configs/msrvtt_retrieval/msrvtt_retrieval_vip_base_32.json")
    plan = TrainPlan.from_config(cfg, num_examples=9000, world_size=8)
    assert plan.global_batch == 8 * 16
    assert plan.total_steps == math.ceil(100 * 9000 / 128)
    assert plan.valid_steps == plan.total_steps  # num_valid 1
    assert plan.steps_per_epoch == math.ceil(9000 / 128)
    assert plan.state_steps == int(0.9 * plan.total_steps)
    cfg.update(gradient_accumulation_steps=4, num_valid=3, min_valid_steps=10)
    plan = TrainPlan.from_config(cfg, num_examples=1000, world_size=2)
    assert plan.global_batch == 128 and plan.total_steps == math.ceil(100 * 1000 / 128)
    assert plan.valid_steps == math.ceil(plan.total_steps / 3 / 10) * 10


def test_sampler_shards_cover_the_epoch_and_resume():
    n, bs, world = 25, 4, 2  # 13 per rank, 3 full batches each: 24 distinct items per epoch
    samplers = [ResumableSampler(n, bs, seed=3, rank=r, world_size=world) for r in range(world)]
    for epoch in range(2):
        seen = []
        for s in samplers:
            s.set_position(epoch, 0)
            seen += [i for i, _ in s]
        assert len(seen) == world * s.batches_per_epoch * bs
        assert len(set(seen)) == len(seen)  # no item twice in one epoch
    s = samplers[0]
    s.set_position(1, 0)
    full = list(s)
    s.set_position(1, 2)
    assert list(s) == full[2 * bs:]  # starting at batch 2 gives the same items, same seeds
    s.set_position(0, 0)
    assert [i for i, _ in s] != [i for i, _ in full]  # epochs are shuffled differently


def test_sampler_pads_small_sets():
    s = ResumableSampler(3, 8, seed=0, rank=1, world_size=2)
    items = list(s)
    assert s.batches_per_epoch == 1 and len(items) == 2  # one short batch rather than none


class FakeStream:
    def __init__(self, name):
        self.name, self.epoch, self.count = name, 0, 0

    def __next__(self):
        self.count += 1
        return {"from": self.name}

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]

    num_examples = 10


def test_mixed_stream_ratio_same_on_every_rank_and_resumable():
    def make():
        return MixedStream({"a": FakeStream("a"), "b": FakeStream("b")}, {"a": 3, "b": 1}, seed=5)

    rank0, rank1 = make(), make()
    picks0 = [next(rank0)["source"] for _ in range(400)]
    picks1 = [next(rank1)["source"] for _ in range(400)]
    assert picks0 == picks1
    assert 0.65 < picks0.count("a") / 400 < 0.85
    resumed = make()
    state = rank0.state_dict()
    rank0_more = [next(rank0)["source"] for _ in range(20)]
    resumed.load_state_dict(state)
    assert [next(resumed)["source"] for _ in range(20)] == rank0_more
    with pytest.raises(ValueError):
        MixedStream({"a": FakeStream("a")}, {"a": 0}, seed=0)
    # with gradient accumulation every micro-batch of one optimizer step comes from one set
    accumulated = MixedStream({"a": FakeStream("a"), "b": FakeStream("b")}, {"a": 1, "b": 1}, seed=1, accumulation=4)
    picks = [next(accumulated)["source"] for _ in range(40)]
    assert all(len(set(picks[i:i + 4])) == 1 for i in range(0, 40, 4)) and len(set(picks)) == 2


def _tiny_trainer(tmp_path, *overrides, precision="fp32"):
    from clipvip.distributed import DistEnv
    from clipvip.loss import LossSettings, build_loss
    from clipvip.engine import Trainer, TrainerSettings
    from tiny_models import fixed_batches, tiny_cfg, write_hf_clip

    folder = str(tmp_path / "clip")
    write_hf_clip(folder)
    cfg = tiny_cfg(folder, "--output_dir", str(tmp_path / "run"), "--train_batch_size", "2", *overrides)
    torch.manual_seed(0)
    model = clipvip.build_model(cfg)
    batches = fixed_batches()
    plan = TrainPlan.from_config(cfg, num_examples=4, world_size=1)
    trainer = Trainer(TrainerSettings.from_config(cfg), model, build_loss(LossSettings.from_config(cfg)),
                      ListStream(batches), plan,
                      evaluate=lambda m: {}, env=DistEnv(), precision=precision)
    return trainer, batches


def assert_same_gradients(model, reference):
    """Equal up to float summation order: the largest difference tiny against the gradient's scale."""
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert (p.grad - q.grad).abs().max() <= 1e-4 * q.grad.abs().max() + 1e-6, name  # k_proj.bias: ~0


def test_feature_cache_accumulation_equals_one_big_batch(tmp_path):
    """Two micro-batches with cached features give the gradient of the 4-clip batch, all negatives in."""
    import copy

    trainer, batches = _tiny_trainer(tmp_path, "--gradient_accumulation_steps", "2", "--accum_feature_cache", "1")
    reference = copy.deepcopy(trainer.raw_model)
    loss = trainer.optimizer_step.backward_feature_cache(batches).total
    full = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    expected = trainer.loss_fn(reference(full["video"], full["text_input_ids"], full["text_input_mask"]),
                               reference.logit_scale).total
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_same_gradients(trainer.raw_model, reference)


def test_plain_accumulation_averages_micro_batch_losses(tmp_path):
    import copy

    trainer, batches = _tiny_trainer(tmp_path, "--gradient_accumulation_steps", "2")
    reference = copy.deepcopy(trainer.raw_model)
    loss = trainer.optimizer_step.backward_plain(batches).total
    expected = sum(trainer.loss_fn(reference(b["video"], b["text_input_ids"], b["text_input_mask"]),
                                   reference.logit_scale).total for b in batches) / 2
    expected.backward()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert_same_gradients(trainer.raw_model, reference)


def test_frozen_text_tower_gets_no_update(tmp_path):
    trainer, _ = _tiny_trainer(tmp_path, "--freeze_text_encoder", "1")
    text = {id(p) for p in trainer.raw_model.clipmodel.text_model.parameters()}
    assert all(not p.requires_grad for p in trainer.raw_model.clipmodel.text_model.parameters())
    assert not text & {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    before = {k: v.clone() for k, v in trainer.raw_model.clipmodel.text_model.state_dict().items()}
    trainer.train_step()
    after = trainer.raw_model.clipmodel.text_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_frozen_text_cache_trains_as_the_tower(tmp_path):
    """frozen_text_cache: the same training as running the frozen tower every step."""
    cached, _ = _tiny_trainer(tmp_path / "cached", "--freeze_text_encoder", "1", "--frozen_text_cache", "16")
    plain, _ = _tiny_trainer(tmp_path / "plain", "--freeze_text_encoder", "1")
    for _ in range(4):  # two fixed batches: steps 3 and 4 see known captions
        a, b = cached.train_step(), plain.train_step()
        assert a.loss.item() == pytest.approx(b.loss.item(), rel=1e-5)
    cache = cached.raw_model.text_cache
    assert plain.raw_model.text_cache is None and cache.hits == 4 and cache.misses == 4
    for (name, p), q in zip(cached.raw_model.named_parameters(), plain.raw_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_fp16_scale_overflow_is_skipped_not_counted_as_nan(tmp_path):
    trainer, _ = _tiny_trainer(tmp_path, precision="fp16")
    real_loss = trainer.loss_fn.forward
    trainer.loss_fn.forward = lambda outputs, scale: LossOutput(real_loss(outputs, scale).total * 1e34, {})  # finite, huge
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    out = trainer.train_step()  # the scaled gradient overflows fp32: GradScaler's job
    assert not out.update.finite and trainer.progress.scale_overflow_steps == 1
    assert trainer.progress.nonfinite_steps == 0 and trainer.nonfinite_in_a_row == 0
    assert trainer.scaler.get_scale() < 65536.0  # the scale went down
    after = trainer.raw_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "logit_scale" not in k)


# ----------------------------------------------------------------------------------------------
# nonfinite_check: on the host every step, or deferred to the device (train/guard.py)
# ----------------------------------------------------------------------------------------------
def _deferred_trainer(tmp_path, precision="fp32"):
    trainer, batches = _tiny_trainer(tmp_path, "--nonfinite_check", "deferred", precision=precision)
    if not trainer.update.deferred:
        pytest.skip("no fused AdamW for CPU in this torch")
    return trainer, batches


def test_deferred_check_gives_the_same_weights_as_the_host_check(tmp_path):
    host, _ = _tiny_trainer(tmp_path / "host", "--nonfinite_check", "step")
    deferred, _ = _deferred_trainer(tmp_path / "deferred")
    assert not host.update.deferred
    for trainer in (host, deferred):
        for _ in range(3):
            out = trainer.train_step()
    assert isinstance(out.update, PendingUpdate)  # deferred: nothing read on the host
    assert deferred.settle().finite and deferred.progress.nonfinite_steps == 0
    # Bit-equal: the same steps and fused AdamW kernel; only where finiteness is read differs.
    for (name, a), b in zip(host.raw_model.state_dict().items(), deferred.raw_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_deferred_check_skips_nonfinite_steps_on_the_device_and_counts_them_when_read(tmp_path):
    trainer, _ = _deferred_trainer(tmp_path)
    real_loss = trainer.loss_fn.forward
    trainer.train_step()  # a finite step first: the optimizer has state to protect
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    moments = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    trainer.loss_fn.forward = lambda outputs, scale: LossOutput(real_loss(outputs, scale).total * float("nan"), {})
    for _ in range(2):
        trainer.train_step()
    assert trainer.progress.nonfinite_steps == 0  # not read yet
    after = trainer.raw_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for key, value in trainer.optimizer.state_dict()["state"][0].items():  # step count and moments too
        assert torch.equal(value, moments[key]), key
    read = trainer.settle()
    assert read.finite is False and math.isnan(read.loss)
    assert trainer.progress.nonfinite_steps == 3 - 1 and trainer.nonfinite_in_a_row == 2
    assert trainer.longest_nonfinite_run == 2
    assert trainer.settle() is None  # nothing new since
    trainer.loss_fn.forward = real_loss
    trainer.train_step()
    assert trainer.settle().finite and trainer.nonfinite_in_a_row == 0
    assert trainer.progress.nonfinite_steps == 2
    assert not all(torch.equal(before[k], v) for k, v in trainer.raw_model.state_dict().items())


def test_deferred_fp16_overflow_is_skipped_not_counted_as_nan(tmp_path):
    trainer, _ = _deferred_trainer(tmp_path, precision="fp16")
    real_loss = trainer.loss_fn.forward
    trainer.loss_fn.forward = lambda outputs, scale: LossOutput(real_loss(outputs, scale).total * 1e34, {})  # finite, huge
    before = {k: v.clone() for k, v in trainer.raw_model.state_dict().items()}
    trainer.train_step()
    assert trainer.scaler.get_scale() < 65536.0  # the scale went down
    assert trainer.settle().finite is False
    assert trainer.progress.scale_overflow_steps == 1 and trainer.progress.nonfinite_steps == 0
    after = trainer.raw_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if "logit_scale" not in k)


def test_nonfinite_check_is_resolved_by_device_and_optimizer(tmp_path):
    from clipvip.errors import ConfigError
    from clipvip.engine.guard import resolve_nonfinite_check

    fused = torch.optim.AdamW([nn.Parameter(torch.ones(2))], fused=True)
    plain = torch.optim.Adamax([nn.Parameter(torch.ones(2))])
    assert resolve_nonfinite_check("auto", "cuda", fused) == "deferred"
    assert resolve_nonfinite_check("auto", "cpu", fused) == "step"
    assert resolve_nonfinite_check("auto", "cuda", plain) == "step"
    assert resolve_nonfinite_check("deferred", "cpu", fused) == "deferred"
    assert resolve_nonfinite_check("deferred", "cuda", plain) == "step"  # with a warning
    with pytest.raises(ConfigError, match="nonfinite_check 'sometimes'"):
        resolve_nonfinite_check("sometimes", "cpu", fused)


def test_a_deferred_step_reads_no_tensor_on_the_host(tmp_path, monkeypatch):
    """What would be a host-device sync on a GPU (item, tolist, bool/int/float of a tensor) does
    not happen inside a deferred step, model and loss included; settle() is where it happens."""
    trainer, _ = _deferred_trainer(tmp_path)
    trainer.train_step()  # first step: optimizer state created
    with tensor_reads(monkeypatch) as reads:
        trainer.train_step()
        assert reads == []
        trainer.settle()
        assert reads  # the check: the reading happens here


def test_device_prefetcher_copies_one_batch_ahead_and_keeps_the_resume_position(monkeypatch):
    """The CUDA path's order and bookkeeping, with the CUDA stream calls replaced by a recorder."""
    import contextlib

    from clipvip.data.loader import DevicePrefetcher

    events = []

    class RecordingStream(ListStream):
        def __next__(self):
            events.append(f"fetch {self.taken}")
            return super().__next__()

    class ComputeStream:
        def wait_stream(self, other):
            events.append("wait")

    batches = [{"video": torch.full((1,), float(i)), "num_skipped": torch.tensor(0)} for i in range(10)]
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ComputeStream())
    inner = RecordingStream(batches)
    prefetcher = DevicePrefetcher(inner, "cpu", ("video",))
    prefetcher.copy_stream = object()  # take the prefetching path without a GPU
    got = [next(prefetcher)["video"].item() for _ in range(3)]
    assert got == [0.0, 1.0, 2.0]
    # each batch's copy is waited for before the next one is queued, one batch ahead
    assert events == ["fetch 0", "wait", "fetch 1", "wait", "fetch 2", "wait", "fetch 3"]
    assert inner.taken == 4 and prefetcher.state_dict() == {"taken": 3}  # the one in flight is not counted
    prefetcher.load_state_dict(prefetcher.state_dict())  # resume: batch 3 is read again
    assert next(prefetcher)["video"].item() == 3.0
    assert prefetcher.state_dict() == {"taken": 4}


def test_device_prefetcher_hands_out_the_last_batch_of_a_finite_loader(monkeypatch):
    import contextlib

    from clipvip.data.loader import DevicePrefetcher

    class ComputeStream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ComputeStream())
    for n in (0, 1, 3):
        prefetcher = DevicePrefetcher([{"video": torch.full((1,), float(i))} for i in range(n)], "cpu", ("video",))
        prefetcher.copy_stream = object()
        assert [b["video"].item() for b in prefetcher] == [float(i) for i in range(n)]
        with pytest.raises(StopIteration):
            next(prefetcher)


def test_device_prefetcher_on_a_cpu_moves_when_handed_out():
    from clipvip.data.loader import DevicePrefetcher

    inner = ListStream([{"video": torch.ones(1)}, {"video": torch.zeros(1)}])
    prefetcher = DevicePrefetcher(inner, "cpu", ("video",))
    assert prefetcher.copy_stream is None
    assert next(prefetcher)["video"].item() == 1.0 and prefetcher.state_dict() == {"taken": 1}
