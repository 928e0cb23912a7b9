"""Issue 24: an evaluation that cannot leak.

A query's plain rank depends on its own scores only: shuffling the test items, or leaving some
videos without captions (fewer texts than videos), changes no remaining query's rank. Checked on
the metrics, and through the real evaluation path (annotation file -> dataset -> ordered encoder
-> metrics). DSL is transductive: invariant to order, not to which queries exist. Every eval
block records its protocol, and a set that chooses ``model_best.pt`` says so in the log and in
``eval_results.json``.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

import clipvip
from clipvip.apps.main import main as clipvip_main
from clipvip.apps.runner import selection_sets
from clipvip.data.loader import LoaderSettings
from clipvip.data.retrieval_dataset import VideoRetrievalDataset
from clipvip.engine.evaluate import encode_retrieval_set, evaluate_retrieval_set, protocol
from clipvip.metrics import evaluate_retrieval, metrics_from_ranks, query_ranks, similarity_chunked

from conftest import write_clip
from tiny_models import released_tiny_model

N_VIDEOS = 10
DIRECTIONS = ("t2v", "v2t", "t2v_dsl", "v2t_dsl")


def keyed_ranks(ranks: dict, texts: list, videos: list) -> dict:
    """Each direction's ranks keyed by what the query is: a text by (caption, clip id), a video by clip id."""
    text_keys = [(caption, videos[v]) for caption, v in texts]
    video_keys = [videos[v] for v in np.unique([v for _, v in texts])]  # the videos with a caption, in order
    return {d: dict(zip(text_keys if d.startswith("t2v") else video_keys, ranks[d].tolist())) for d in DIRECTIONS}


# ---------------------------------------------------------------------------------------------
# The metrics
# ---------------------------------------------------------------------------------------------
def exact_problem(seed: int):
    """Features whose dot products are exact in float32 (multiples of 1/8, small): every tie is
    a tie in any order. Videos 0 and 1 are identical; texts 0 and 1 share video 2."""
    rng = np.random.default_rng(seed)
    videos = rng.integers(-3, 4, size=(N_VIDEOS, 6)).astype(np.float32) / 8
    videos[1] = videos[0]
    text_to_video = [2, 2] + list(range(N_VIDEOS))
    texts = videos[text_to_video] + rng.integers(-2, 3, size=(len(text_to_video), 6)).astype(np.float32) / 8
    return texts, videos, text_to_video


@pytest.mark.parametrize("seed", range(3))
def test_plain_ranks_do_not_depend_on_order(seed):
    texts, videos, text_to_video = exact_problem(seed)
    rng = np.random.default_rng(100 + seed)
    t_perm, v_perm = rng.permutation(len(texts)), rng.permutation(N_VIDEOS)
    where = np.argsort(v_perm)  # old video index -> new
    ranks = query_ranks(texts, videos, text_to_video)
    shuffled = query_ranks(texts[t_perm], videos[v_perm], [where[text_to_video[t]] for t in t_perm])
    np.testing.assert_array_equal(shuffled["t2v"], ranks["t2v"][t_perm])
    np.testing.assert_array_equal(shuffled["v2t"], ranks["v2t"][v_perm])
    assert min(ranks["t2v"][[2, 3]]) >= 2  # texts 2, 3 cannot tell their videos 0, 1 apart: no credit


def test_plain_ranks_do_not_depend_on_missing_captions():
    """Videos 4 and 7 lose every caption, video 2 one of its two: the gallery of text-to-video is
    still every video, so the remaining texts keep their ranks; videos without a caption are no
    video-to-text queries."""
    texts, videos, text_to_video = exact_problem(0)
    keep = [t for t, v in enumerate(text_to_video) if v not in (4, 7) and t != 0]
    ranks = query_ranks(texts, videos, text_to_video)
    fewer = query_ranks(texts[keep], videos, [text_to_video[t] for t in keep])
    np.testing.assert_array_equal(fewer["t2v"], ranks["t2v"][keep])
    assert len(fewer["v2t"]) == N_VIDEOS - 2
    # The videos that lost their captions outrank some remaining texts' videos: leaving them out of
    # the gallery (what an evaluation that drops caption-less clips does) would lift those ranks.
    sim = texts @ videos.T
    assert any(sim[t, [4, 7]].max() >= sim[t, text_to_video[t]] for t in keep)
    assert evaluate_retrieval(texts[keep], videos, [text_to_video[t] for t in keep])["t2v"] == \
        metrics_from_ranks(ranks["t2v"][keep])


