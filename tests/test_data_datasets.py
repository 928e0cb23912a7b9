"""Datasets, collators and loaders on tiny files written in the real formats (clips of 8 frames, 32 px input)."""
from __future__ import annotations

import json
import logging
import os
import pickle
import shutil

import lmdb
import pytest
import torch

from clipvip.data.annotations import ANNOTATION_RULES, DatasetEntry, load_annotations, read_records, select_rule
from clipvip.data.loader import (
    ContiguousShardSampler,
    LoaderSettings,
    LoaderStream,
    build_eval_loader,
    shard_range,
)
from clipvip.data.pretrain_dataset import LazyLmdb, PretrainCollator, PretrainDataset
from clipvip.data.retrieval_dataset import MAX_TRIES, RetrievalCollator, VideoRetrievalDataset, scan_readable
from clipvip.errors import ConfigError, DataError

from conftest import write_clip, write_frames


def _jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def _lmdb(path, items):
    env = lmdb.open(str(path), map_size=1 << 22)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k.encode(), v.encode())
    env.close()
    return str(path)


def _warnings(log, needle=""):
    return [r.getMessage() for r in log.records if r.levelno == logging.WARNING and needle in r.getMessage()]


# ------------------------------------------------------------------------------ annotation files
def test_read_jsonl_and_json(tmp_path):
    recs = [{"clip_id": "a", "text": "x"}, {"clip_id": "b", "text": ["y", "z"]}]
    p1 = tmp_path / "a.jsonl"
    p1.write_text(json.dumps(recs[0]) + "\n\n" + json.dumps(recs[1]) + "\n")
    p2 = tmp_path / "a.json"
    p2.write_text(json.dumps(recs))
    assert read_records(str(p1)) == recs == read_records(str(p2))


