"""clipvip shard: packing the synthetic retrieval and pretraining sets into WebDataset tar shards.

The tars are read back with the standard ``tarfile`` module (member names, contents, fixed
metadata), the videos with PyAV; failures land in failed.txt; a kill -9 mid-shard and a rerun
give the bytes of one uninterrupted run.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import av
import lmdb
import numpy as np
import pytest

from conftest import write_clip
from clipvip.apps import shard
from clipvip.apps.cli import run_main
from clipvip.apps.main import COMMANDS, USAGE
from clipvip.data.shard_index import read_index

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run(*args) -> int:
    """Run ``clipvip shard`` in this process (one worker unless told, no bar); its exit status."""
    argv = [str(a) for a in args] + ["--no_progress"]
    return run_main(shard.main, argv if "--workers" in argv else argv + ["--workers", "1"])


def members(tar_path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        infos = tar.getmembers()
        for info in infos:  # fixed metadata: the same input gives the same bytes anywhere
            assert (info.mtime, info.uid, info.gid, info.uname, info.mode) == (0, 0, 0, "", 0o644), info.name
        return {info.name: tar.extractfile(info).read() for info in infos}


def samples(tar_path) -> dict[str, dict[str, bytes]]:
    """``{key: {suffix: bytes}}``; member names split at the first dot, as webdataset does."""
    grouped: dict[str, dict[str, bytes]] = {}
    for name, data in members(tar_path).items():
        key, suffix = name.split(".", 1)
        grouped.setdefault(key, {})[suffix] = data
    return grouped


def tree_bytes(folder) -> dict[str, bytes]:
    """Every file the packer writes for a reader (shards, index, failed.txt), by name."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def video_info(data: bytes) -> tuple[int, float, tuple[int, int]]:
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.video[0]
        n = sum(1 for _ in c.decode(stream))
        return n, float(stream.average_rate), (stream.height, stream.width)


