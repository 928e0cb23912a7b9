"""The training loop's CUDA-only paths, on a real GPU (skipped without one; CI has none).

What the CPU tests reach only through stand-ins: the non-finite check deferred to the device
(fused AdamW's ``found_inf``, no host sync inside a step, checked with CUDA's sync debug mode),
fp16 loss scaling, the side-stream :class:`~clipvip.data.loader.DevicePrefetcher` with pinned
batches and its resume position, and evaluation through the prefetcher.
``scripts/gpu_check.sh`` runs this file first.
"""
import os

import pytest
import torch

import clipvip
from clipvip.data.loader import DevicePrefetcher, LoaderSettings, LoaderStream
from clipvip.distributed import DistEnv
from clipvip.loss import LossSettings, build_loss
from clipvip.engine import Trainer, TrainerSettings, TrainPlan
from tiny_models import random_text, tiny_cfg, write_hf_clip

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# cuBLAS reproducible from run to run (read when cuBLAS starts, so set before any CUDA work)
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

BATCH, FRAMES, RES, TEXT_LEN, CLIPS = 4, 3, 32, 10, 24


class TinyClips(torch.utils.data.Dataset):
    """Clips drawn from the item's index and seed, as the real datasets do (``dataset[(index, seed)]``)."""

    def __len__(self):
        return CLIPS

    def __getitem__(self, key):
        index, seed = key
        g = torch.Generator().manual_seed(index * 1000 + seed % 1000)
        ids, mask = random_text(1, TEXT_LEN, seed=index)
        return {"video": torch.randn(FRAMES, 3, RES, RES, generator=g), "text_input_ids": ids[0],
                "text_input_mask": mask[0]}

    @staticmethod
    def collator(items):
        return {**torch.utils.data.default_collate(items), "num_skipped": 0}


def make_trainer(tmp_path, *overrides, precision="fp32", run="run"):
    folder = str(tmp_path / "clip")
    if not os.path.isdir(folder):
        write_hf_clip(folder)
    cfg = tiny_cfg(folder, "--output_dir", str(tmp_path / run), "--train_batch_size", str(BATCH),
                   "--n_workers", "2", "--pin_mem", "1", "--num_train_epochs", "2", "--seed", "3",
                   # large enough that one wrong batch moves the weights far more than float noise
                   "--learning_rate", "1e-3", *overrides)
    torch.manual_seed(0)
    model = clipvip.build_model(cfg)
    stream = LoaderStream(TinyClips(), LoaderSettings.from_config(cfg), rank=0, world_size=1)
    plan = TrainPlan.from_config(cfg, num_examples=CLIPS, world_size=1)
    trainer = Trainer(TrainerSettings.from_config(cfg), model, build_loss(LossSettings.from_config(cfg)), stream,
                      plan, evaluate=lambda m: {},
                      env=DistEnv(device="cuda:0"), precision=precision)
    return trainer


def weights(trainer):
    return {k: v.detach().cpu() for k, v in trainer.raw_model.state_dict().items()}


@pytest.fixture
def deterministic():
    """Kernels that give the same bits on every run (atomics-free backward), for comparing runs."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(False)


def assert_close_weights(a, b):
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), key


def test_defaults_on_cuda_are_the_deferred_check_and_the_prefetcher(tmp_path):
    trainer = make_trainer(tmp_path)
    assert trainer.update.deferred and isinstance(trainer.stream, DevicePrefetcher)


def test_a_deferred_step_does_not_synchronise(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_step()  # optimizer state, cuBLAS handles, allocator warm
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            trainer.train_step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert trainer.settle().finite


def test_deferred_check_and_prefetcher_give_the_host_check_weights(tmp_path, deterministic):
    fast = make_trainer(tmp_path, run="fast")
    plain = make_trainer(tmp_path, "--nonfinite_check", "step", "--prefetch_to_device", "0", run="plain")
    assert not plain.update.deferred and not isinstance(plain.stream, DevicePrefetcher)
    for trainer in (fast, plain):
        for _ in range(4):
            trainer.train_step()
    assert_close_weights(weights(fast), weights(plain))


def test_nonfinite_steps_are_skipped_on_the_device(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.train_step()
    trainer.settle()
    before = weights(trainer)
    real_loss = trainer.loss_fn.forward
    trainer.loss_fn.forward = lambda outputs, scale: real_loss(outputs, scale) * float("nan")
    for _ in range(3):
        trainer.train_step()
    after = weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)
    trainer.settle()
    assert trainer.progress.nonfinite_steps == 3 and trainer.nonfinite_in_a_row == 3


def test_fp16_overflow_lowers_the_scale_and_is_not_counted(tmp_path):
    trainer = make_trainer(tmp_path, precision="fp16")
    real_loss = trainer.loss_fn.forward
    trainer.loss_fn.forward = lambda outputs, scale: real_loss(outputs, scale) * 1e34
    before = weights(trainer)
    trainer.train_step()
    trainer.settle()
    assert trainer.progress.scale_overflow_steps == 1 and trainer.progress.nonfinite_steps == 0
    assert trainer.scaler.get_scale() < 65536.0
    after = weights(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before if "logit_scale" not in k)
    trainer.loss_fn.forward = real_loss
    trainer.train_step()
    assert trainer.settle().finite


def test_resume_with_the_prefetcher_continues_with_the_right_batch(tmp_path, deterministic):
    """3 steps, save, a new trainer resumes and runs 3 more = 6 steps straight."""
    straight = make_trainer(tmp_path, run="straight")
    for _ in range(6):
        straight.train_step()
    first = make_trainer(tmp_path, run="resumed")
    for _ in range(3):
        first.train_step()
    first.save_state()  # one batch is in flight on the copy stream: not counted
    second = make_trainer(tmp_path, run="resumed")
    assert second.resumed and second.progress.step == 3
    for _ in range(3):
        second.train_step()
    assert_close_weights(weights(straight), weights(second))


def test_evaluation_through_the_prefetcher_matches_the_cpu(tmp_path):
    from clipvip.engine.evaluate import encode_in_order

    trainer = make_trainer(tmp_path)
    model = trainer.raw_model.eval()
    g = torch.Generator().manual_seed(5)
    batches = [{"video": torch.randn(3, FRAMES, 3, RES, RES, generator=g).pin_memory(),
                "indices": torch.arange(3 * i, 3 * i + 3)} for i in range(4)]
    gpu = encode_in_order(lambda b: model.encode_video(b["video"]), batches, 12, torch.device("cuda:0"), "videos")
    cpu_model = model.cpu()
    cpu = encode_in_order(lambda b: cpu_model.encode_video(b["video"]), batches, 12, torch.device("cpu"), "videos")
    assert gpu.device.type == "cuda"
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-4)
