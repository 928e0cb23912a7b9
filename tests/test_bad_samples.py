"""Bad training samples (clipvip/data/bad_samples.py): one warning per sample, rank and run however
often it is met, every skip counted, the list in log/bad_samples.json and at the end of the log; the
same for shard members and loose files, through the retrieval app, a resume and two gloo processes."""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys

import pytest
import torch

import clipvip
from clipvip.apps import retrieval
from clipvip.data import bad_samples
from clipvip.data.bad_samples import BadSample, BadSampleLog
from clipvip.data.shard_index import ShardInfo, write_index
from clipvip.data.shards import deal_shards
from clipvip.logging_utils import LOGGER as ROOT_LOGGER

from shard_helpers import synthetic_samples, write_shards
from tiny_models import ListStream, fixed_batches, tiny_cfg, write_hf_clip

EPOCHS = 3
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture
def warnings_said():
    """The messages of every WARNING of the ``clipvip`` logger (it does not propagate to caplog's root)."""
    said: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno == logging.WARNING:
                said.append(record.getMessage())

    handler = Keep()
    ROOT_LOGGER.addHandler(handler)
    yield said
    ROOT_LOGGER.removeHandler(handler)


def about(said: list[str], sample: str) -> list[str]:
    return [m for m in said if f"skipping {sample} " in m]


# ----------------------------------------------------------------------------------------------
# The log, the merge, the file
# ----------------------------------------------------------------------------------------------
def test_a_sample_is_warned_about_once_and_every_skip_counted(warnings_said):
    log = BadSampleLog(rank=1, world_size=2, known=[{"dataset": "d", "sample": "old.mp4"}])
    a, b = BadSample("d", "a.mp4", "cannot read video a.mp4"), BadSample("d", "b.tar:0001", "no text 'txt'")
    for batch in ([a], [a, b], [], [a], [BadSample("d", "old.mp4", "gone")]):
        log.add(batch)
    assert [m.split(" (")[0] for m in warnings_said] == ["rank 1: [d] skipping a.mp4", "rank 1: [d] skipping b.tar:0001"]
    assert log.entries() == [("d", "a.mp4", "cannot read video a.mp4", 3), ("d", "b.tar:0001", "no text 'txt'", 1),
                             ("d", "old.mp4", "gone", 1)]
    BadSampleLog().add([a])
    assert warnings_said[-1].startswith("[d] skipping a.mp4 (cannot read video a.mp4)")  # one process: no rank


def test_ranks_merge_into_one_row_per_sample_and_the_file_reads_back(tmp_path):
    earlier = [{"dataset": "d", "sample": "a.mp4", "reason": "r", "skips": 2, "ranks": [1]}]
    rows = bad_samples.merge([[("d", "a.mp4", "r", 1), ("e", "z.mp4", "s", 4)], [("d", "a.mp4", "r", 5)]], earlier)
    assert rows == [{"dataset": "d", "sample": "a.mp4", "reason": "r", "skips": 8, "ranks": [0, 1]},
                    {"dataset": "e", "sample": "z.mp4", "reason": "s", "skips": 4, "ranks": [0]}]
    assert earlier[0]["skips"] == 2 and earlier[0]["ranks"] == [1]  # not changed in place
    path = str(tmp_path / "bad_samples.json")
    bad_samples.write(path, rows)
    assert bad_samples.read(path) == rows
    text = bad_samples.describe(rows, path, show_ranks=True)
    assert text.splitlines() == [f"2 bad training samples (skipped 12 times in all), listed in {path}; repair or remove "
                                 "them:", "  [d] a.mp4: r (skipped 8x on ranks 0,1)", "  [e] z.mp4: s (skipped 4x on rank 0)"]
    many = [{**rows[1], "sample": f"{k:03d}.mp4", "skips": 1} for k in range(bad_samples.LISTED_IN_LOG + 3)]
    assert bad_samples.describe(many, path).splitlines()[-1] == f"  ... and 3 more in {path}"
    (tmp_path / "other.json").write_text('{"not": "rows"}')
    assert bad_samples.read(str(tmp_path / "other.json")) == [] and bad_samples.read(str(tmp_path / "none")) == []


# ----------------------------------------------------------------------------------------------
# Through the retrieval app: a shard member and a loose file, met every epoch in worker processes
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bad_clip") / "clip")
    write_hf_clip(folder, vocab_size=49408, max_positions=32)
    return folder