def records(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------------
def test_retrieval_shards(synthetic_data, tmp_path, capsys):
    out = tmp_path / "shards"
    assert run("--out", out, "--txt", synthetic_data["train"], "--vis", synthetic_data["videos"],
               "--samples_per_shard", 4) == 0
    assert "packed 6 clips into 2 shards" in capsys.readouterr().out
    index = read_index(str(out / "shards.json"))
    assert [(os.path.basename(s.url), s.samples) for s in index] == [("00000.tar", 4), ("00001.tar", 2)]
    assert [s.bytes for s in index] == [os.path.getsize(out / n) for n in ("00000.tar", "00001.tar")]
    assert (out / "failed.txt").read_text() == ""

    expected = records(synthetic_data["train"])
    got = {**samples(out / "00000.tar"), **samples(out / "00001.tar")}
    # Sample g of the annotation is sample g % 4 of shard g // 4; keys have no dot.
    assert list(got) == ["000000000", "000000001", "000000002", "000000003", "000010000", "000010001"]
    for (key, sample), record in zip(got.items(), expected):
        assert sorted(sample) == ["json", "mp4", "txt"]
        meta = json.loads(sample["json"])
        assert meta == {"key": key, "clip_id": record["clip_id"], "captions": record["text"]}
        assert sample["txt"].decode() == record["text"][0]
        source = Path(synthetic_data["videos"]) / f"{record['clip_id']}.mp4"
        assert sample["mp4"] == source.read_bytes()  # copied as-is

    # The maintained reader groups our members into the same samples.
    wds = pytest.importorskip("webdataset")
    read = list(wds.WebDataset(str(out / "{00000..00001}.tar"), shardshuffle=False))
    assert [s["__key__"] for s in read] == list(got)


@pytest.mark.parametrize("captions", ["lmdb", "json"])
def test_pretrain_shards(synthetic_data, tmp_path, captions):
    cap = synthetic_data["pretrain_captions" if captions == "lmdb" else "pretrain_captions_json"]
    out = tmp_path / "shards"
    assert run("--out", out, "--kind", "pretrain", "--txt", synthetic_data["pretrain_subtitles"],
               "--vis", synthetic_data["pretrain_videos"], "--vid_cap_path", cap, "--samples_per_shard", 3) == 0
    assert [s.samples for s in read_index(str(out / "shards.json"))] == [3, 1]
    clip_ids = [r["clip_id"] for r in records(synthetic_data["pretrain_subtitles_jsonl"])]
    with lmdb.open(synthetic_data["pretrain_subtitles"], readonly=True, lock=False) as env, env.begin() as txn:
        subtitles = {c: txn.get(c.encode()).decode() for c in clip_ids}
    assert len(set(subtitles.values())) == len(clip_ids)
    captions_by_id = {r["image_id"]: r["caption"] for r in json.loads(Path(synthetic_data["pretrain_captions_json"]).read_text())}
    got = {**samples(out / "00000.tar"), **samples(out / "00001.tar")}
    assert list(got) == ["000000000", "000000001", "000000002", "000010000"]
    for (key, sample), clip_id in zip(got.items(), clip_ids):
        assert sample["txt"].decode() == subtitles[clip_id]
        assert json.loads(sample["json"]) == {"key": key, "clip_id": clip_id, "subtitle": subtitles[clip_id],
                                              "caption": captions_by_id[clip_id]}
        video = Path(synthetic_data["pretrain_videos"]) / clip_id.split(".")[0] / clip_id
        assert sample["mp4"] == video.read_bytes()


def _small_set(tmp_path) -> tuple[Path, Path]:
    """Three good clips, then a corrupt one, an empty one, a missing one and one without a caption."""
    vis = tmp_path / "videos"
    rows = []
    for k in range(3):
        write_clip(vis / f"good{k}.mp4", n_frames=6, size=32, seed=k)
        rows.append({"clip_id": f"good{k}", "text": [f"caption {k}", "another"]})
    (vis / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    (vis / "empty.mp4").write_bytes(b"")
    (vis / "nocap.mp4").write_bytes((vis / "good0.mp4").read_bytes())
    rows[1:1] = [{"clip_id": "corrupt", "text": "a"}, {"clip_id": "empty", "text": "b"}]
    rows += [{"clip_id": "missing", "text": "c"}, {"clip_id": "nocap", "text": ["  "]}]
    txt = tmp_path / "ann.jsonl"
    txt.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return txt, vis


def test_unreadable_clips_go_to_failed_txt(tmp_path):
    txt, vis = _small_set(tmp_path)  # good0 corrupt empty good1 good2 missing nocap
    out = tmp_path / "shards"
    assert run("--out", out, "--txt", txt, "--vis", vis, "--samples_per_shard", 3) == 0
    failed = [line.split("\t") for line in (out / "failed.txt").read_text().splitlines()]
    assert [(c, os.path.basename(p)) for c, p, _ in failed] == [
        ("corrupt", "corrupt.mp4"), ("empty", "empty.mp4"), ("missing", "missing.mp4"), ("nocap", "nocap.mp4")]
    reasons = {c: r for c, _, r in failed}
    assert "empty file" in reasons["empty"] and "no such file" in reasons["missing"]
    assert "caption" in reasons["nocap"] and reasons["corrupt"]
    assert [s.samples for s in read_index(str(out / "shards.json"))] == [1, 2, 0]
    got = {key: json.loads(s["json"])["clip_id"] for n in ("00000", "00001", "00002")
           for key, s in samples(out / f"{n}.tar").items()}
    # A clip left out leaves a gap in the keys: every shard depends on its own slice only.
    assert got == {"000000000": "good0", "000010000": "good1", "000010001": "good2"}


def test_other_extensions_keep_their_member_name(tmp_path):
    vis = tmp_path / "lsmdc" / "videos"
    write_clip(vis / "movie_a" / "clip1.avi", n_frames=6, size=32)
    txt = tmp_path / "lsmdc" / "test.jsonl"
    txt.write_text(json.dumps({"clip_id": "movie_a/clip1", "text": "someone opens a door"}) + "\n")
    out = tmp_path / "shards"
    assert run("--out", out, "--txt", txt, "--vis", vis, "--name", "lsmdc_test") == 0
    sample = samples(out / "00000.tar")["000000000"]
    assert sorted(sample) == ["avi", "json", "txt"]
    assert json.loads(sample["json"])["clip_id"] == "movie_a/clip1"


def test_reencode_and_frame_folders(synthetic_data, tmp_path):
    # 8 frames at 6 fps re-encoded at 3 fps: outputs at 0, 1/3, 2/3, 1 s.
    out = tmp_path / "re"
    assert run("--out", out, "--txt", synthetic_data["test"], "--vis", synthetic_data["videos"],
               "--reencode", "--fps", 3, "--size", "32x48", "--samples_per_shard", 6, "--workers", 2) == 0
    got = samples(out / "00000.tar")
    assert len(got) == 6
    for sample in got.values():
        assert video_info(sample["mp4"]) == (4, 3.0, (32, 48))
    again = tmp_path / "again"  # single-threaded x264: the same bytes with another worker count
    assert run("--out", again, "--txt", synthetic_data["test"], "--vis", synthetic_data["videos"],
               "--reencode", "--fps", 3, "--size", "32x48", "--samples_per_shard", 6) == 0
    assert tree_bytes(again) == tree_bytes(out)

    # ActivityNet frame folders: one jpg, one frame, at the nominal rate, the folder's size.
    frames = tmp_path / "frames"
    assert run("--out", frames, "--txt", synthetic_data["test_frames"], "--vis", synthetic_data["frames"],
               "--vis_format", "frame", "--samples_per_shard", 6) == 0
    for (key, sample), record in zip(samples(frames / "00000.tar").items(), records(synthetic_data["test_frames"])):
        assert video_info(sample["mp4"]) == (record["num_frame"], 3.0, (64, 64))
        assert json.loads(sample["json"]) == {"key": key, "clip_id": record["clip_id"], "captions": [record["text"]]}


KILLER = """
import os, signal, sys
from clipvip.apps import shard
written = []
add = shard._add_member
def add_then_die(tar, name, data):
    add(tar, name, data)
    written.append(name)
    if len(written) == int(os.environ["DIE_AFTER"]):
        tar.fileobj.flush()
        os.kill(os.getpid(), signal.SIGKILL)
shard._add_member = add_then_die
sys.exit(shard.main(sys.argv[1:]))
"""


def test_kill_mid_shard_then_rerun_gives_the_bytes_of_one_run(synthetic_data, tmp_path, capsys):
    args = ["--txt", synthetic_data["train"], "--vis", synthetic_data["videos"], "--samples_per_shard", 2]
    clean = tmp_path / "clean"
    assert run("--out", clean, *args, "--workers", 2) == 0  # another worker count, the same bytes
    reference = tree_bytes(clean)
    assert sorted(reference) == ["00000.tar", "00001.tar", "00002.tar", "failed.txt", "shards.json"]

    out = tmp_path / "killed"
    # Killed in shard 1 after one and a half samples (3 members a sample).
    env = {**os.environ, "DIE_AFTER": "10", "PYTHONPATH": SRC}
    proc = subprocess.run([sys.executable, "-c", KILLER, "--out", str(out), *map(str, args), "--workers", "1",
                           "--no_progress"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert (out / "00000.tar").is_file() and not (out / "00001.tar").exists()
    assert [p.name for p in out.glob(".tmp-*")], "the partial shard is a temporary file"
    assert not (out / "shards.json").exists()

    capsys.readouterr()
    assert run("--out", out, *args) == 0
    assert "(2 written, 1 already complete)" in capsys.readouterr().out
    assert tree_bytes(out) == reference
    assert not list(out.rglob(".tmp-*"))

    # A shard renamed into place whose part file was not written yet (killed between the two) is redone.
    (out / ".parts" / "00002.json").unlink()
    (out / "00002.tar").write_bytes(b"\0" * 512)
    assert run("--out", out, *args) == 0
    assert "(1 written, 2 already complete)" in capsys.readouterr().out
    assert tree_bytes(out) == reference


def test_changed_set_redoes_what_changed(synthetic_data, tmp_path, capsys):
    rows = records(synthetic_data["train"])
    txt = tmp_path / "train.jsonl"
    txt.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["--txt", txt, "--vis", synthetic_data["videos"], "--samples_per_shard", 2]
    out = tmp_path / "shards"
    assert run("--out", out, *args) == 0
    before = tree_bytes(out)

    rows[3]["text"][0] = "an edited caption"  # sample 3: shard 1
    txt.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert run("--out", out, *args) == 0
    assert "(1 written, 2 already complete)" in capsys.readouterr().out
    after = tree_bytes(out)
    # Only that shard (and the index, where its size changed) differs.
    assert {n for n in before if before[n] != after[n]} - {"shards.json"} == {"00001.tar"}
    assert samples(out / "00001.tar")["000010001"]["txt"] == b"an edited caption"

    txt.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))  # a smaller set: shards past its end go
    assert run("--out", out, *args) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert [s.samples for s in read_index(str(out / "shards.json"))] == [2, 1]


def test_config_and_dataset_name(synthetic_data, tmp_path):
    root = Path(synthetic_data["root"])
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"blob_mount_dir": str(root.parent), "val_datasets": [
        {"name": "syn_test", "txt": f"{root.name}/test.jsonl", "vis": f"{root.name}/videos"}]}))
    by_config, by_paths = tmp_path / "a", tmp_path / "b"
    assert run("--out", by_config, "--config", cfg, "--dataset", "syn_test") == 0
    assert run("--out", by_paths, "--txt", synthetic_data["test"], "--vis", synthetic_data["videos"]) == 0
    assert tree_bytes(by_config) == tree_bytes(by_paths)


