"""The training loop's GPU paths, run on every device at hand: the CPU always, CUDA where there is one.

Each test is one body with the device as a parameter (``[cpu]``, ``[cuda]``), so that a change
of an API the GPU path uses breaks CI (which has no GPU), not a GPU run months later. Covered:
the non-finite check deferred to the device (fused AdamW's ``found_inf``; no host sync inside a
step), fp16 loss scaling, the defaults each device gets, resuming at the right batch, and
evaluation through :class:`~clipvip.data.loader.DevicePrefetcher`. On the CPU the deferred check
is asked for (``auto`` takes it on CUDA only), "no host sync" means that no tensor is read from
Python inside the step (on CUDA: the sync debug mode set to error), and the prefetcher has no copy
stream. The ``[cuda]`` runs add what exists only there: the side-stream copy of pinned batches,
its batch in flight at a save, CUDA's own sync check. ``scripts/gpu_check.sh`` runs this file first.
"""
import contextlib
import os

import pytest
import torch

import clipvip
from clipvip.data.loader import DevicePrefetcher, LoaderSettings, LoaderStream
from clipvip.distributed import DistEnv
from clipvip.engine import Trainer, TrainerSettings, TrainPlan
from clipvip.engine.encode import encode_in_order
from clipvip.loss import LossOutput, LossSettings, build_loss
from tiny_models import random_text, tensor_reads, tiny_cfg, write_hf_clip

# cuBLAS reproducible from run to run (read when cuBLAS starts, so set before any CUDA work)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

BATCH, FRAMES, RES, TEXT_LEN, CLIPS = 4, 3, 32, 10, 24
ON_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: at these tiny shapes OpenMP's barriers cost more than the work (a step
    took 50x the CPU time with 2 threads on a loaded 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA device"))])
def device(request):
    return request.param


class TinyClips(torch.utils.data.Dataset):
    """Clips drawn from the item's index and seed, as the real datasets do (``dataset[(index, seed)]``).

    Reads no tensor on the host (the captions are drawn up front): on a CPU the loader runs in the
    training process, inside the steps whose host reads are counted."""

    def __init__(self):
        self.ids, self.mask = random_text(CLIPS, TEXT_LEN, seed=0)

    def __len__(self):
        return CLIPS

    def __getitem__(self, key):
        index, seed = key
        g = torch.Generator().manual_seed(index * 1000 + seed % 1000)
        return {"video": torch.randn(FRAMES, 3, RES, RES, generator=g), "text_input_ids": self.ids[index],
                "text_input_mask": self.mask[index]}

    @staticmethod
    def collator(items):
        return {**torch.utils.data.default_collate(items), "num_skipped": 0}


def make_trainer(tmp_path, device, *overrides, precision="fp32", run="run"):
    """A tiny Trainer on ``device`` with the deferred non-finite check (CUDA's default; asked for,
    so that the CPU runs it too) unless ``overrides`` say otherwise."""
    folder = str(tmp_path / "clip")
    if not os.path.isdir(folder):
        write_hf_clip(folder)
    # Loader workers where their batches are pinned and copied on a side stream (CUDA); on a CPU
    # they would only add process start-ups to what the loop does.
    workers = "2" if device == "cuda" else "0"
    cfg = tiny_cfg(folder, "--output_dir", str(tmp_path / run), "--train_batch_size", str(BATCH),
                   "--n_workers", workers, "--pin_mem", "1", "--num_train_epochs", "2", "--seed", "3",
                   # large enough that one wrong batch moves the weights far more than float noise
                   "--learning_rate", "1e-3", "--nonfinite_check", "deferred", *overrides)
    torch.manual_seed(0)
    model = clipvip.build_model(cfg)
    stream = LoaderStream(TinyClips(), LoaderSettings.from_config(cfg), rank=0, world_size=1)
    plan = TrainPlan.from_config(cfg, num_examples=CLIPS, world_size=1)
    trainer = Trainer(TrainerSettings.from_config(cfg), model, build_loss(LossSettings.from_config(cfg)), stream,
                      plan, evaluate=lambda m: {}, env=DistEnv(device=f"{device}:0" if device == "cuda" else device),
                      precision=precision)
    if cfg.nonfinite_check == "deferred" and not trainer.update.deferred:
        pytest.skip(f"no fused AdamW on {device} in torch {torch.__version__}: nothing to defer")
    return trainer


def weights(trainer):
    """A copy of the weights on the CPU (``.cpu()`` alone would alias them there)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in trainer.raw_model.state_dict().items()}


def scaled_loss(trainer, factor):
    """Make the trainer's loss ``factor`` times the real one (its terms unchanged); returns the real forward."""
    real = trainer.loss_fn.forward

    def scaled(outputs, scale):
        out = real(outputs, scale)
        return LossOutput(out.total * factor, out.terms)
    trainer.loss_fn.forward = scaled
    return real


