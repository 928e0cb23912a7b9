"""Training from WebDataset shards through the retrieval app: 2 gloo processes x 2 workers, kill -9, torchrun restarts."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from clipvip.data.shard_index import ShardInfo, write_index
from shard_helpers import synthetic_samples, write_shards
from tiny_models import write_hf_clip

N_TRAIN, BATCH, EPOCHS = 32, 4, 10
WORKER = os.path.join(os.path.dirname(__file__), "shard_train_worker.py")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CLIPVIP_LOG_LEVEL": "WARNING",
       "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    from clipvip.apps import synthetic

    root = tmp_path_factory.mktemp("shard_training")
    paths = synthetic.generate(str(root / "data"), n_train=N_TRAIN, n_test=8, seed=1, size=32, frames=8,
                               n_pretrain_videos=1, clips_per_video=1, frame_folders=False, workers=1)
    shards = write_shards(str(root / "shards"), synthetic_samples(paths), [4] * 8)
    write_index(str(root / "shards" / "shards.json"), [ShardInfo(p, 4) for p in shards])
    clip = str(root / "clip")
    write_hf_clip(clip, vocab_size=49408, max_positions=32)
    config = {
        "train_datasets": {"name": "synthetic-shards", "vis_format": "webdataset",
                           "shards": str(root / "shards" / "{00000..00007}.tar"), "text_field": "captions",
                           "shuffle_buffer": 3},
        "inference_datasets": [{"name": "synthetic-test", "txt": paths["test"], "vis": paths["videos"]}],
        "train_num_frms": 4, "test_num_frms": 4, "input_res": [32, 32], "max_txt_len": 24,
        "clip_config": clip, "clip_weights": clip,
        "clip_vision_additional_config": {"type": "ViP", "temporal_size": 4, "add_cls_num": 3,
                                          "logit_scale_init_value": 2.3},
        "train_batch_size": BATCH, "test_batch_size": 8, "n_workers": 2, "pin_mem": 0, "fp16": 0,
        "learning_rate": 5e-3, "weight_decay": 0.01, "warmup_ratio": 0.05, "num_train_epochs": EPOCHS,
        "num_valid": 1, "only_valid_steps": 1000, "save_steps_ratio": 0.1, "log_interval": 2, "seed": 0,
    }
    path = str(root / "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return {"root": root, "config": path}


def launch(bench, out, nproc, *, max_restarts=0, extra=()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", WORKER, os.path.join(out, "ids"), "retrieval", "--config", bench["config"],
           "--is_train", "--output_dir", out, *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=400):
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]


def weights(out, step):
    return torch.load(os.path.join(out, "ckpt", f"model_step_{step}.pt"), weights_only=True)


def assert_same_weights(a, b):
    """Bit-equal: the same run resumed, with the same processes, batches and kernels."""
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


TOTAL = EPOCHS * N_TRAIN // (2 * BATCH)  # optimizer steps of the 2-process runs


@pytest.fixture(scope="module")
def two_process_run(bench):
    out = str(bench["root"] / "run2")
    finish(launch(bench, out, 2))
    return out


def records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_two_processes_two_workers_see_every_sample_once_per_epoch_and_learn(two_process_run):
    out = two_process_run
    per_epoch: dict[int, Counter] = {}
    steps = Counter()
    for rank in (0, 1):
        for r in records(os.path.join(out, "ids", f"rank{rank}.jsonl")):
            per_epoch.setdefault(r["epoch"], Counter()).update(r["ids"])
            steps[rank] += 1
    assert steps[0] == steps[1] == TOTAL  # equal steps on both ranks, no hang at the epoch ends
    assert sorted(per_epoch) == list(range(EPOCHS))
    for epoch, seen in per_epoch.items():
        assert sorted(seen) == list(range(N_TRAIN)) and set(seen.values()) == {1}, epoch
    losses = [r["loss"] for r in records(os.path.join(out, "log", "metrics.jsonl")) if "loss" in r]
    assert len(losses) >= 5 and losses[-1] < 0.8 * losses[0], losses


def _state_step(path):
    try:
        return torch.load(path, weights_only=True)["progress"]["step"]
    except Exception:  # not there yet, or being replaced
        return -1


def _wait_for_state(out, proc, step, timeout=300):
    state = os.path.join(out, "ckpt", "train_state.pt")
    deadline = time.time() + timeout
    while _state_step(state) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    return _state_step(state)


def test_torchrun_restarts_a_killed_process_and_resumes_to_the_same_weights(bench, two_process_run):
    out = str(bench["root"] / "restarted")
    proc = launch(bench, out, 2, max_restarts=1)
    at = _wait_for_state(out, proc, 12)
    assert 0 < at < TOTAL and proc.poll() is None, "the run ended before a process could be killed"
    with open(os.path.join(out, "ids", "pid1.0")) as f:
        os.kill(int(f.read()), signal.SIGKILL)  # one training process dies; torchrun restarts the group
    finish(proc)
    assert glob.glob(os.path.join(out, "ids", "pid1.1")), "the group was not restarted"
    assert_same_weights(weights(two_process_run, TOTAL), weights(out, TOTAL))


def test_kill_9_then_rerun_gives_the_uninterrupted_weights(bench):
    single = [f"--num_train_epochs", "4"]  # one process: 8 steps per epoch
    total = 4 * N_TRAIN // BATCH
    full = str(bench["root"] / "single")
    finish(launch(bench, full, 1, extra=single))
    out = str(bench["root"] / "killed")
    proc = launch(bench, out, 1, extra=single)
    at = _wait_for_state(out, proc, 10)
    proc.send_signal(signal.SIGKILL)  # torchrun itself: the whole job is gone
    proc.wait()
    for pid_file in glob.glob(os.path.join(out, "ids", "pid*")):
        try:
            os.kill(int(open(pid_file).read()), signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert 0 < at < total, at
    finish(launch(bench, out, 1, extra=single))  # the same command again
    assert_same_weights(weights(full, total), weights(out, total))
    ids = records(os.path.join(out, "ids", "rank0.jsonl"))
    assert ids[-1]["epoch"] == 3


def test_pretraining_and_fine_tuning_read_what_clipvip_shard_writes(tmp_path):
    """`clipvip shard` packs the synthetic HD-VILA set and a retrieval set; both apps train from the output
    (subtitle + auxiliary caption + middle frame for the OCL loss; captions list for fine-tuning)."""
    from clipvip.apps import synthetic

    paths = synthetic.generate(str(tmp_path / "data"), n_train=8, n_test=4, seed=2, size=32, frames=8,
                               n_pretrain_videos=4, clips_per_video=2, frame_folders=False, workers=1)
    clip = str(tmp_path / "clip")
    write_hf_clip(clip, vocab_size=49408, max_positions=32)
    pack = [sys.executable, "-m", "clipvip", "shard", "--samples_per_shard", "4", "--no_progress"]
    for args in (["--out", str(tmp_path / "pt"), "--kind", "pretrain", "--txt", paths["pretrain_subtitles"],
                  "--vis", paths["pretrain_videos"], "--vid_cap_path", paths["pretrain_captions"]],
                 ["--out", str(tmp_path / "ft"), "--txt", paths["train"], "--vis", paths["videos"]]):
        result = subprocess.run(pack + args, capture_output=True, text=True, env=ENV, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    common = {"val_datasets": [{"name": "synthetic-test", "txt": paths["test"], "vis": paths["videos"]}],
              "train_num_frms": 4, "test_num_frms": 4, "input_res": [32, 32], "max_txt_len": 32,
              "clip_config": clip, "clip_weights": clip, "train_batch_size": 2, "test_batch_size": 4,
              "n_workers": 1, "pin_mem": 0, "num_train_epochs": 2, "num_valid": 1, "seed": 0,
              "clip_vision_additional_config": {"type": "ViP", "temporal_size": 4, "add_cls_num": 3}}
    runs = {
        "pretrain": {**common, "loss_config": {"loss_name": "NCELearnableTempLoss_vsc_fc", "if_gather": 1},
                     "train_datasets": [{"name": "hdvila-shards", "vis_format": "webdataset",
                                         "shards": str(tmp_path / "pt" / "*.tar"), "text_field": "txt",
                                         "caption_field": "caption", "vid_txt": "subtitle"}]},
        "retrieval": {**common, "inference_datasets": common["val_datasets"],
                      "train_datasets": {"name": "ft-shards", "vis_format": "webdataset",
                                         "shards": str(tmp_path / "ft" / "{00000..00001}.tar"),
                                         "text_field": "captions"}},
    }
    for app, cfg in runs.items():
        path = tmp_path / f"{app}.json"
        path.write_text(json.dumps(cfg))
        out = str(tmp_path / f"run_{app}")
        result = subprocess.run([sys.executable, "-m", "clipvip", app, "--config", str(path), "--is_train",
                                 "--output_dir", out], capture_output=True, text=True, env=ENV, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        losses = [r for r in records(os.path.join(out, "log", "metrics.jsonl")) if "loss" in r]
        assert losses and all(r["skipped_samples"] == 0 for r in losses if "skipped_samples" in r), losses
        assert os.path.isfile(os.path.join(out, "ckpt", "train_state.pt"))