def test_bad_input_is_one_line(synthetic_data, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"train_datasets": [{"name": "x", "txt": "a.jsonl", "vis": "v"}]}))
    vis, ann = synthetic_data["videos"], synthetic_data["test"]
    cases = {
        "video folder not found": ["--txt", ann, "--vis", tmp_path / "nowhere"],
        "no clips listed": ["--txt", empty, "--vis", vis],
        "annotation file not found": ["--txt", tmp_path / "none.jsonl", "--vis", vis],
        "cannot write to the output folder": ["--txt", ann, "--vis", vis, "--out", a_file / "sub"],
        "--kind pretrain": ["--txt", synthetic_data["pretrain_subtitles"], "--vis", vis],
        "no dataset entry named 'y' (entries: x)": ["--config", cfg, "--dataset", "y"],
        "--txt and --vis are required": [],
    }
    for message, args in cases.items():
        if "--out" not in args:
            args = ["--out", tmp_path / "out", *args]
        assert run(*args) == 2, message
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, (message, err)


def test_one_packer_per_folder(synthetic_data, tmp_path, capsys):
    out = tmp_path / "shards"
    (out / ".parts").mkdir(parents=True)
    with open(out / ".parts" / "lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert run("--out", out, "--txt", synthetic_data["test"], "--vis", synthetic_data["videos"]) == 2
    assert capsys.readouterr().err.strip() == f"error: another clipvip shard is writing {out}"
    assert run("--out", out, "--txt", synthetic_data["test"], "--vis", synthetic_data["videos"]) == 0


def test_shard_command_is_listed():
    assert "shard" in COMMANDS and "  shard --out DIR" in USAGE
