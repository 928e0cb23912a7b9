"""WebDataset shards (clipvip.data.shards): shard lists, the epoch's deal and plan, exact resume, bad data."""
from __future__ import annotations

import json
import logging
import os
import random
from collections import Counter

import pytest
import torch

from clipvip.config import load_config
from clipvip.data.shard_index import ShardInfo, read_index, write_index
from clipvip.data import shards as S
from clipvip.errors import ConfigError
from shard_helpers import add_member, synthetic_samples, write_shards

N_SAMPLES = 24


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    from clipvip.apps import synthetic

    root = tmp_path_factory.mktemp("shard_clips")
    paths = synthetic.generate(str(root / "data"), n_train=N_SAMPLES, n_test=2, seed=3, size=32, frames=8,
                               n_pretrain_videos=1, clips_per_video=1, frame_folders=False, workers=1)
    return synthetic_samples(paths)


@pytest.fixture
def shard_dir(clips, tmp_path):
    """24 samples in 8 shards of 3, with an index."""
    paths = write_shards(str(tmp_path / "shards"), clips, [3] * 8)
    write_index(str(tmp_path / "shards" / "shards.json"), [ShardInfo(p, 3) for p in paths])
    return tmp_path / "shards"


def make_stream(shard_dir, tokenizer, *, rank=0, world=1, workers=0, batch=2, buffer=4, shards=None, **entry):
    cfg = load_config(None, [])
    cfg.update(train_n_clips=1, train_num_frms=2, input_res=[32, 32], max_txt_len=16, n_workers=workers, pin_mem=0,
               train_batch_size=batch, seed=5)
    entry = {"name": "shards", "vis_format": "webdataset", "shards": shards or str(shard_dir / "{00000..00007}.tar"),
             "text_field": "captions", "shuffle_buffer": buffer, **entry}
    return S.ShardStream.from_config(cfg, entry, tokenizer, rank, world)