def test_dsl_ranks_do_not_depend_on_order():
    """DSL re-scores with a softmax over all test texts (transductive), in any order alike.
    Continuous features: no ties, and no near ties that float sums in another order could flip."""
    rng = np.random.default_rng(7)
    videos = rng.normal(size=(N_VIDEOS, 8)).astype(np.float32)
    text_to_video = list(range(N_VIDEOS)) + [3, 5]
    texts = videos[text_to_video] + rng.normal(size=(len(text_to_video), 8)).astype(np.float32)
    t_perm, v_perm = rng.permutation(len(texts)), rng.permutation(N_VIDEOS)
    where = np.argsort(v_perm)
    ranks = query_ranks(texts, videos, text_to_video)
    shuffled = query_ranks(texts[t_perm], videos[v_perm], [where[text_to_video[t]] for t in t_perm])
    np.testing.assert_array_equal(shuffled["t2v_dsl"], ranks["t2v_dsl"][t_perm])
    np.testing.assert_array_equal(shuffled["v2t_dsl"], ranks["v2t_dsl"][v_perm])
    assert not np.array_equal(ranks["t2v_dsl"], ranks["t2v"])  # DSL re-ranks something here


# ---------------------------------------------------------------------------------------------
# The real evaluation path
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A random tiny CLIP-ViP (the real vocabulary), its released-layout checkpoint and config,
    10 clips, and captions: one per clip, two for clip 3."""
    tmp = tmp_path_factory.mktemp("protocol")
    # Batches of one: a clip's features are then computed alike in every order (batch shapes change
    # float rounding in the last bit on some CPUs, and a near-tie could swap two ranks).
    cfg, model, weights = released_tiny_model(str(tmp), "--test_num_frms", "4", "--test_batch_size", "1",
                                              "--n_workers", "0", "--output_dir", str(tmp / "run"))
    videos = tmp / "videos"
    records = []
    for i in range(N_VIDEOS):
        write_clip(videos / f"clip{i}.mp4", n_frames=6 + i, size=32, seed=i)
        texts = [f"clip {i}: {['a red', 'a blue', 'a green'][i % 3]} square moving {['left', 'right'][i % 2]}"]
        records.append({"clip_id": f"clip{i}", "text": texts + (["another caption of clip 3"] if i == 3 else [])})
    return {"tmp": tmp, "cfg": cfg, "model": model, "weights": weights, "videos": str(videos), "records": records}


def evaluate_file(bench, name: str, records: list):
    """``(per-query ranks keyed by query, eval block, (text features, video features, dataset))`` of
    ``records`` written as an annotation file, through the real evaluation path."""
    txt = bench["tmp"] / f"{name}.jsonl"
    txt.write_text("".join(json.dumps(r) + "\n" for r in records))
    entry = {"name": name, "txt": str(txt), "vis": bench["videos"]}
    cfg, device = bench["cfg"], torch.device("cpu")
    dataset = VideoRetrievalDataset.from_config(cfg, entry, clipvip.build_tokenizer(cfg), training=False)
    loader = LoaderSettings.from_config(cfg)
    video_feats, text_feats = encode_retrieval_set(bench["model"], dataset, loader, "fp32", device)
    ranks = query_ranks(text_feats, video_feats, dataset.text_to_video())
    block = evaluate_retrieval_set(bench["model"], dataset, loader, "fp32", device)
    return keyed_ranks(ranks, dataset.texts, dataset.videos), block, (text_feats, video_feats, dataset)


def test_evaluation_is_invariant_to_order_and_missing_captions(bench):
    records = bench["records"]
    ranks, block, (text_feats, video_feats, dataset) = evaluate_file(bench, "ordered", records)
    assert block["n_videos"] == N_VIDEOS and block["n_texts"] == N_VIDEOS + 1

    order = np.random.default_rng(0).permutation(N_VIDEOS)
    shuffled_ranks, shuffled, _ = evaluate_file(bench, "shuffled", [records[i] for i in order])
    assert shuffled_ranks == ranks  # every query of every direction, DSL included
    for direction in DIRECTIONS:
        assert shuffled[direction] == pytest.approx(block[direction])

    # Clips 4 and 7 lose every caption, clip 3 one of its two: 10 videos, 8 texts.
    fewer = [{**r, "text": [] if r["clip_id"] in ("clip4", "clip7") else r["text"][:1]} for r in records]
    fewer_ranks, fewer_block, _ = evaluate_file(bench, "fewer", [fewer[i] for i in order])
    assert fewer_block["n_videos"] == N_VIDEOS and fewer_block["n_texts"] == N_VIDEOS - 2
    assert fewer_block["skipped_videos"] == []
    assert fewer_ranks["t2v"] == {key: ranks["t2v"][key] for key in fewer_ranks["t2v"]}
    assert len(fewer_ranks["t2v"]) == N_VIDEOS - 2 and set(fewer_ranks["v2t"]) == set(ranks["v2t"]) - {"clip4", "clip7"}
    assert fewer_block["t2v"] == pytest.approx(metrics_from_ranks(list(fewer_ranks["t2v"].values())))
    # The test can fail: the caption-less clips outrank some remaining caption's clip, so a gallery
    # without them would lift that caption's rank.
    sim = similarity_chunked(text_feats, video_feats)
    gone = [dataset.videos.index("clip4"), dataset.videos.index("clip7")]
    assert any(sim[t, gone].max() >= sim[t, v] for t, (_, v) in enumerate(dataset.texts) if v not in gone)


def test_a_test_set_without_any_caption_is_one_line_naming_its_file(bench):
    txt = bench["tmp"] / "silent.jsonl"
    txt.write_text("".join(json.dumps({**r, "text": []}) + "\n" for r in bench["records"]))
    with pytest.raises(clipvip.DataError, match=r"silent.jsonl: no clip has a non-empty caption"):
        VideoRetrievalDataset.from_config(bench["cfg"], {"name": "silent", "txt": str(txt), "vis": bench["videos"]},
                                          training=False)


# ---------------------------------------------------------------------------------------------
# The protocol beside the numbers
# ---------------------------------------------------------------------------------------------
class Named:
    """What :func:`selection_sets` reads of an evaluation set."""

    def __init__(self, name, videos, texts):
        self.name, self.videos, self.texts = name, videos, texts


def changed(cfg, **values):
    return clipvip.Config({**cfg, **values})


def test_the_set_that_chooses_model_best_is_named(bench):
    cfg = bench["cfg"]
    test = Named("msrvtt-1ka", ["v0", "v1"], [("a", 0), ("b", 1)])
    again = Named("msrvtt-1ka-again", ["v0", "v1"], [("a", 0), ("b", 1)])
    other = Named("didemo", ["w0"], [("c", 0)])
    assert selection_sets(changed(cfg, is_train=True, e2e_weights_path=None), [test, other, again]) == \
        ["msrvtt-1ka", "msrvtt-1ka-again"]
    assert selection_sets(changed(cfg, is_train=False, e2e_weights_path="run/ckpt/model_best.pt"),
                          [other, test]) == ["didemo"]
    # weights no validation of this config chose: a step's checkpoint, released weights, none at all
    for weights in ("run/ckpt/model_step_40.pt", "pretrain_clipvip_base_32.pt", None):
        assert selection_sets(changed(cfg, is_train=False, e2e_weights_path=weights), [test]) == []
    assert protocol(True)["selected_on_this_set"] is True and "transductive" in protocol(False)["dsl"]


@pytest.mark.parametrize("weights", ["model_best.pt", "model_step_8.pt", None], ids=["best", "step", "zero-shot"])
def test_eval_results_carry_the_protocol(bench, weights, tmp_path):
    """The official configs' layout: val_datasets and inference_datasets are the same test file.
    Only a model_best.pt was chosen on it."""
    if weights:
        os.makedirs(tmp_path / "ckpt")
        weights = shutil.copy(bench["weights"], tmp_path / "ckpt" / weights)
    chosen = weights is not None and os.path.basename(weights) == "model_best.pt"
    txt = tmp_path / "test.jsonl"
    txt.write_text("".join(json.dumps(r) + "\n" for r in bench["records"]))
    entry = {"name": "tiny-test", "txt": str(txt), "vis": bench["videos"]}
    cfg = changed(bench["cfg"], val_datasets=[entry], inference_datasets=[entry], output_dir=str(tmp_path / "run"))
    config = clipvip.save_config(cfg, str(tmp_path), "config.json")
    args = ["retrieval", "--config", config] + (["--e2e_weights_path", str(weights)] if weights else [])
    assert clipvip_main(args) == 0
    block = json.loads((tmp_path / "run" / "eval_results.json").read_text())["tiny-test"]
    assert block["protocol"] == protocol(chosen)
    log = (tmp_path / "run" / "log" / "log.txt").read_text()
    lines = [line for line in log.splitlines() if "not a held-out score" in line]
    assert len(lines) == (1 if chosen else 0)
    if chosen:
        assert "[tiny-test] training with this config chooses model_best.pt" in lines[0]
