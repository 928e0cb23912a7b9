"""clipvip encode / index / search on synthetic clips with a tiny (untrained) model."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3

import numpy as np
import pytest

from search_helpers import clipvip, json_lines, make_bench, one_line_error

from clipvip.apps.main import main
from clipvip.apps.cli import run_main

pytest.importorskip("faiss")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    b = make_bench(tmp_path_factory.mktemp("search"))
    with open(os.path.join(b["videos"], "broken.mp4"), "wb") as f:
        f.write(b"\x00\x00\x00 ftypisom not a video")
    b["idx"] = os.path.join(b["root"], "idx")
    b["index_run"] = clipvip("index", "--config", b["config"], "--videos", b["videos"], "--out", b["idx"],
                             "--workers", "2")
    return b


def sidecar_rows(idx, sql):
    conn = sqlite3.connect(os.path.join(idx, "index.sqlite"))
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def test_index_lists_every_readable_video_and_skips_the_broken_one(bench):
    out = bench["index_run"]
    assert "indexed 6 new videos" in out.stdout and "1 unreadable" in out.stdout
    assert "broken.mp4" in out.stderr
    rows = sidecar_rows(bench["idx"], "SELECT row, id, path, duration FROM videos ORDER BY row")
    assert [r[0] for r in rows] == list(range(6))
    assert sorted(r[1] for r in rows) == sorted(rec["clip_id"] for rec in bench["test"])
    assert all(os.path.isfile(r[2]) and r[3] and r[3] > 0 for r in rows)
    meta = dict(sidecar_rows(bench["idx"], "SELECT key, value FROM meta"))
    assert json.loads(meta["dim"]) == 24 and json.loads(meta["count"]) == 6
    assert json.loads(meta["spec"])["kind"] == "flat"
    assert len(json.loads(meta["model_fingerprint"])) == 64 and len(json.loads(meta["config_fingerprint"])) == 64
    assert json.loads(meta["config"])["clip_config"] == bench["clip"]
    with open(os.path.join(bench["idx"], "skipped.tsv")) as f:
        assert f.read().startswith(os.path.join(bench["videos"], "broken.mp4") + "\t")


def test_search_returns_k_results_best_first_and_matches_the_features(bench):
    from clipvip.apps.search import Encoder, VideoIndex
    from clipvip.apps.search.encode import resolve_config

    query = bench["test"][0]["text"]
    result = clipvip("search", bench["idx"], query, "-k", "4", "--json")
    (line,) = json_lines(result.stdout)
    hits = line["results"]
    assert line["query"] == query and len(hits) == 4
    assert all(set(h) == {"id", "path", "score"} for h in hits)
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    # The same numbers as encoding the query and the videos directly (exact inner products).
    encoder = Encoder(resolve_config(bench["config"]))
    q = encoder.encode_texts([query])[0]
    with VideoIndex.open(bench["idx"]) as index:
        for hit in hits:
            video = encoder.encode_video_file(hit["path"])
            assert np.allclose(index.vector(index.record(hit["id"]).row), video, atol=1e-5)
            assert hit["score"] == pytest.approx(float(q @ video), abs=1e-5)
    text = clipvip("search", bench["idx"], query, "-k", "2").stdout
    assert text.splitlines()[0] == f"# query: {query}" and len(text.splitlines()) == 3


def test_queries_file_gives_one_json_line_per_query(bench, tmp_path):
    queries = [r["text"] for r in bench["test"][:3]]
    path = tmp_path / "queries.txt"
    path.write_text("\n".join(queries) + "\n\n")
    lines = json_lines(clipvip("search", bench["idx"], "--queries", path, "-k", "2").stdout)
    assert [line["query"] for line in lines] == queries
    assert all(len(line["results"]) == 2 for line in lines)


def test_like_finds_the_video_itself_first(bench):
    target = bench["test"][2]["clip_id"]
    by_id = json_lines(clipvip("search", bench["idx"], "--like", target, "-k", "3", "--json").stdout)[0]
    assert by_id["results"][0]["id"] == target and by_id["results"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    by_file = json_lines(clipvip("search", bench["idx"], "--like", os.path.join(bench["videos"], target + ".mp4"),
                                 "-k", "3", "--json").stdout)[0]
    assert [h["id"] for h in by_file["results"]][0] == target


def test_add_appends_only_new_videos_and_replaces_the_files(bench, tmp_path):
    idx = str(tmp_path / "idx")
    shutil.copytree(bench["idx"], idx)
    before = [n for n in os.listdir(idx) if n.endswith(".faiss")]
    old_vectors = {r[1]: r[0] for r in sidecar_rows(idx, "SELECT row, id FROM videos")}
    extra = os.path.join(bench["data"], "videos", "train_00000.mp4")
    videos = tmp_path / "videos"
    shutil.copytree(bench["videos"], videos)
    shutil.copy(extra, videos)
    out = clipvip("index", "--videos", videos, "--out", idx, "--add", "--workers", "0")  # model from the sidecar
    assert "indexed 1 new videos (6 already there, 1 unreadable); " in out.stdout
    rows = {r[1]: r[0] for r in sidecar_rows(idx, "SELECT row, id FROM videos")}
    assert rows == {**old_vectors, "train_00000": 6}
    after = [n for n in os.listdir(idx) if n.endswith(".faiss")]
    assert len(after) == 1 and after != before  # a new file, the old one removed
    hits = json_lines(clipvip("search", idx, "--like", "train_00000", "-k", "1", "--json").stdout)[0]["results"]
    assert hits[0]["id"] == "train_00000"
    # Without --add an existing index is not overwritten by accident.
    assert "--add" in one_line_error(clipvip("index", "--config", bench["config"], "--videos", videos,
                                             "--out", idx, check=False))


def test_a_failed_commit_leaves_the_old_index_readable(bench, tmp_path, monkeypatch):
    from clipvip.apps.search import VideoIndex
    from clipvip.apps.search import index as index_mod

    idx = str(tmp_path / "idx")
    shutil.copytree(bench["idx"], idx)
    with VideoIndex.open(idx) as base:
        meta = {k: base.meta[k] for k in ("config", "dim", "model_fingerprint", "config_fingerprint")}
        real_replace = os.replace

        def crash_on_commit(src, dst):
            if os.path.basename(dst) == "index.sqlite":
                raise OSError("disk full")
            return real_replace(src, dst)

        monkeypatch.setattr(index_mod.os, "replace", crash_on_commit)
        with pytest.raises(OSError):
            index_mod.write_index(idx, np.eye(1, 24, dtype=np.float32), [("new", "/x.mp4", 1.0)], meta,
                                  base.spec, base)
    monkeypatch.undo()
    with VideoIndex.open(idx) as index:  # the old sidecar still names the old, complete vectors
        assert len(index) == 6 and index.record("new") is None


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_indexes_find_the_exact_neighbours_on_easy_data(tmp_path, kind):
    from clipvip.apps.search import IndexSpec, VideoIndex
    from clipvip.apps.search.index import write_index

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    records = [(f"v{i}", f"/v{i}.mp4", 1.0) for i in range(400)]
    meta = {"config": {}, "dim": 16, "model_fingerprint": "m", "config_fingerprint": "c"}
    spec = IndexSpec(kind=kind, nlist=8, nprobe=8)  # ivf: every list probed = exact
    write_index(str(tmp_path / kind), vectors, records, meta, spec)
    with VideoIndex.open(str(tmp_path / kind)) as index:
        assert index.spec.kind == kind and len(index) == 400
        queries = vectors[:20] + 0.01 * rng.standard_normal((20, 16)).astype(np.float32)
        found = index.search(queries, 5)
        for q, hits in enumerate(found):
            exact = np.argsort(-(vectors @ queries[q]))[:5]
            assert [r.id for r, _ in hits] == [f"v{i}" for i in exact]
        assert np.allclose(index.vector(7), vectors[7])


class InProcess:
    """``clipvip ARGS`` run in this process (no interpreter start-up): exit code and stderr."""

    def __init__(self, capsys):
        self.capsys = capsys

    def __call__(self, *args, check=False):
        self.capsys.readouterr()
        code = run_main(main, [str(a) for a in args])
        captured = self.capsys.readouterr()
        return type("Result", (), {"returncode": code, "stdout": captured.out, "stderr": captured.err})()


def test_mismatched_model_or_config_is_one_clear_line(bench, tmp_path, capsys):
    clipvip = InProcess(capsys)
    from transformers import CLIPModel

    from tiny_models import tiny_clip_config, write_hf_clip

    query = "a red circle"
    # Weights of another model with the same architecture: the fingerprint differs.
    other = str(tmp_path / "other")
    write_hf_clip(other, seed=1, vocab_size=49408, max_positions=32)
    cfg = json.load(open(bench["config"]))
    cfg.update(clip_config=other, clip_weights=other)
    other_cfg = tmp_path / "other.json"
    other_cfg.write_text(json.dumps(cfg))
    line = one_line_error(clipvip("search", bench["idx"], query, "--config", other_cfg, check=False))
    assert "weights are not those that built" in line
    # Another feature dimension.
    wide = str(tmp_path / "wide")
    config = tiny_clip_config(vocab_size=49408, max_positions=32)
    config.projection_dim = 16
    CLIPModel(config).save_pretrained(wide)
    cfg.update(clip_config=wide, clip_weights=wide)
    other_cfg.write_text(json.dumps(cfg))
    line = one_line_error(clipvip("search", bench["idx"], query, "--config", other_cfg, check=False))
    assert "16-dimensional features" in line and "24-dimensional" in line
    # The right weights, but frames sampled differently.
    line = one_line_error(clipvip("search", bench["idx"], query, "--test_num_frms", "2", check=False))
    assert "reads videos or text differently" in line


def test_bad_input_gives_one_line_errors(bench, tmp_path, capsys):
    clipvip = InProcess(capsys)
    assert "empty query" in one_line_error(clipvip("search", bench["idx"], "  ", check=False))
    empty = tmp_path / "blank.txt"
    empty.write_text("\n\n")
    assert "holds no query" in one_line_error(clipvip("search", bench["idx"], "--queries", empty, check=False))
    assert "no index at" in one_line_error(clipvip("search", tmp_path / "nowhere", "a query", check=False))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(bench["idx"], corrupt)
    (corrupt / "index.sqlite").write_bytes(b"this is not a database" * 100)
    assert "corrupt sidecar" in one_line_error(clipvip("search", corrupt, "a query", check=False))
    # A sidecar and a FAISS file that disagree (rows deleted behind the index's back).
    shutil.copy(os.path.join(bench["idx"], "index.sqlite"), corrupt / "index.sqlite")
    conn = sqlite3.connect(str(corrupt / "index.sqlite"))
    conn.execute("UPDATE meta SET value = '5' WHERE key = 'count'")
    conn.commit()
    conn.close()
    assert "holds 6 vectors" in one_line_error(clipvip("search", corrupt, "a query", check=False))
    assert "--like" in one_line_error(clipvip("search", bench["idx"], "--like", "no_such_id", check=False))


def test_missing_faiss_is_one_line_saying_how_to_install(monkeypatch, tmp_path):
    import sys

    from clipvip.apps.search import FaissMissingError
    from clipvip.apps.search.index import faiss_module

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    with pytest.raises(FaissMissingError, match="pip install faiss-cpu"):
        faiss_module()
    assert run_main(main, ["search", str(tmp_path), "a query"]) == 2


def test_encode_is_resumable_and_lists_unreadable_files(bench, tmp_path, monkeypatch):
    from clipvip.apps.search import Encoder, encode_to_folder, list_videos, read_features
    from clipvip.apps.search.encode import resolve_config

    encoder = Encoder(resolve_config(bench["config"]))
    videos = list_videos(bench["videos"])  # 6 clips and broken.mp4
    full = str(tmp_path / "full")
    summary = encode_to_folder(encoder, full, videos=videos, batch_size=2, chunk_size=2)
    assert summary.encoded == 6 and [p for p, _ in summary.failed] == [os.path.join(bench["videos"], "broken.mp4")]
    ids, feats = read_features(full)
    assert sorted(ids) == sorted(r["clip_id"] for r in bench["test"]) and feats.shape == (6, 24)
    assert open(os.path.join(full, "failed.tsv")).read().count("\n") == 1

    # Interrupted after the first chunk: the rerun encodes only the rest, same features.
    part = str(tmp_path / "part")
    real_iter = Encoder.iter_videos

    def dies_after_two_batches(self, *args, **kwargs):
        for n, batch in enumerate(real_iter(self, *args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield batch

    monkeypatch.setattr(Encoder, "iter_videos", dies_after_two_batches)
    with pytest.raises(KeyboardInterrupt):
        encode_to_folder(encoder, part, videos=videos, batch_size=2, chunk_size=2)
    monkeypatch.undo()
    done = sum(1 for name in os.listdir(os.path.join(part, "parts")) if name.endswith(".tsv")
               for _ in open(os.path.join(part, "parts", name)))
    assert 0 < done < 6  # chunks written before the interruption
    again = encode_to_folder(encoder, part, videos=videos, batch_size=2, chunk_size=2)
    assert again.encoded == 6 - done and again.already == done
    ids2, feats2 = read_features(part)
    order = [ids2.index(i) for i in ids]
    assert np.allclose(feats2[order], feats, atol=1e-6)


def test_encode_command_videos_and_texts(bench, tmp_path):
    out = tmp_path / "enc"
    first = clipvip("encode", "--config", bench["config"], "--videos", bench["videos"], "--out", out,
                    "--workers", "2", "--chunk-size", "4")
    assert "encoded 6, already in" in first.stdout and "unreadable: 1" in first.stdout
    feats = np.load(out / "features.npy")
    assert feats.shape == (6, 24) and np.allclose(np.linalg.norm(feats, axis=1), 1, atol=1e-5)
    assert "encoded 0, already in" in clipvip("encode", "--config", bench["config"], "--videos", bench["videos"],
                                              "--out", out).stdout
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("a red circle moves to the left\na small blue square\n")
    texts = tmp_path / "texts"
    clipvip("encode", "--config", bench["config"], "--texts", sentences, "--out", texts)
    assert (texts / "ids.txt").read_text().split() == ["1", "2"] and np.load(texts / "features.npy").shape == (2, 24)
    # An encode folder refuses features of another kind (or model) instead of mixing them.
    line = one_line_error(clipvip("encode", "--config", bench["config"], "--texts", sentences, "--out", out,
                                  check=False))
    assert "another kind" in line


def test_a_config_stored_by_another_version_still_loads(bench):
    from clipvip.apps.search.encode import config_fingerprint, resolve_config

    cfg = resolve_config(bench["config"])
    stored = cfg.to_dict()
    stored["key_from_a_newer_version"] = 1
    stored["clip_vision_additional_config"]["another_new_key"] = 2
    del stored["video_backend"]  # a key this version added since
    again = resolve_config(stored, overrides=["--test_batch_size", "2"])
    assert again.test_batch_size == 2 and again.video_backend == cfg.video_backend
    assert "key_from_a_newer_version" not in again
    assert config_fingerprint(again) == config_fingerprint(cfg)


# ---------------------------------------------------------------------------------------------
# Issue 26 item 7: what a new user met with clipvip index / search
# ---------------------------------------------------------------------------------------------
def _png_named_mp4(path) -> str:
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(str(path), format="PNG")  # a still image, a video's name
    return str(path)


def _sidecar_ids(idx) -> set:
    return {r[0] for r in sidecar_rows(idx, "SELECT id FROM videos")}


def test_index_takes_subfolders_with_recursive_and_says_what_it_found(bench, tmp_path, capsys):
    clipvip = InProcess(capsys)
    folder = tmp_path / "trip"
    (folder / "day1" / "morning").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    names = [r["clip_id"] + ".mp4" for r in bench["test"][:4]]
    shutil.copy(os.path.join(bench["videos"], names[0]), folder / "top.mp4")
    shutil.copy(os.path.join(bench["videos"], names[1]), folder / "day1" / "a.mp4")
    shutil.copy(os.path.join(bench["videos"], names[2]), folder / "day1" / "morning" / "b.mp4")
    shutil.copy(os.path.join(bench["videos"], names[3]), folder / ".hidden" / "c.mp4")

    flat = tmp_path / "flat"
    out = clipvip("index", "--config", bench["config"], "--videos", folder, "--out", flat, "--workers", 0)
    assert out.returncode == 0, out.stderr
    assert f"found 1 video file in {folder} (2 more in its subfolders: --recursive takes them); " \
           "indexed 1 new videos (" in out.stdout
    assert _sidecar_ids(str(flat)) == {"top"}

    deep = tmp_path / "deep"
    out = clipvip("index", "--config", bench["config"], "--videos", folder, "--recursive", "--out", deep,
                  "--workers", 0)
    assert out.returncode == 0, out.stderr
    assert f"found 3 video files in {folder} and its subfolders; indexed 3 new videos (" in out.stdout
    assert _sidecar_ids(str(deep)) == {"top", "day1/a", "day1/morning/b"}  # the path below DIR, no hidden folder
    # Only subfolders hold videos: the error says where they are, before any model is built.
    outer = tmp_path / "outer"
    (outer / "inner").mkdir(parents=True)
    shutil.copy(folder / "top.mp4", outer / "inner")
    only_nested = clipvip("index", "--config", bench["config"], "--videos", outer, "--out", tmp_path / "none")
    assert f"no video files directly in {outer}, 1 in its subfolders: pass --recursive" in one_line_error(only_nested)


def test_index_checks_its_inputs_before_loading_the_model(bench, tmp_path, capsys, monkeypatch):
    """An empty folder, or one of files that are no videos (a PNG renamed .mp4, a broken file),
    is an error before the model loads, and leaves no index folder behind."""
    from clipvip.apps.search import engine

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine.Encoder, "__init__", no_model)
    clipvip = InProcess(capsys)
    empty = tmp_path / "empty"
    empty.mkdir()
    line = one_line_error(clipvip("index", "--config", bench["config"], "--videos", empty, "--out", tmp_path / "i1"))
    assert f"no video files in {empty}" in line
    junk = tmp_path / "junk"
    junk.mkdir()
    png = _png_named_mp4(junk / "a_photo.mp4")
    shutil.copy(os.path.join(bench["videos"], "broken.mp4"), junk)
    line = one_line_error(clipvip("index", "--config", bench["config"], "--videos", junk, "--out", tmp_path / "i2"))
    assert f"no readable video to index: 2 found, 2 unreadable (first: {png}: an image (png_pipe), not a video)" \
        in line, line
    assert not (tmp_path / "i1").exists() and not (tmp_path / "i2").exists()


def test_a_png_renamed_mp4_is_skipped_and_listed_with_its_reason(bench, tmp_path, capsys):
    clipvip = InProcess(capsys)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for record in bench["test"][:2]:
        shutil.copy(os.path.join(bench["videos"], record["clip_id"] + ".mp4"), folder)
    png = _png_named_mp4(folder / "holiday.mp4")
    out = clipvip("index", "--config", bench["config"], "--videos", folder, "--out", tmp_path / "idx", "--workers", 0)
    assert out.returncode == 0, out.stderr
    assert "indexed 2 new videos (0 already there, 1 unreadable)" in out.stdout
    assert f"{png}: an image (png_pipe), not a video" in out.stderr
    assert _sidecar_ids(str(tmp_path / "idx")) == {r["clip_id"] for r in bench["test"][:2]}
    with open(tmp_path / "idx" / "skipped.tsv") as f:
        assert f.read() == f"{png}\tan image (png_pipe), not a video\n"


def test_a_failed_index_command_leaves_no_trace(bench, tmp_path, capsys, monkeypatch):
    from clipvip.apps.search import VideoIndex, engine

    clipvip = InProcess(capsys)
    junk = tmp_path / "junk"
    junk.mkdir()
    _png_named_mp4(junk / "photo.mp4")
    # A folder that was there (empty) stays, empty: no .lock left in it.
    given = tmp_path / "given"
    given.mkdir()
    assert clipvip("index", "--config", bench["config"], "--videos", junk, "--out", given).returncode == 2
    assert os.listdir(given) == []
    # An index that was there is left as it was by a rebuild that fails.
    idx = tmp_path / "idx"
    shutil.copytree(bench["idx"], idx)
    files = {name: (idx / name).read_bytes() for name in os.listdir(idx)}
    assert clipvip("index", "--config", bench["config"], "--videos", junk, "--out", idx, "--overwrite").returncode == 2
    assert {name: (idx / name).read_bytes() for name in os.listdir(idx)} == files
    # Interrupted while encoding the first build: the folder it made is gone.
    real_iter = engine.Encoder.iter_videos

    def interrupted(self, *args, **kwargs):
        for batch in real_iter(self, *args, **kwargs):
            yield batch
            raise KeyboardInterrupt

    monkeypatch.setattr(engine.Encoder, "iter_videos", interrupted)
    new = tmp_path / "new"
    assert clipvip("index", "--config", bench["config"], "--videos", bench["videos"], "--out", new,
                   "--batch-size", 2, "--workers", 0).returncode == 130
    assert not new.exists()
    with VideoIndex.open(str(idx)) as index:
        assert len(index) == 6


def test_the_progress_bar_counts_videos_not_batches(bench, capsys, monkeypatch):
    from clipvip.apps.search import Encoder, list_videos
    from clipvip.apps.search.encode import resolve_config
    from clipvip.engine import encode as encode_module

    # What the bar counted when it closed: its last drawing is rate-limited (tqdm's mininterval),
    # so the text on stderr need not show the final count.
    closed = []

    class RecordingBar(encode_module.tqdm):
        def close(self):
            if not self.disable:
                closed.append((self.n, self.total))
            super().close()

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(encode_module, "tqdm", RecordingBar)
    encoder = Encoder(resolve_config(bench["config"]))
    videos = list_videos(bench["videos"])  # 6 clips and broken.mp4
    capsys.readouterr()
    batches = list(encoder.iter_videos(videos, batch_size=3, workers=0))
    bar = capsys.readouterr().err
    assert len(batches) == 3 and closed == [(7, 7)], closed
    assert "/7" in bar and " videos" in bar and "/3 " not in bar, bar


def test_search_json_is_utf8_and_says_when_a_query_is_cut(bench, capsys):
    clipvip = InProcess(capsys)
    query = "un cercle rouge se déplace vers la gauche — café"
    out = clipvip("search", bench["idx"], query, "-k", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert query in out.stdout and "\\u" not in out.stdout  # UTF-8, not \u escapes
    (line,) = json_lines(out.stdout)
    assert line["query"] == query and "truncated" not in line and "warning" not in out.stderr
    # max_txt_len is 24 in the bench config: 22 words and the start and end marks.
    long_query = " and ".join(["a red circle moves to the left"] * 5)  # one token a word: 39 words
    out = clipvip("search", bench["idx"], long_query, "-k", "1", "--json")
    (line,) = json_lines(out.stdout)
    cut = line["truncated"]
    assert cut["max_txt_len"] == 24 and cut["tokens"] > 24
    assert cut["tokens"] == 41 and cut["read"] == " ".join(long_query.split()[:22])
    assert f'the model reads 24 (max_txt_len): "{cut["read"]}"' in out.stderr
    table = clipvip("search", bench["idx"], long_query, "-k", "1")
    assert "warning: the query is" in table.stderr and table.stdout.startswith("# query: ")


def test_a_writer_that_waited_on_a_removed_lock_takes_it_again(tmp_path, monkeypatch):
    """A failed first build removes its folder, .lock included: a writer that was waiting on that
    file must not go on holding a lock that the next writer cannot see."""
    import fcntl
    import threading

    from clipvip.apps.search.storage import writer_lock

    folder = str(tmp_path / "idx")
    first_holds, second_holds, release_first = threading.Event(), threading.Event(), threading.Event()
    second_opened = threading.Event()  # the second writer has the first's .lock open and asks for it
    real_flock = fcntl.flock

    def flock(fd, operation):
        if threading.current_thread().name == "second" and operation == fcntl.LOCK_EX:
            second_opened.set()
        return real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", flock)
    seen = {}

    def first():
        with writer_lock(folder):
            first_holds.set()
            release_first.wait(10)
            shutil.rmtree(folder)  # what a failed build of a new index does

    def second():
        first_holds.wait(10)
        with writer_lock(folder):
            seen["lock"] = os.path.isfile(os.path.join(folder, ".lock"))
            second_holds.set()
            release_second.wait(10)

    release_second = threading.Event()
    threads = [threading.Thread(target=first), threading.Thread(target=second, name="second")]
    for t in threads:
        t.start()
    assert first_holds.wait(10) and second_opened.wait(10)
    release_first.set()
    assert second_holds.wait(10) and seen["lock"]  # the second writer holds the lock file that is there
    third_holds = threading.Event()

    def third_writer():
        with writer_lock(folder):
            third_holds.set()

    third = threading.Thread(target=third_writer)
    third.start()
    assert not third_holds.wait(0.5)  # a third writer waits for the second
    release_second.set()
    assert third_holds.wait(10)
    for t in [*threads, third]:
        t.join(10)