def test_malformed_and_missing_annotations(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"clip_id": "a", "text": "x"}\n{"clip_id": "b", "text": \n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        read_records(str(bad))
    with pytest.raises(DataError, match="not found: .*nope.jsonl"):
        read_records(str(tmp_path / "nope.jsonl"))
    no_text = _jsonl(tmp_path / "nt.jsonl", [{"clip_id": "a", "text": "x"}, {"clip_id": "b"}])
    with pytest.raises(DataError, match=r"nt\.jsonl:2: record has no 'text'"):
        load_annotations(no_text, DatasetEntry.from_config({"vis": "v"}))
    no_frames = _jsonl(tmp_path / "nf.jsonl", [{"clip_id": "a", "text": "x"}])
    with pytest.raises(DataError, match=r"nf\.jsonl:1: .*num_frame"):
        load_annotations(no_frames, DatasetEntry.from_config({"vis": "v", "vis_format": "frame"}))
    (tmp_path / "l.json").write_text('{"clip_id": "a"}')
    with pytest.raises(DataError, match="list"):
        read_records(str(tmp_path / "l.json"))


def test_rules_and_paths(tmp_path):
    assert select_rule(DatasetEntry.from_config({"name": "msrvtt-9k", "vis": "x"})).name == "default"
    assert select_rule(DatasetEntry.from_config({"name": "x", "txt": "task/didemo/test.jsonl"})).name == "didemo"
    assert select_rule(DatasetEntry.from_config({"name": "x", "vis": "datasets/lsmdc"})).name == "lsmdc"  # the original's test
    assert select_rule(DatasetEntry.from_config({"name": "actnet", "vis_format": "frame"})).name == "frame"
    assert set(ANNOTATION_RULES) >= {"default", "didemo", "lsmdc", "frame", "hdvila"}
    p = _jsonl(tmp_path / "a.jsonl", [{"clip_id": "sub/video7", "text": ["s1", "s2"]}])
    (rec,) = load_annotations(p, DatasetEntry.from_config({"vis": "V"}))
    assert rec.path == os.path.join("V", "video7.mp4") and rec.texts == ("s1", "s2")
    (rec,) = load_annotations(p, DatasetEntry.from_config({"vis": "V", "name": "didemo-test"}))
    assert rec.texts == ("s1 s2",)  # one paragraph, single spaces
    (rec,) = load_annotations(p, DatasetEntry.from_config({"vis": "V", "name": "lsmdc-1k"}))
    assert rec.path == os.path.join("V", "sub/video7.avi")
    (rec,) = load_annotations(p, DatasetEntry.from_config({"vis": "V"}), rule="hdvila")
    assert rec.path == os.path.join("V", "sub/video7", "sub/video7")


# ------------------------------------------------------------------------------ retrieval formats
def test_msrvtt_like_training(synthetic_data, make_cfg, tokenizer):
    cfg = make_cfg()
    dcfg = {"name": "synthetic-train", "txt": synthetic_data["train"], "vis": synthetic_data["videos"]}
    ds = VideoRetrievalDataset.from_config(cfg, dcfg, tokenizer, training=True)
    records = read_records(synthetic_data["train"])
    assert len(ds) == len(records) == 6
    item = ds[0]
    # Frames leave the dataset as decoded (uint8, 64x64 here); the reader's transform makes them input.
    assert item["video"].shape == (4, 64, 64, 3) and item["video"].dtype == torch.uint8
    assert ds.reader.transform(item["video"]).shape == (4, 3, 32, 32)
    assert item["text"] in records[0]["text"] and item["num_skipped"] == 0
    # One caption per draw, changing from draw to draw, reproducible for a seed.
    drawn = [ds._load(0)["text"] for _ in range(12)]
    assert len(set(drawn)) > 1
    ds.reseed(5)
    again = [ds._load(0)["text"] for _ in range(3)]
    ds.reseed(5)
    assert again == [ds._load(0)["text"] for _ in range(3)]

    # Items seeded by the sampler ((index, seed) keys): the same seed, the same example.
    a, b = ds[(0, 123)], ds[(0, 123)]
    assert a["text"] == b["text"] and torch.equal(a["video"], b["video"])
    assert len({ds[(0, s)]["text"] for s in range(8)}) > 1

    batch = ds.collator([ds[0], ds[1], ds[2]])
    assert batch["video"].shape == (3, 4, 64, 64, 3) and ds.reader.transform(batch["video"]).shape == (3, 4, 3, 32, 32)
    assert batch["load_s"] > 0  # the seconds the items took: the run's loader throughput
    assert batch["text_input_ids"].shape == batch["text_input_mask"].shape == (3, 16)
    assert batch["text_input_ids"][:, 0].eq(49406).all()  # <|startoftext|>, padded to max_txt_len
    assert batch["clip_ids"] == [r["clip_id"] for r in records[:3]]
    assert batch["indices"].tolist() == [0, 1, 2] and batch["num_skipped"] == 0


def test_multi_caption_evaluation(synthetic_data, make_cfg, tokenizer, tmp_path):
    records = read_records(synthetic_data["test"])
    # A list of captions (every one a query), and a clip listed twice (one video).
    records[0] = {**records[0], "text": ["first a", "first b"]}
    records.append({"clip_id": records[1]["clip_id"], "text": "second again"})
    txt = _jsonl(tmp_path / "test.jsonl", records)
    ds = VideoRetrievalDataset.from_config(make_cfg(), {"name": "t", "txt": txt, "vis": synthetic_data["videos"]}, tokenizer)
    assert ds.videos == [r["clip_id"] for r in records[:6]]
    assert ds.texts[:4] == [("first a", 0), ("first b", 0), (records[1]["text"], 1), ("second again", 1)]
    assert len(ds.texts) == 8 and ds.text_to_video() == [v for _, v in ds.texts]
    assert "twin" in ds.records[1].extra or "attrs" in ds.records[1].extra

    videos, texts = ds.video_view(), ds.text_view()
    assert len(videos) == 6 and len(texts) == 8
    vb = ds.collator([videos[i] for i in range(2)])
    assert vb["video"].shape == (2, 4, 64, 64, 3) and "text_input_ids" not in vb
    tb = ds.collator([texts[i] for i in range(3)])
    assert tb["text_input_ids"].shape == (3, 16) and "video" not in tb
    assert tb["indices"].tolist() == [0, 1, 2] and tb["video_indices"].tolist() == [0, 0, 1]
    # Evaluation is deterministic: no jitter, no random caption.
    assert torch.equal(videos[3]["video"], videos[3]["video"])
    long = RetrievalCollator(tokenizer, max_txt_len=6)([{"text": "a b c d e f g h i j", "index": 0}])
    assert long["text_input_ids"].shape == (1, 6) and long["text_input_ids"][0, -1] == 49407  # truncated, EOT kept
    empty = _jsonl(tmp_path / "empty.jsonl", [])
    with pytest.raises(DataError, match="lists no clips"):
        VideoRetrievalDataset.from_config(make_cfg(), {"name": "t", "txt": empty, "vis": synthetic_data["videos"]})


def test_didemo_paragraph(synthetic_data, make_cfg, tmp_path):
    clip = read_records(synthetic_data["test"])[0]["clip_id"]
    txt = _jsonl(tmp_path / "didemo_test.jsonl", [{"clip_id": clip, "text": ["a man walks.", "he sits down."]}])
    dcfg = {"name": "didemo-test", "txt": txt, "vis": synthetic_data["videos"]}
    ds = VideoRetrievalDataset.from_config(make_cfg(), dcfg, training=False)
    assert ds.texts == [("a man walks. he sits down.", 0)]
    train = VideoRetrievalDataset.from_config(make_cfg(), dcfg, training=True)
    assert train[0]["text"] == "a man walks. he sits down."


def test_lsmdc_relative_avi(make_cfg, tmp_path):
    vis = tmp_path / "lsmdc"
    clip_id = "1001_Movie/1001_Movie_00.01.00-00.01.05"
    write_clip(vis / (clip_id + ".avi"), n_frames=8, size=64)
    txt = _jsonl(tmp_path / "test_1k.jsonl", [{"clip_id": clip_id, "text": "someone opens a door"}])
    ds = VideoRetrievalDataset.from_config(make_cfg(), {"name": "lsmdc-1k", "txt": txt, "vis": str(vis)}, training=False)
    assert ds.records[0].path == os.path.join(str(vis), clip_id + ".avi")
    assert ds.video_view()[0]["video"].shape == (4, 64, 64, 3)
    assert scan_readable(ds) == []


def test_activitynet_frame_folders(make_cfg, tmp_path):
    vis = tmp_path / "frames"
    for k in range(2):
        write_frames(vis, f"v_clip{k}", n_frames=32, size=32, seed=k)
    txt = _jsonl(tmp_path / "val1.jsonl", [{"clip_id": f"v_clip{k}", "text": f"clip {k}", "num_frame": 32}
                                           for k in range(2)])
    cfg = make_cfg(train_num_frms=32, test_num_frms=32)
    dcfg = {"name": "actnet-test", "vis_format": "frame", "txt": txt, "vis": str(vis)}
    ds = VideoRetrievalDataset.from_config(cfg, dcfg, training=False)
    assert ds.rule.name == "frame" and ds.records[0].num_frame == 32
    assert ds.video_view()[1]["video"].shape == (32, 32, 32, 3)
    train = VideoRetrievalDataset.from_config(cfg, dcfg, training=True)
    assert train[0]["video"].shape == (32, 32, 32, 3) and ds.load_video(0).shape == (32, 3, 32, 32)
    shutil.rmtree(vis / "v_clip1")
    assert scan_readable(ds) == ["v_clip1"] and ds.videos == ["v_clip0"] and ds.texts == [("clip 0", 0)]


# ------------------------------------------------------------------------------ pretraining
@pytest.fixture
def pretrain_cfg(synthetic_data):
    def make(**kw):
        d = {"name": "hdvila", "vis_format": "video", "txt": synthetic_data["pretrain_subtitles"],
             "vis": synthetic_data["pretrain_videos"], "vid_cap_path": synthetic_data["pretrain_captions"],
             "vid_txt": "subtitle"}
        d.update(kw)
        return d
    return make


def _pretrain_texts(synthetic_data):
    # Through LazyLmdb: a second lmdb.open of files this process already has open is refused.
    subs_db = LazyLmdb(synthetic_data["pretrain_subtitles"])
    subs = {r["clip_id"]: subs_db.get(r["clip_id"]) for r in read_records(synthetic_data["pretrain_subtitles_jsonl"])}
    caps = {r["image_id"]: r["caption"] for r in json.load(open(synthetic_data["pretrain_captions_json"]))}
    return subs, caps


@pytest.mark.parametrize("vid_txt", ["subtitle", "caption", "caption_subtitle_concat", "caption_subtitle_random"])
def test_pretrain_vid_txt_modes(synthetic_data, make_cfg, pretrain_cfg, vid_txt):
    subs, caps = _pretrain_texts(synthetic_data)
    ds = PretrainDataset.from_config(make_cfg(), pretrain_cfg(vid_txt=vid_txt), training=True)
    assert len(ds) == 4
    clip = ds.clip_ids[0]
    assert ds.video_path(0) == os.path.join(synthetic_data["pretrain_videos"], clip.split(".")[0], clip)
    item = ds[0]
    assert item["video"].shape == (4, 64, 64, 3) and "image" not in item
    expected = {"subtitle": {subs[clip]}, "caption": {caps[clip]},
                "caption_subtitle_concat": {caps[clip] + ". with subtitle: " + subs[clip]},
                "caption_subtitle_random": {caps[clip], subs[clip]}}[vid_txt]
    seen = {ds._texts(0)[0] for _ in range(16)}
    assert item["text"] in expected and seen == expected  # random mode: both sides of the coin


def test_pretrain_videoframe_and_collator(synthetic_data, make_cfg, pretrain_cfg, tokenizer):
    _, caps = _pretrain_texts(synthetic_data)
    # Captions from the json list as well as from the LMDB.
    for cap_path in (synthetic_data["pretrain_captions"], synthetic_data["pretrain_captions_json"]):
        ds = PretrainDataset.from_config(make_cfg(), pretrain_cfg(vis_format="videoframe", vid_cap_path=cap_path),
                             training=True, tokenizer=tokenizer)
        item = ds[1]
        assert item["image"].shape == (64, 64, 3) and item["caption"] == caps[ds.clip_ids[1]]
    batch = ds.collator([ds[0], ds[1], ds[2]])
    assert batch["video"].shape == (3, 4, 64, 64, 3) and batch["image"].shape == (3, 64, 64, 3)
    assert ds.reader.transform(batch["image"]).shape == (3, 3, 32, 32) and batch["load_s"] > 0
    assert batch["text_input_ids"].shape == batch["caption_ids"].shape == batch["caption_masks"].shape == (3, 16)
    assert batch["indices"].tolist() == [0, 1, 2] and batch["num_skipped"] == 0
    plain = PretrainDataset.from_config(make_cfg(), pretrain_cfg(), training=True)
    b = PretrainCollator(tokenizer, 16)([plain[0], plain[1]])
    assert b["image"] is None and b["caption_ids"] is None and b["video"].shape == (2, 4, 64, 64, 3)
    with pytest.raises(ConfigError, match="vid_txt"):
        PretrainDataset.from_config(make_cfg(), pretrain_cfg(vid_txt="captions"), training=True)


# ------------------------------------------------------------------------------ bad input
def _bad_video(kind, path, good):
    if kind == "missing":
        return
    data = open(good, "rb").read()
    with open(path, "wb") as f:
        f.write({"empty": b"", "truncated": data[: len(data) // 2], "undecodable": os.urandom(3000)}[kind])


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "undecodable"])
def test_training_replaces_unreadable_video(synthetic_data, make_cfg, tmp_path, clipvip_log, kind):
    vis = tmp_path / "videos"
    shutil.copytree(synthetic_data["videos"], vis)
    records = read_records(synthetic_data["train"])
    bad_path = str(vis / "broken.mp4")
    _bad_video(kind, bad_path, str(vis / (records[0]["clip_id"] + ".mp4")))
    txt = _jsonl(tmp_path / "train.jsonl", [{"clip_id": "broken", "text": "nothing"}] + records[:3])
    ds = VideoRetrievalDataset.from_config(make_cfg(), {"name": "t", "txt": txt, "vis": str(vis)}, training=True)
    item = ds[0]
    assert item["clip_id"] != "broken" and item["video"].shape == (4, 64, 64, 3)
    # Each skip named in the item, for the training process to warn about once (data/bad_samples.py).
    assert item["num_skipped"] == ds.num_skipped == len(item["bad_samples"]) >= 1
    assert all(bad == ("t", bad_path, bad.reason) and bad.reason for bad in item["bad_samples"])
    assert not _warnings(clipvip_log, "skipping")  # not by the dataset: its workers start afresh every epoch
    carried = {k: item[k] for k in ("num_skipped", "bad_samples")}
    batch = RetrievalCollator(None)([{"index": 0, **carried}, {"index": 1, "num_skipped": 0}])
    assert batch["num_skipped"] == len(batch["bad_samples"]) and batch["bad_samples"] == item["bad_samples"]


def test_training_replaces_empty_caption_and_missing_lmdb_key(synthetic_data, make_cfg, pretrain_cfg,
                                                              tmp_path, clipvip_log):
    records = read_records(synthetic_data["train"])[:3]
    txt = _jsonl(tmp_path / "train.jsonl", [{**records[0], "text": ["", "  "]}] + records[1:])
    ds = VideoRetrievalDataset.from_config(make_cfg(), {"name": "t", "txt": txt, "vis": synthetic_data["videos"]},
                               training=True)
    item = ds[0]
    assert item["clip_id"] != records[0]["clip_id"] and item["num_skipped"] >= 1

    # A clip listed in <txt>.jsonl whose subtitle key is missing from the LMDB.
    sub_db = tmp_path / "subs"
    shutil.copytree(synthetic_data["pretrain_subtitles"], sub_db)
    ids = [r["clip_id"] for r in read_records(synthetic_data["pretrain_subtitles_jsonl"])]
    _jsonl(str(sub_db) + ".jsonl", [{"clip_id": "zzzzzzzzzzz.1.mp4"}] + [{"clip_id": c} for c in ids])
    clipvip_log.clear()
    pre = PretrainDataset.from_config(make_cfg(), pretrain_cfg(txt=str(sub_db)), training=True)
    item = pre[0]
    assert item["clip_id"] != "zzzzzzzzzzz.1.mp4" and item["num_skipped"] == len(item["bad_samples"]) >= 1
    assert "zzzzzzzzzzz" in item["bad_samples"][0].sample

    # An empty auxiliary caption in a caption mode.
    caps = [{"image_id": c, "caption": "" if c == ids[0] else "a caption"} for c in ids]
    cap_json = tmp_path / "caps.json"
    cap_json.write_text(json.dumps(caps))
    pre = PretrainDataset.from_config(make_cfg(), pretrain_cfg(vid_txt="caption", vid_cap_path=str(cap_json)), training=True)
    item = pre[0]
    assert item["clip_id"] != ids[0] and item["text"] == "a caption" and item["num_skipped"] >= 1


def test_nothing_readable_is_a_data_error(make_cfg, tmp_path):
    txt = _jsonl(tmp_path / "train.jsonl", [{"clip_id": f"gone{k}", "text": "x"} for k in range(3)])
    ds = VideoRetrievalDataset.from_config(make_cfg(), {"name": "empty-set", "txt": txt, "vis": str(tmp_path)}, training=True)
    with pytest.raises(DataError, match=f"empty-set: {MAX_TRIES} clips in a row could not be read"):
        ds[0]
    assert ds.num_skipped == MAX_TRIES


def test_evaluation_drops_unreadable_videos_with_captions(synthetic_data, make_cfg, tmp_path, clipvip_log):
    vis = tmp_path / "videos"
    shutil.copytree(synthetic_data["videos"], vis)
    records = read_records(synthetic_data["test"])
    records[2] = {**records[2], "text": [records[2]["text"], "another caption"]}
    open(vis / (records[2]["clip_id"] + ".mp4"), "wb").write(os.urandom(2000))
    os.remove(vis / (records[4]["clip_id"] + ".mp4"))
    # Header intact, frame data cut: only a decoding scan finds it.
    cut = str(vis / (records[5]["clip_id"] + ".mp4"))
    data = open(write_clip(cut, n_frames=8, faststart=True), "rb").read()
    open(cut, "wb").write(data[: len(data) // 2])
    txt = _jsonl(tmp_path / "test.jsonl", records)
    ds = VideoRetrievalDataset.from_config(make_cfg(), {"name": "t", "txt": txt, "vis": str(vis)}, training=False)
    assert len(ds.texts) == 7
    with pytest.raises(DataError, match=records[2]["clip_id"]):  # never substituted
        ds.video_view()[2]
    skipped = scan_readable(ds)
    assert skipped == [records[2]["clip_id"], records[4]["clip_id"]] == ds.skipped_clip_ids
    assert ds.videos == [records[i]["clip_id"] for i in (0, 1, 3, 5)]
    assert ds.texts == [(records[i]["text"], k) for k, i in enumerate((0, 1, 3, 5))]
    assert _warnings(clipvip_log, "left out of evaluation")
    assert ds.video_view()[2]["clip_id"] == records[3]["clip_id"]
    assert scan_readable(ds.video_view(), decode=True) == [records[5]["clip_id"]]
    assert ds.videos == [records[i]["clip_id"] for i in (0, 1, 3)] and len(ds.texts) == 3


# ------------------------------------------------------------------------------ loaders
def test_two_workers_open_lmdb_per_worker(synthetic_data, make_cfg, pretrain_cfg, tokenizer, tmp_path):
    sub_db = tmp_path / "subs"
    shutil.copytree(synthetic_data["pretrain_subtitles"], sub_db)
    ids = [r["clip_id"] for r in read_records(synthetic_data["pretrain_subtitles_jsonl"])]
    _jsonl(str(sub_db) + ".jsonl", [{"clip_id": c} for c in ids] + [{"clip_id": "missing0000.1.mp4"}])
    cfg = make_cfg(n_workers=2)
    ds = PretrainDataset.from_config(cfg, pretrain_cfg(txt=str(sub_db), vis_format="videoframe"), training=True,
                         tokenizer=tokenizer)
    # Never pickled: the dataset pickles with its LMDB as a bare path.
    assert ds._texts(0)[0] and ds.subtitles.is_open
    assert vars(pickle.loads(pickle.dumps(ds)).subtitles) == {"path": str(sub_db)}
    # Workers forked while this process holds the LMDB open drop the inherited handle and open
    # their own (py-lmdb refuses a second open of the same files in one process).
    stream = LoaderStream(ds, LoaderSettings.from_config(cfg), rank=0, world_size=1, batch_size=1)
    assert stream.loader.num_workers == 2 and stream.loader.persistent_workers
    batches = [next(stream) for _ in range(stream.sampler.batches_per_epoch)]
    assert len(batches) == 5 and all(b["image"].shape == (1, 64, 64, 3) for b in batches)
    # The missing key was drawn once in the epoch: replaced (in a worker) and counted in the batch.
    assert sum(b["num_skipped"] for b in batches) >= 1
    assert ds.num_skipped == 0  # counted by the worker copies, reported through the batches
    assert ds.subtitles.is_open  # the parent's own handle is untouched

    ds.close()
    stream = LoaderStream(ds, LoaderSettings.from_config(cfg), rank=0, world_size=1, batch_size=2)
    batches = [next(stream) for _ in range(stream.sampler.batches_per_epoch)]
    assert len(batches) == 2 and not ds.subtitles.is_open  # opened in the workers only


def test_eval_loader_shards_contiguously_without_padding(synthetic_data, make_cfg, tokenizer):
    cfg = make_cfg()
    ds = VideoRetrievalDataset.from_config(cfg, {"name": "t", "txt": synthetic_data["test"], "vis": synthetic_data["videos"]},
                               tokenizer)
    texts = ds.text_view()
    seen = []
    for rank in range(4):  # 6 texts on 4 ranks: blocks of 1, 2, 1, 2
        loader = build_eval_loader(texts, LoaderSettings.from_config(cfg), rank=rank, world_size=4, batch_size=4)
        for batch in loader:
            seen.extend(batch["indices"].tolist())
            assert batch["text_input_ids"].shape[1] == 16
    assert seen == list(range(6))  # dataset order, no duplicates, no gaps
    assert [shard_range(6, r, 4) for r in range(4)] == [(0, 1), (1, 3), (3, 4), (4, 6)]
    assert [len(ContiguousShardSampler(2, r, 4)) for r in range(4)] == [0, 1, 0, 1]  # ranks may get nothing
    video_batches = list(build_eval_loader(ds.video_view(), LoaderSettings.from_config(cfg), rank=0, world_size=1))
    assert [b["indices"].tolist() for b in video_batches] == [[0, 1], [2, 3], [4, 5]]


def test_train_stream_shards_and_reshuffles(synthetic_data, make_cfg, tokenizer):
    cfg = make_cfg()
    ds = VideoRetrievalDataset.from_config(cfg, {"name": "t", "txt": synthetic_data["train"], "vis": synthetic_data["videos"]},
                               tokenizer, training=True)
    streams = [LoaderStream(ds, LoaderSettings.from_config(cfg), rank=r, world_size=2, batch_size=3, seed=3) for r in range(2)]
    orders = [[index for index, _ in s.sampler] for s in streams]
    assert sorted(orders[0] + orders[1]) == list(range(6))
    streams[0].sampler.set_position(1, 0)
    assert [index for index, _ in streams[0].sampler] != orders[0]
    batch = next(streams[1])
    assert batch["video"].shape == (3, 4, 64, 64, 3) and batch["indices"].tolist() == orders[1]


def test_resize_kernel_reaches_pretraining_and_search(synthetic_data, make_cfg, pretrain_cfg):
    """``resize_antialias`` decides the pretraining clip and its middle frame (F<->C) as it does
    load_clip (tests/test_fidelity.py), and it is part of what a search index's features mean."""
    import torch.nn.functional as F

    from clipvip.data.sampling import middle_frame_index
    from clipvip.data.transforms import CLIP_MEAN, CLIP_STD
    from clipvip.data.video import load_sampled_frames
    from clipvip.apps.search.encode import config_fingerprint

    items = {}
    for antialias in (0, 1):
        ds = PretrainDataset.from_config(make_cfg(resize_antialias=antialias), pretrain_cfg(vis_format="videoframe"),
                             training=True)
        assert ds.reader.antialias == bool(antialias)
        item = ds[0]
        items[antialias] = {"image": ds.reader.transform(item["image"])}  # made model input as the run makes it
    # The original's middle frame: frame int(F/2), /255, torchvision 0.9's bicubic (no antialias), normalised.
    frames, _ = load_sampled_frames(ds.video_path(0), lambda n: [middle_frame_index(n)])  # (1, 64, 64, 3)
    x = F.interpolate(frames.permute(0, 3, 1, 2).float() / 255.0, size=(32, 32), mode="bicubic", align_corners=False)
    expected = (x[0] - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    assert (items[0]["image"] - expected).abs().max() < 1e-5
    assert (items[1]["image"] - expected).abs().max() > 0.05
    assert config_fingerprint(make_cfg()) != config_fingerprint(make_cfg(resize_antialias=1))
