"""Options the demo relies on: in-memory clip cache, twins sharing a batch, gradient backdrop,
temporal embedding init."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clipvip.data.loader import LoaderSettings, LoaderStream, ResumableSampler, partner_groups  # noqa: E402
from clipvip.data.retrieval_dataset import VideoRetrievalDataset  # noqa: E402
from clipvip.apps.synthetic import generate  # noqa: E402
from clipvip.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def twins_data(tmp_path_factory):
    """12 training clips, 10 of them in time-reversed twin pairs."""
    out = tmp_path_factory.mktemp("twins")
    return generate(str(out), n_train=12, n_test=4, seed=2, size=32, frames=8, twin_fraction=0.8,
                    n_pretrain_videos=0, frame_folders=False, workers=1)


def _train_set(cfg, data, tokenizer):
    return VideoRetrievalDataset.from_config(cfg, {"name": "t", "txt": data["train"], "vis": data["videos"]}, tokenizer,
                                 training=True)


def test_cached_clips_equal_decoded_clips(twins_data, make_cfg, tokenizer):
    plain = _train_set(make_cfg(), twins_data, tokenizer)
    cached = _train_set(make_cfg(cache_clips=1), twins_data, tokenizer)
    assert plain.reader.cache is None and cached.reader.cache == {}
    for key in [(0, 11), (3, 12), (0, 13), (5, 14)]:  # (index, seed): the same jitter on both sides
        a, b = plain[key], cached[key]
        assert a["text"] == b["text"]
        assert torch.equal(a["video"], b["video"])
    assert len(cached.reader.cache) == 3  # clip 0 decoded once, then read from memory
    assert next(iter(cached.reader.cache.values())).shape == (8, 32, 32, 3)


def test_cached_frame_folders(make_cfg, tmp_path):
    from conftest import write_frames

    write_frames(tmp_path / "frames", "v0", n_frames=10, size=32)
    records = tmp_path / "anet.jsonl"
    records.write_text('{"clip_id": "v0", "text": "a clip", "num_frame": 10}\n')
    entry = {"name": "anet", "txt": str(records), "vis": str(tmp_path / "frames"), "vis_format": "frame"}
    plain = VideoRetrievalDataset.from_config(make_cfg(), entry, training=False)
    cached = VideoRetrievalDataset.from_config(make_cfg(cache_clips=1), entry, training=False)
    assert torch.equal(plain.load_video(0), cached.load_video(0))
    assert torch.equal(cached.load_video(0), cached.load_video(0))
    assert list(cached.reader.cache.values())[0].shape[0] == 10


def test_partner_groups():
    assert partner_groups([1, 0, -1, 4, 3, 2]) == [(0, 1), (2,), (3, 4), (5,)]  # 5 -> 2 is not mutual


def test_twins_share_a_batch(twins_data, make_cfg, tokenizer):
    cfg = make_cfg(train_pair_field="twin")
    ds = _train_set(cfg, twins_data, tokenizer)
    partners = ds.partners("twin")
    assert sum(p >= 0 for p in partners) == 10
    assert all(partners[p] == i for i, p in enumerate(partners) if p >= 0)
    stream = LoaderStream(ds, LoaderSettings.from_config(cfg), rank=0, world_size=1, batch_size=6, seed=1)
    for epoch in range(3):
        stream.sampler.set_position(epoch, 0)
        order = [index for index, _ in stream.sampler]
        assert sorted(order) == list(range(12))
        for i, p in enumerate(partners):  # partners sit next to each other
            if p >= 0:
                assert abs(order.index(i) - order.index(p)) == 1
    batch = next(stream)
    ids = batch["clip_ids"]
    paired = [c for c in ids if ds.records[ds.videos.index(c)].extra.get("twin") in ids]
    assert len(paired) >= 4  # at most one pair of 6 clips is cut by the batch boundary


def test_paired_sampler_shards_over_ranks():
    partners = [1, 0, 3, 2, -1, 6, 5, -1, -1]
    shares = [ResumableSampler(9, 2, seed=0, rank=r, world_size=2, partners=partners).rank_indices(0)
              for r in range(2)]
    assert all(len(s) == 5 for s in shares)
    assert set(shares[0]) | set(shares[1]) == set(range(9))
    assert not set(shares[0]) & set(shares[1]) or len(set(shares[0]) & set(shares[1])) == 1  # one pad
    for share in shares:
        for i in share:
            if partners[i] >= 0:
                assert partners[i] in share


def test_pair_field_needs_partners(make_cfg):
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return i

    with pytest.raises(ConfigError, match="train_pair_field"):
        LoaderStream(Plain(), LoaderSettings.from_config(make_cfg(train_pair_field="twin")), 0, 1, collate_fn=list)


def test_gradient_backdrop_shows_position_and_keeps_twins_exact():
    import dataclasses

    import numpy as np

    from clipvip.apps.synthetic import BACKDROP_TINT, draw_test_specs, render_clip

    specs = dict((s.clip_id, (s, t)) for s, t in draw_test_specs(20, seed=0, twin_fraction=0.7))
    spec, twin_id = next(v for v in specs.values() if v[1] is not None)
    grad = dataclasses.replace(spec, backdrop="gradient")
    twin = dataclasses.replace(specs[twin_id][0], backdrop="gradient")
    a, b = render_clip(grad, 32, 32, 8), render_clip(twin, 32, 32, 8)
    assert np.array_equal(a, b[::-1]) and not np.array_equal(a, b)
    plain = render_clip(spec, 32, 32, 8)
    corner = a[0, -1, -1].astype(int) - plain[0, -1, -1].astype(int)  # bottom right: most tint
    assert corner[0] > 0.9 * BACKDROP_TINT - 1 and corner[1] == 0 and corner[2] > 0.9 * BACKDROP_TINT - 1
    assert (np.abs(a[0, 0, 0].astype(int) - plain[0, 0, 0]) <= 2).all()  # top left: almost none
    with pytest.raises(ValueError, match="backdrop"):
        render_clip(dataclasses.replace(spec, backdrop="stripes"), 32, 32, 8)


def test_temporal_init_std(tmp_path):
    from tiny_models import tiny_cfg, write_hf_clip

    from clipvip.model import build_model

    folder = str(tmp_path / "clip")
    write_hf_clip(folder)
    zeros = build_model(tiny_cfg(folder)).clipmodel.vision_model.embeddings.temporal_embedding
    assert torch.count_nonzero(zeros) == 0  # the original: a CLIP-initialised model starts as image CLIP
    model = build_model(tiny_cfg(folder, temporal_init_std=1.0))  # CLIP weights loaded, temporal fresh
    embed = model.clipmodel.vision_model.embeddings.temporal_embedding
    assert 0.7 < float(embed.std()) < 1.3
    model.clipmodel.init_weights()
    assert 0.7 < float(embed.std()) < 1.3 and not torch.equal(embed, zeros)