def take(stream, n):
    return [next(stream) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- lists
def test_shard_lists_braces_globs_text_files_and_lists(shard_dir, tmp_path):
    braces = S.expand_shards(str(shard_dir / "{00000..00007}.tar"))
    assert [os.path.basename(u) for u in braces] == [f"{k:05d}.tar" for k in range(8)]
    assert S.expand_shards(str(shard_dir / "*.tar")) == braces
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\n" + "\n".join(os.path.basename(u) for u in braces[:2]) + "\n")
    os.replace(listing, shard_dir / "list.txt")
    assert S.expand_shards(str(shard_dir / "list.txt")) == braces[:2]
    assert S.expand_shards([braces[0], str(shard_dir / "{00006..00007}.tar")]) == [braces[0]] + braces[6:]


def test_a_shard_list_that_matches_nothing_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="match no file"):
        S.expand_shards(str(tmp_path / "{00000..00009}.tar"))
    (tmp_path / "00000.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="9 of 10 shards not found"):
        S.expand_shards(str(tmp_path / "{00000..00009}.tar"))


def test_pipe_urls_need_the_environment_not_the_config(monkeypatch):
    monkeypatch.delenv(S.PIPE_ENV, raising=False)
    with pytest.raises(ConfigError, match="CLIPVIP_ALLOW_PIPE"):
        S.expand_shards("pipe:cat /x/{0..1}.tar")
    monkeypatch.setenv(S.PIPE_ENV, "1")
    assert S.expand_shards("pipe:cat /x/{0..1}.tar") == ["pipe:cat /x/0.tar", "pipe:cat /x/1.tar"]


def test_pipe_and_file_urls_read_the_same_samples(shard_dir, monkeypatch):
    monkeypatch.setenv(S.PIPE_ENV, "1")
    path = str(shard_dir / "00001.tar")
    direct = list(S.iter_shard_samples(path))
    piped = list(S.iter_shard_samples(f"pipe:cat {path}"))
    assert [s["__key__"] for s in direct] == [f"00001{i:04d}" for i in range(3)]
    assert [(s["__key__"], s["mp4"], s["json"]) for s in piped] == [(s["__key__"], s["mp4"], s["json"]) for s in direct]
    assert list(S.iter_shard_samples("file:" + path))[0]["mp4"] == direct[0]["mp4"]


# ---------------------------------------------------------------------------------------------- index
def test_without_an_index_shards_are_counted_once_and_cached(clips, tmp_path, monkeypatch):
    monkeypatch.setenv(S.CACHE_ENV, str(tmp_path / "cache"))
    urls = write_shards(str(tmp_path / "s"), clips, [3, 5])
    assert S.shard_counts(urls) == [3, 5]
    cached = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert len(cached) == 1 and [s.samples for s in read_index(cached[0])] == [3, 5]
    monkeypatch.setattr(S, "count_shard", lambda url: pytest.fail("counted again"))
    assert S.shard_counts(urls) == [3, 5]


def test_the_index_beside_the_shards_is_used_and_a_missing_one_named(shard_dir):
    urls = S.expand_shards(str(shard_dir / "{00000..00007}.tar"))
    assert S.shard_counts(urls) == [3] * 8
    with pytest.raises(ConfigError, match="shard_index .* not found"):
        S.shard_counts(urls, str(shard_dir / "nope.json"))


# ---------------------------------------------------------------------------------------------- plan
def test_buffer_plan_is_a_permutation_bounded_by_the_buffer():
    plan = S.buffer_plan(1000, 16, seed=1)
    assert sorted(plan) == list(range(1000))
    assert S.buffer_plan(50, 1, seed=1) == list(range(50))
    # output k is read by then: a position is emitted no earlier than it is read, at most ~buffer before it
    assert all(p <= k + 15 for k, p in enumerate(plan))
    assert plan != S.buffer_plan(1000, 16, seed=2)


def test_the_deal_balances_readers_and_changes_per_epoch():
    counts = [10, 9, 10, 8, 10, 10, 7, 10]
    dealt = S.deal_shards(counts, 3, seed=0, epoch=0)
    assert sorted(s for d in dealt for s in d) == list(range(8))
    loads = [sum(counts[s] for s in d) for d in dealt]
    assert max(loads) - min(loads) <= max(counts)
    assert dealt == S.deal_shards(counts, 3, seed=0, epoch=0)
    assert dealt != S.deal_shards(counts, 3, seed=0, epoch=1)


def test_fewer_shards_than_readers_is_one_line(shard_dir, tokenizer):
    with pytest.raises(ConfigError, match="8 shards for 12 readers"):
        make_stream(shard_dir, tokenizer, world=4, workers=3)


# ---------------------------------------------------------------------------------------------- epochs
@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_per_epoch_across_ranks_and_workers(shard_dir, tokenizer, workers):
    world, batch = 2, 2
    readers = world * max(workers, 1)
    per_rank = N_SAMPLES // (readers * batch) * max(workers, 1)  # batches per rank and epoch
    seen = {0: [], 1: []}
    for rank in range(world):
        stream = make_stream(shard_dir, tokenizer, rank=rank, world=world, workers=workers, batch=batch)
        assert stream.batches_per_epoch == per_rank
        for epoch in (0, 1):
            batches = take(stream, per_rank)
            assert all(b["video"].shape[:2] == (batch, 2) and b["video"].dtype == torch.uint8 for b in batches)
            seen[epoch] += [i for b in batches for i in b["indices"].tolist()]
            assert stream.epoch == epoch
    assert sorted(seen[0]) == list(range(N_SAMPLES)) == sorted(seen[1])
    assert seen[0] != seen[1]  # reshuffled


def test_unequal_shards_give_every_rank_the_same_steps(clips, tmp_path, tokenizer):
    paths = write_shards(str(tmp_path / "s"), clips, [7, 2, 5, 1, 6, 3])
    write_index(str(tmp_path / "s" / "shards.json"), [ShardInfo(p, n) for p, n in zip(paths, [7, 2, 5, 1, 6, 3])])
    streams = [make_stream(tmp_path / "s", tokenizer, rank=r, world=2, workers=0, batch=2,
                           shards=str(tmp_path / "s" / "*.tar")) for r in range(2)]
    assert streams[0].batches_per_epoch == streams[1].batches_per_epoch == 24 // (2 * 2)
    ids = [i for s in streams for b in take(s, s.batches_per_epoch) for i in b["indices"].tolist()]
    assert len(ids) == 24  # every rank's reader got its quota, topping up from its own plan if short
    assert len(set(ids)) >= 20


def batch_signature(batch):
    return (batch["indices"].tolist(), batch["text_input_ids"].tolist(), batch["video"].sum().item())


@pytest.mark.parametrize("workers,stop", [(0, 5), (2, 3), (2, 11), (2, 12), (2, 13)])
def test_resume_continues_at_the_next_sample(shard_dir, tokenizer, workers, stop):
    """Two epochs of 12 batches, stopped mid-epoch (3: worker 1's turn), one before, at and after
    the epoch end: the same batches as without the stop."""
    full = make_stream(shard_dir, tokenizer, workers=workers, batch=2)
    expected = [batch_signature(b) for b in take(full, 24)]
    first = make_stream(shard_dir, tokenizer, workers=workers, batch=2)
    got = [batch_signature(b) for b in take(first, stop)]
    state = json.loads(json.dumps(first.state_dict()))  # what the training state stores
    resumed = make_stream(shard_dir, tokenizer, workers=workers, batch=2)
    resumed.load_state_dict(state)
    got += [batch_signature(b) for b in take(resumed, 24 - stop)]
    assert got == expected


def test_resume_with_other_n_workers_is_refused(shard_dir, tokenizer):
    stream = make_stream(shard_dir, tokenizer, workers=0)
    take(stream, 1)
    other = make_stream(shard_dir, tokenizer, workers=2)
    with pytest.raises(ConfigError, match="resume with --n_workers 1"):
        other.load_state_dict(stream.state_dict())


# ---------------------------------------------------------------------------------------------- bad data
def test_a_corrupt_member_and_a_truncated_shard_are_skipped(shard_dir, tokenizer, caplog):
    # 00002.tar: its second video replaced by garbage; 00004.tar: cut in the middle of its third sample.
    import tarfile

    members = []
    with tarfile.open(shard_dir / "00002.tar") as tar:
        for m in tar.getmembers():
            members.append((m.name, tar.extractfile(m).read()))
    with tarfile.open(shard_dir / "00002.tar", "w") as tar:
        for name, data in members:
            add_member(tar, name, b"\x00\x00\x00\x18ftypisom not a video" if name == "000020001.mp4" else data)
    raw = (shard_dir / "00004.tar").read_bytes()
    with tarfile.open(shard_dir / "00004.tar") as tar:
        cut = tar.getmember("000040002.mp4").offset_data + 100
    (shard_dir / "00004.tar").write_bytes(raw[:cut])
    stream = make_stream(shard_dir, tokenizer, workers=0, batch=2)
    with caplog.at_level(logging.WARNING, logger="clipvip"):
        batches = take(stream, stream.batches_per_epoch)
    assert all(len(b["indices"]) == 2 for b in batches)
    skipped = sum(b["num_skipped"] for b in batches)
    assert skipped == 1 + 1  # the corrupt member; the truncated shard's last sample
    seen = Counter(i for b in batches for i in b["indices"].tolist())
    assert 7 not in seen and 14 not in seen  # 2*3+1; 4*3+2
    # Named in the batches (the training process warns once per run about each, data/bad_samples.py):
    # the member by shard and key, the truncated shard's lost sample by the shard.
    bad = [s for b in batches for s in b.get("bad_samples", ())]
    assert [s.sample for s in bad] == [str(shard_dir / "00002.tar") + ":000020001", str(shard_dir / "00004.tar")]
    assert "00004.tar unreadable after 2 of 3 samples" in bad[1].reason and all(s.dataset == "shards" for s in bad)
    assert "skipping" not in caplog.text  # not in the reader: its workers start afresh every epoch


def test_a_missing_text_is_a_skipped_sample(clips, tmp_path, tokenizer):
    paths = write_shards(str(tmp_path / "s"), clips, [4, 4])
    stream = make_stream(tmp_path / "s", tokenizer, shards=str(tmp_path / "s" / "*.tar"), text_field="subtitle")
    with pytest.raises(Exception, match="no readable sample"):
        take(stream, 1)


def test_text_from_a_member_and_a_pretraining_caption_field(shard_dir, tokenizer):
    cfg = load_config(None, [])
    cfg.update(train_n_clips=1, train_num_frms=2, input_res=[32, 32], max_txt_len=16, n_workers=0, pin_mem=0,
               train_batch_size=2, seed=5)
    entry = {"name": "pt", "vis_format": "webdataset", "shards": str(shard_dir / "*.tar"), "text_field": "txt",
             "caption_field": "captions", "vid_txt": "caption"}
    stream = S.ShardStream.from_config(cfg, entry, tokenizer, 0, 1, kind="pretrain")
    batch = next(stream)
    assert batch["image"].shape[0] == 2 and batch["image"].shape[-1] == 3 and batch["caption_ids"].shape == (2, 16)
    assert batch["text_input_ids"].shape == (2, 16)


def test_blob_mount_dir_joins_local_shard_paths_not_urls(tmp_path):
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps({"train_datasets": [
        {"name": "a", "vis_format": "webdataset", "shards": "hdvila/{00000..00009}.tar", "shard_index": "hdvila/shards.json"},
        {"name": "b", "vis_format": "webdataset", "shards": ["s3://bucket/x/{0..1}.tar", "local/y.tar"]}]}))
    cfg = load_config(str(cfg_path), ["--blob_mount_dir", "/mnt"])
    a, b = cfg.train_datasets
    assert a.shards == "/mnt/hdvila/{00000..00009}.tar" and a.shard_index == "/mnt/hdvila/shards.json"
    assert b.shards == ["s3://bucket/x/{0..1}.tar", "/mnt/local/y.tar"]