@pytest.fixture
def deterministic():
    """Kernels that give the same bits on every run (atomics-free backward), for comparing runs."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def assert_close_weights(a, b):
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key


@contextlib.contextmanager
def host_syncs_recorded(device, monkeypatch):
    """Inside: CUDA raises at a host-device sync (sync debug mode); on the CPU every read of a
    tensor from Python (what would be a sync on a GPU) is recorded in the list yielded."""
    if device != "cuda":
        with tensor_reads(monkeypatch) as reads:
            yield reads
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield []
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_defaults_per_device(tmp_path, device):
    """``auto``: the deferred check and the side-stream prefetcher on CUDA, the host check and no
    prefetcher on a CPU (where a sync costs nothing and there is no copy engine)."""
    trainer = make_trainer(tmp_path, device, "--nonfinite_check", "auto")
    assert trainer.update.deferred is (device == "cuda")
    assert isinstance(trainer.stream, DevicePrefetcher) is (device == "cuda")


def test_a_deferred_step_does_not_synchronise(tmp_path, device, monkeypatch):
    trainer = make_trainer(tmp_path, device)
    trainer.train_step()  # optimizer state, cuBLAS handles, allocator warm
    with host_syncs_recorded(device, monkeypatch) as reads:
        for _ in range(2):
            trainer.train_step()
    assert reads == []
    assert trainer.settle().finite


def test_deferred_check_and_prefetcher_give_the_host_check_weights(tmp_path, device, deterministic):
    fast = make_trainer(tmp_path, device, run="fast")
    plain = make_trainer(tmp_path, device, "--nonfinite_check", "step", "--prefetch_to_device", "0", run="plain")
    assert not plain.update.deferred and not isinstance(plain.stream, DevicePrefetcher)
    for trainer in (fast, plain):
        for _ in range(4):
            trainer.train_step()
    fast.settle()
    assert fast.progress.nonfinite_steps == plain.progress.nonfinite_steps == 0
    assert_close_weights(weights(fast), weights(plain))


def test_nonfinite_steps_are_skipped_on_the_device(tmp_path, device):
    trainer = make_trainer(tmp_path, device)
    trainer.train_step()
    trainer.settle()
    before = weights(trainer)
    scaled_loss(trainer, float("nan"))
    for _ in range(3):
        trainer.train_step()
    after = weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer.settle()
    assert trainer.progress.nonfinite_steps == 3 and trainer.nonfinite_in_a_row == 3


def test_fp16_overflow_lowers_the_scale_and_is_not_counted(tmp_path, device):
    trainer = make_trainer(tmp_path, device, precision="fp16")
    real_loss = scaled_loss(trainer, 1e34)  # finite, but its scaled gradient overflows fp16
    before = weights(trainer)
    trainer.train_step()
    trainer.settle()
    assert trainer.progress.scale_overflow_steps == 1 and trainer.progress.nonfinite_steps == 0
    assert trainer.scaler.get_scale() < 65536.0
    after = weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before if "logit_scale" not in k)
    trainer.loss_fn.forward = real_loss
    for _ in range(8):  # each overflow halves the scale until the real loss's gradient fits fp16
        trainer.train_step()
        if trainer.settle().finite:
            break
    assert trainer.progress.nonfinite_steps == 0 and trainer.scaler.get_scale() >= 2.0 ** 8
    assert not all(torch.equal(after[k], v) for k, v in weights(trainer).items())  # a step was applied


def test_resume_continues_with_the_right_batch(tmp_path, device, deterministic):
    """3 steps, save, a new trainer resumes and runs 3 more = 6 steps straight. On CUDA one batch
    is in flight on the prefetcher's copy stream when the state is saved: it must not count."""
    straight = make_trainer(tmp_path, device, run="straight")
    for _ in range(6):
        straight.train_step()
    first = make_trainer(tmp_path, device, run="resumed")
    for _ in range(3):
        first.train_step()
    first.save_state()
    second = make_trainer(tmp_path, device, run="resumed")
    assert second.resumed and second.progress.step == 3
    for _ in range(3):
        second.train_step()
    assert_close_weights(weights(straight), weights(second))


def test_evaluation_through_the_prefetcher_matches_the_plain_cpu_encoding(tmp_path, device):
    """The ordered encoder on ``device`` (batches through the prefetcher: pinned and copied on a
    side stream on CUDA) gives the features of the model called batch by batch on the CPU."""
    model = make_trainer(tmp_path, device).raw_model.eval()
    g = torch.Generator().manual_seed(5)
    batches = [{"video": torch.randn(3, FRAMES, 3, RES, RES, generator=g), "indices": torch.arange(3 * i, 3 * i + 3)}
               for i in range(4)]
    if device == "cuda":
        batches = [{**b, "video": b["video"].pin_memory()} for b in batches]
    features = encode_in_order(lambda b: model.encode_video(b["video"]), batches, 12, torch.device(device), "videos")
    assert features.device.type == device and features.shape[0] == 12
    cpu_model = model.cpu()
    with torch.no_grad():
        expected = torch.cat([cpu_model.encode_video(b["video"]) for b in batches])
    assert torch.allclose(features.cpu(), expected, atol=1e-4)