def _training_set(kind: str, synthetic_data: dict, root, copies: int = 1) -> tuple[dict, str]:
    """(train_datasets entry, the bad sample's name): the 6 synthetic clips (shards: ``copies`` times
    over, in shards of 2) of which one cannot be decoded."""
    garbage = root / "garbage.mp4"
    garbage.write_bytes(b"\x00\x00\x00\x18ftypisom not a video")
    samples = synthetic_samples(synthetic_data)
    if kind == "shards":  # shard 1's first member is the bad one
        samples = samples * copies
        samples[2] = {**samples[2], "video": str(garbage)}
        shards = write_shards(str(root / "shards"), samples, [2] * (len(samples) // 2))
        write_index(str(root / "shards" / "shards.json"), [ShardInfo(p, 2) for p in shards])
        return ({"name": "bad-shards", "vis_format": "webdataset", "shards": str(root / "shards" / "*.tar"),
                 "text_field": "captions", "shuffle_buffer": 2}, shards[1] + ":000010000")
    (root / "videos").mkdir()
    for s in samples:
        os.symlink(s["video"], root / "videos" / os.path.basename(s["video"]))
    os.replace(garbage, root / "videos" / "broken.mp4")
    with open(root / "train.jsonl", "w") as f:
        for s in samples[:5] + [{"clip_id": "broken", "captions": ["a clip that cannot be read"]}]:
            f.write(json.dumps({"clip_id": s["clip_id"], "text": s["captions"]}) + "\n")
    return {"name": "bad-files", "txt": str(root / "train.jsonl"), "vis": str(root / "videos")}, str(
        root / "videos" / "broken.mp4")


def _config(clip: str, synthetic_data: dict, train: dict, out: str, n_workers: int = 1, seed: int = 0) -> dict:
    return {"train_datasets": train,
            "inference_datasets": [{"name": "test", "txt": synthetic_data["test"], "vis": synthetic_data["videos"]}],
            "train_num_frms": 2, "test_num_frms": 2, "input_res": [32, 32], "max_txt_len": 16,
            "clip_config": clip, "clip_weights": clip,
            "clip_vision_additional_config": {"type": "ViP", "temporal_size": 2, "add_cls_num": 1},
            "train_batch_size": 2, "test_batch_size": 6, "n_workers": n_workers, "pin_mem": 0, "fp16": 0,
            "num_train_epochs": EPOCHS, "num_valid": 1, "seed": seed, "output_dir": out, "is_train": 1}


@pytest.mark.parametrize("kind", ["shards", "files"])
def test_a_bad_sample_met_every_epoch_is_warned_once_and_listed_at_the_end(kind, clip, synthetic_data, tmp_path,
                                                                         warnings_said):
    train, bad = _training_set(kind, synthetic_data, tmp_path)
    out = str(tmp_path / "run")
    # One DataLoader worker: a shard stream starts it afresh every epoch, a loose-file one keeps it.
    retrieval.run(clipvip.load_config(_config(clip, synthetic_data, train, out), []))
    progress = torch.load(os.path.join(out, "ckpt", "train_state.pt"), weights_only=True)["progress"]
    assert progress["skipped_samples"] >= EPOCHS  # met in every epoch, each time counted

    assert len(about(warnings_said, bad)) == 1, about(warnings_said, bad)
    with open(os.path.join(out, "log", "log.txt"), encoding="utf-8") as f:
        log_txt = f.read()
    assert log_txt.count(f"skipping {bad} ") == 1
    with open(os.path.join(out, "log", bad_samples.FILE_NAME), encoding="utf-8") as f:
        rows = json.load(f)
    assert [(r["dataset"], r["sample"], r["skips"], r["ranks"]) for r in rows] == [
        (train["name"], bad, progress["skipped_samples"], [0])]
    assert "cannot read video" in rows[0]["reason"] or "Invalid data" in rows[0]["reason"], rows[0]["reason"]
    listed = f"1 bad training sample (skipped {progress['skipped_samples']} times in all), listed in "
    assert log_txt.count(listed) == 1 and f"  [{train['name']}] {bad}: " in log_txt


# ----------------------------------------------------------------------------------------------
# A resumed run: the list goes on, nothing is warned about twice; a fresh run drops an old list
# ----------------------------------------------------------------------------------------------
def _tiny_trainer(tmp_path, batches):
    from clipvip.distributed import DistEnv
    from clipvip.engine import Trainer, TrainerSettings, TrainPlan
    from clipvip.loss import LossSettings, build_loss

    folder = str(tmp_path / "clip")
    if not os.path.isdir(folder):
        write_hf_clip(folder)
    cfg = tiny_cfg(folder, "--output_dir", str(tmp_path / "run"), "--train_batch_size", "2",
                   "--num_train_epochs", "2", "--num_valid", "1", "--max_txt_len", "16")
    torch.manual_seed(0)
    plan = TrainPlan.from_config(cfg, num_examples=4, world_size=1)
    block = {direction: {"R1": 1.0} for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl")}
    return Trainer(TrainerSettings.from_config(cfg), clipvip.build_model(cfg), build_loss(LossSettings.from_config(cfg)),
                   ListStream(batches), plan, evaluate=lambda m: {"test": block}, env=DistEnv(), precision="fp32")


def test_a_resumed_run_carries_its_list_on_and_a_fresh_run_drops_an_old_one(tmp_path, warnings_said):
    a, b = BadSample("d", "a.mp4", "cannot read"), BadSample("d", "b.mp4", "empty")
    batches = [{**fixed_batches(2)[0], "num_skipped": 1, "bad_samples": [a]}, fixed_batches(2)[1]]
    first = _tiny_trainer(tmp_path, batches)
    for _ in range(2):
        first.train_step()
    first.save_state()  # what an interrupted run leaves: the state at step 2 and the list so far
    first.run_log.close()
    path = os.path.join(str(tmp_path / "run"), "log", bad_samples.FILE_NAME)
    assert [(r["sample"], r["skips"]) for r in bad_samples.read(path)] == [("a.mp4", 1)]

    batches[1] = {**batches[1], "num_skipped": 1, "bad_samples": [b]}
    resumed = _tiny_trainer(tmp_path, batches)
    assert resumed.resumed
    resumed.fit()  # steps 3 and 4: a again (known: not warned again), b for the first time
    assert [(r["sample"], r["skips"]) for r in bad_samples.read(path)] == [("a.mp4", 2), ("b.mp4", 1)]
    assert len(about(warnings_said, "a.mp4")) == 1 and len(about(warnings_said, "b.mp4")) == 1

    os.remove(os.path.join(str(tmp_path / "run"), "ckpt", "train_state.pt"))
    _tiny_trainer(tmp_path, fixed_batches(2)).fit()  # a new run in the same folder, nothing bad
    assert not os.path.exists(path)


# ----------------------------------------------------------------------------------------------
# Two gloo processes: each rank warns once about what it met, rank 0 lists every rank's skips
# ----------------------------------------------------------------------------------------------
def test_two_processes_warn_once_per_rank_and_rank_0_lists_both(clip, synthetic_data, tmp_path):
    train, bad = _training_set("shards", synthetic_data, tmp_path, copies=2)  # 3 batches per rank and epoch
    # With seed 2 the epochs' deals give shard 1 (the bad member's) to rank 0, 0, then 1 (one reader per rank).
    seed = 2
    assert [[i for i, dealt in enumerate(deal_shards((2,) * 6, 2, seed, epoch)) if 1 in dealt]
            for epoch in range(EPOCHS)] == [[0], [0], [1]]
    out = str(tmp_path / "run")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config(clip, synthetic_data, train, out, n_workers=1, seed=seed)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "clipvip",
           "retrieval", "--config", str(config)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(os.path.join(out, "log", bad_samples.FILE_NAME), encoding="utf-8") as f:
        (row,) = json.load(f)
    assert row["sample"] == bad and row["ranks"] == [0, 1]
    warned = [re.search(r"rank (\d): \[", line) for line in done.stderr.splitlines() if f"skipping {bad} " in line]
    assert sorted(m.group(1) for m in warned if m) == ["0", "1"] and len(warned) == 2, warned  # once per rank, named
    progress = torch.load(os.path.join(out, "ckpt", "train_state.pt"), weights_only=True)["progress"]
    assert row["skips"] >= EPOCHS and progress["skipped_samples"] <= row["skips"]  # rank 0's share of them
