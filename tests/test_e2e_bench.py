"""``python -m clipvip bench --mode e2e``: the training app's own loop timed on data, against the same
loop on a batch held in memory. Tiny model and clips; what is checked is that the app's Trainer ran
the steps asked for, that the report's numbers are consistent with each other and that the
loader's CPU time is found where it is spent (worker processes, or this process), never a speed."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import CLIPConfig

from clipvip.apps import bench, e2e_bench
from clipvip.data.video import available_backends
from clipvip.errors import ConfigError
from conftest import write_clip
from shard_helpers import write_shards

pytestmark = pytest.mark.skipif("pyav" not in available_backends(), reason="PyAV is required")

OFFICIAL = os.path.join(os.path.dirname(__file__), "..", "configs", "msrvtt_retrieval",
                        "msrvtt_retrieval_vip_base_32.json")


def tiny_clip_folder(folder) -> str:
    """A 1-layer CLIP of width 32 for 32-pixel frames, config.json only (docs/first-run.md)."""
    CLIPConfig(projection_dim=16,
               text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, max_position_embeddings=16, hidden_act="quick_gelu",
                                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
               vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=32, patch_size=16, hidden_act="quick_gelu"),
               ).save_pretrained(str(folder))
    return str(folder)


def tiny_overrides(tmp_path, workers: int) -> list[str]:
    """The official B/32 config as gpu_check runs it, shrunk: random init, tiny CLIP, 2 frames of 32 px."""
    return ["--config", OFFICIAL, "--e2e_weights_path", "none", "--clip_weights", "none",
            "--clip_config", tiny_clip_folder(tmp_path / "clip"), "--input_res", "32", "--max_txt_len", "16",
            "--train_num_frms", "2", "--train_batch_size", "2", "--n_workers", str(workers), "--video_backend", "pyav"]


def metrics_steps(path) -> list[int]:
    with open(path) as f:
        return [json.loads(line)["step"] for line in f]


def check_consistent(report, batch: int, steps: int) -> None:
    e2e, model_only = report["results"]["e2e"], report["results"]["model_only"]
    for phase in (e2e, model_only):
        assert phase["clips_per_s"] > 0
        assert phase["clips_per_s"] == pytest.approx(batch / phase["ms_per_step"] * 1e3, rel=1e-2)
        assert phase["device_busy_clock"].startswith("host")  # no GPU here
    assert 0 <= e2e["wait_share"] <= 1
    assert e2e["wait_ms_per_step"] == pytest.approx(e2e["wait_share"] * e2e["ms_per_step"], rel=1e-2, abs=0.02)
    assert e2e["device_busy_share"] == pytest.approx(1 - e2e["wait_share"], abs=1e-3)
    assert "wait_share" not in model_only and "loader_cpu_ms_per_clip" not in model_only
    assert report["e2e_vs_model_only"] == pytest.approx(e2e["clips_per_s"] / model_only["clips_per_s"], rel=1e-3)
    assert report["cores_to_feed_model_only"] == pytest.approx(
        model_only["clips_per_s"] * e2e["loader_cpu_ms_per_clip"] / 1e3, rel=1e-2, abs=0.01)
    assert report["settings"]["steps"] == steps and report["settings"]["batch"] == batch


def test_e2e_times_the_apps_trainer_on_loose_files_with_workers(tmp_path):
    videos = tmp_path / "videos"
    for i in range(3):
        write_clip(videos / f"v{i}.mp4", n_frames=8, size=64, seed=i)
    work = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "clipvip", "bench", "--mode", "e2e", "--videos", str(videos), "--steps", "3",
         "--warmup", "1", "--threads", "1", "--dir", str(work), *tiny_overrides(tmp_path, workers=1)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    check_consistent(report, batch=2, steps=3)
    e2e = report["results"]["e2e"]
    assert e2e["loader_cpu_source"] == "1 worker process"
    assert e2e["loader_cpu_ms_per_clip"] == e2e["worker_cpu_ms_per_clip"] >= 0
    assert report["settings"]["n_workers"] == 1 and report["settings"]["video_backend"] == "pyav"
    assert report["machine"]["cpu"] and report["settings"]["device"] == "cpu"

    # The app's Trainer ran warmup + steps + 1 optimizer steps in each phase, in its own run folder,
    # logging as a run does; no model checkpoint (nothing is validated).
    for phase in ("e2e", "model_only"):
        run = work / "run" / phase
        assert max(metrics_steps(run / "log" / "metrics.jsonl")) == 5
        assert os.listdir(run / "ckpt") == ["train_state.pt"]
    # The three files cycled to enough clips for the run: 5 steps of 2, and the batch read ahead.
    data = report["settings"]["data"]
    assert data["files"] == 3 and data["clips"] == 12
    with open(data["train_dataset"]["txt"]) as f:
        ids = [json.loads(line)["clip_id"] for line in f]
    assert len(ids) == 12
    targets = [os.path.realpath(os.path.join(data["train_dataset"]["vis"], i + ".mp4")) for i in ids]
    assert targets[:3] == [os.path.realpath(videos / f"v{i}.mp4") for i in range(3)] and targets[3:6] == targets[:3]


def test_e2e_on_shards_without_workers_counts_this_process(tmp_path, capsys):
    clips = [write_clip(tmp_path / "clips" / f"s{i}.mp4", n_frames=8, size=64, seed=i) for i in range(8)]
    samples = [{"clip_id": f"s{i}", "video": p, "captions": [f"clip {i}"]} for i, p in enumerate(clips)]
    shard = write_shards(str(tmp_path / "shards"), samples, [8])[0]
    entry = json.dumps({"name": "sh", "vis_format": "webdataset", "shards": shard, "shuffle_buffer": 4})
    assert bench.main(["--mode", "e2e", "--steps", "2", "--warmup", "1", "--dir", str(tmp_path / "bench"),
                       *tiny_overrides(tmp_path, workers=0), "--train_datasets", entry]) == 0
    report = json.loads(capsys.readouterr().out)
    check_consistent(report, batch=2, steps=2)
    e2e = report["results"]["e2e"]
    # With no workers the loading runs inside next(), in this process: its CPU time is the loader's.
    assert e2e["loader_cpu_source"].startswith("this process") and e2e["worker_cpu_ms_per_clip"] is None
    assert e2e["loader_cpu_ms_per_clip"] == e2e["main_process_cpu_ms_per_clip_in_next"] > 0
    assert report["settings"]["data"]["train_dataset"] == {"name": "sh", "vis_format": "webdataset", "shards": shard}
    # The same --dir again: a fresh run, not a resume of the finished one (which would train no step).
    assert bench.main(["--mode", "e2e", "--steps", "1", "--warmup", "0", "--dir", str(tmp_path / "bench"),
                       *tiny_overrides(tmp_path, workers=0), "--train_datasets", entry]) == 0
    check_consistent(json.loads(capsys.readouterr().out), batch=2, steps=1)


def test_e2e_refuses_to_run_without_training_data():
    with pytest.raises(ConfigError, match="needs training data"):
        bench.main(["--mode", "e2e", "--steps", "1"])


def test_config_options_belong_to_the_e2e_mode_only(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--mode", "encode", "--n_workers", "2"])
    assert "unrecognized arguments: --n_workers 2" in capsys.readouterr().err


class Counting:
    """A stream of numbered batches."""

    def __init__(self):
        self.n = 0

    def __next__(self):
        self.n += 1
        return {"n": self.n}


def test_timed_stream_reads_the_snapshot_at_the_window_ends_only():
    timed = e2e_bench.TimedStream(Counting(), torch.device("cpu"))
    reads = []
    timed.window(1, 3, lambda: reads.append(len(timed.enter)) or float(len(reads)))
    for _ in range(3):
        next(timed)
    with pytest.raises(RuntimeError, match="ends at batch 4"):
        timed.summary(clips=4, steps=2, loader=True)
    assert next(timed) == {"n": 4} and timed.last_batch == {"n": 4}
    assert reads == [1, 3] and timed.snapshots == {1: 1.0, 3: 2.0}
    summary = timed.summary(clips=4, steps=2, loader=True)
    assert summary["worker_cpu_ms_per_clip"] == pytest.approx(1e3 / 4)  # (2.0 - 1.0) s over 4 clips
    assert summary["ms_per_step"] == pytest.approx(1e3 * (timed.enter[3] - timed.enter[1]) / 2, abs=0.01)


def test_children_cpu_counts_live_children_and_those_that_exited():
    before = e2e_bench.children_cpu_seconds()
    assert before is not None
    burn = ("import sys, time\n"
            "t = time.process_time()\n"
            "while time.process_time() - t < 0.3: pass\n"
            "print('burnt', flush=True)\n"
            "sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", burn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "burnt"
        alive = e2e_bench.children_cpu_seconds()  # read from /proc/<pid>/stat
        assert alive - before >= 0.25
    finally:
        child.communicate("go\n", timeout=60)  # waits for it: reaped
    exited = e2e_bench.children_cpu_seconds()  # from getrusage(RUSAGE_CHILDREN) once reaped
    assert exited - before >= 0.25 and exited >= alive - 0.02