def test_a_training_set_given_as_json_on_the_command_line():
    cfg = load_config(None, ["--train_datasets", '{"name": "m", "vis_format": "webdataset", "shards": "s/*.tar"}'])
    assert cfg.train_datasets[0].shards == "s/*.tar" and cfg.train_datasets[0].text_field == "txt"
    with pytest.raises(ConfigError, match="invalid JSON"):
        load_config(None, ["--train_datasets", '{"name": "m",'])


def test_empty_shards_are_left_out(clips, tmp_path, tokenizer):
    paths = write_shards(str(tmp_path / "s"), clips, [4, 0, 4])
    write_index(str(tmp_path / "s" / "shards.json"), [ShardInfo(p, n) for p, n in zip(paths, [4, 0, 4])])
    stream = make_stream(tmp_path / "s", tokenizer, shards=str(tmp_path / "s" / "*.tar"), world=2, batch=2)
    assert len(stream.dataset.shards.urls) == 2 and stream.batches_per_epoch == 2
    assert len(take(stream, 2)) == 2


def test_clipvip_shard_index_writes_the_index_of_foreign_shards(clips, tmp_path, tokenizer):
    from clipvip.apps.shard import main as shard_main

    paths = write_shards(str(tmp_path / "v2d"), clips, [5, 3, 4])
    raw = open(paths[2], "rb").read()
    open(paths[2], "wb").write(raw[: len(raw) // 2])  # truncated: indexed as far as it reads
    assert shard_main(["--index", str(tmp_path / "v2d" / "{00000..00002}.tar"), "--workers", "2", "--no_progress"]) == 0
    shards = read_index(str(tmp_path / "v2d" / "shards.json"))
    assert [s.samples for s in shards][:2] == [5, 3] and 0 < shards[2].samples < 4
    assert S.shard_counts(paths) == [s.samples for s in shards]
