"""Issue 24: CLIP-ViP as an MTEB model (clipvip.integrations.mteb), offline.

A tiny released-layout checkpoint is converted with ``clipvip convert``; mteb's own evaluation
runs it on two retrieval tasks built here (text-to-video and video-to-text over the same clips and
captions, videos in a ``datasets.Video`` column as in mteb's video tasks), and its scores must be
those of ``clipvip retrieval --is_train 0`` on the same files: per query, through mteb's saved
predictions, and as mteb's own hit rates.
"""
from __future__ import annotations

import json
import os
import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch

try:
    import mteb
except ImportError:  # requirements-dev.txt installs it, so `make test` runs this file
    if os.environ.get("CI"):
        raise
    pytest.skip("mteb is not installed (pip install -r requirements-dev.txt, or clipvip[mteb])",
                allow_module_level=True)
from datasets import Dataset, Video
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.models.model_meta import ScoringFunction

import clipvip
from clipvip.apps.main import main as clipvip_main
from clipvip.data.video import VideoBytes
from clipvip.errors import CheckpointError, DataError
from clipvip.integrations.mteb import (FINE_TUNING_TASKS, CLIPViPEncoder, load_encoder, model_meta,
                                       video_source)
from clipvip.metrics import metrics_from_ranks

from conftest import write_clip
from tiny_models import released_tiny_model

N_VIDEOS = 10
TWO_CAPTIONS = (2, 6)  # these clips have a second caption: more texts than videos
METRICS = ("R1", "R5", "R10", "MdR", "MnR")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """A converted tiny CLIP-ViP (real vocabulary, 4 frames, 32 px), 10 clips, 12 captions, and
    the ``clipvip retrieval --is_train 0`` results on them."""
    tmp = tmp_path_factory.mktemp("mteb")
    # Batches of one here and in mteb's run below: each clip and caption is computed alike by both
    # (batch shapes change float rounding in the last bit on some CPUs; ranks compare exactly).
    cfg, model, weights = released_tiny_model(str(tmp), "--test_num_frms", "4", "--test_batch_size", "1",
                                              "--n_workers", "0", "--output_dir", str(tmp / "eval"))
    folder = str(tmp / "converted")
    assert clipvip_main(["convert", "--config", clipvip.save_config(cfg, str(tmp), "convert.json"),
                         "--weights", weights, "--out", folder]) == 0

    videos, records = tmp / "videos", []
    for i in range(N_VIDEOS):
        write_clip(videos / f"clip{i}.mp4", n_frames=6 + i, size=64, seed=i)
        texts = [f"clip {i}: a {['red', 'blue', 'green'][i % 3]} square moving {['left', 'right'][i % 2]}"]
        records.append({"clip_id": f"clip{i}", "text": texts + ([f"another caption of clip {i}"]
                                                                 if i in TWO_CAPTIONS else [])})
    txt = tmp / "test.jsonl"
    txt.write_text("".join(json.dumps(r) + "\n" for r in records))
    entry = {"name": "tiny-test", "txt": str(txt), "vis": str(videos)}
    config = clipvip.save_config(clipvip.Config({**cfg, "inference_datasets": [entry]}), str(tmp), "eval.json")
    assert clipvip_main(["retrieval", "--config", config, "--e2e_weights_path", folder, "--is_train", "0"]) == 0
    results = json.loads((tmp / "eval" / "eval_results.json").read_text())["tiny-test"]
    return {"tmp": tmp, "folder": folder, "videos": str(videos), "records": records, "results": results,
            "model": model}


# ---------------------------------------------------------------------------------------------
# Two retrieval tasks over the bench's clips, as mteb's video tasks are built
# ---------------------------------------------------------------------------------------------
def task_metadata(name: str, category: str) -> TaskMetadata:
    return TaskMetadata(name=name, description="clips and captions written by the test", reference=None,
                        dataset={"path": "local/none", "revision": "none"}, type="Any2AnyRetrieval",
                        category=category, modalities=["text", "video"], eval_splits=["test"],
                        eval_langs=["eng-Latn"], main_score="ndcg_at_10", date=("2026-01-01", "2026-01-01"),
                        domains=[], task_subtypes=[], license="mit", annotations_creators="derived", dialect=[],
                        sample_creation="created", bibtex_citation="")


def split_data(bench, text_queries: bool) -> RetrievalSplitData:
    pairs = [(text, r["clip_id"]) for r in bench["records"] for text in r["text"]]
    captions = [(f"t{k}", text, clip_id) for k, (text, clip_id) in enumerate(pairs)]  # (id, caption, its clip)
    texts = Dataset.from_dict({"id": [c[0] for c in captions], "text": [c[1] for c in captions]})
    clip_ids = [r["clip_id"] for r in bench["records"]]
    videos = Dataset.from_dict({"id": clip_ids, "video": [os.path.join(bench["videos"], f"{c}.mp4") for c in clip_ids]})
    videos = videos.cast_column("video", Video())  # decoded by torchcodec if read: the encoder must not
    if text_queries:
        qrels = {t: {clip_id: 1} for t, _, clip_id in captions}
        return RetrievalSplitData(queries=texts, corpus=videos, relevant_docs=qrels, top_ranked=None)
    qrels = {clip_id: {t: 1 for t, _, c in captions if c == clip_id} for clip_id in clip_ids}
    return RetrievalSplitData(queries=videos, corpus=texts, relevant_docs=qrels, top_ranked=None)


class TinyT2V(AbsTaskRetrieval):
    metadata = task_metadata("TinyClipsT2V", "t2v")

    def load_data(self, **kwargs):
        self.dataset = {"default": {"test": split_data(self.bench, text_queries=True)}}
        self.data_loaded = True


class TinyV2T(AbsTaskRetrieval):
    metadata = task_metadata("TinyClipsV2T", "v2t")

    def load_data(self, **kwargs):
        self.dataset = {"default": {"test": split_data(self.bench, text_queries=False)}}
        self.data_loaded = True


def pessimistic_ranks(predictions: dict, qrels: dict) -> list[int]:
    """Per query: 1 + the documents that are not relevant and score at least as high as its best relevant one."""
    ranks = []
    for query, scores in predictions.items():
        best = max(scores[doc] for doc in qrels[query])
        ranks.append(1 + sum(1 for doc, s in scores.items() if doc not in qrels[query] and s >= best))
    return ranks


@pytest.fixture(scope="module")
def mteb_run(bench):
    tasks = []
    for cls in (TinyT2V, TinyV2T):
        task = cls()
        task.bench = bench
        tasks.append(task)
    encoder = load_encoder(bench["folder"], name="someone/clipvip-tiny", training_datasets=set())
    predictions = bench["tmp"] / "predictions"
    result = mteb.evaluate(encoder, tasks, cache=None, show_progress_bar=False, prediction_folder=predictions,
                           encode_kwargs={"batch_size": 1})
    scores = {r.task_name: r.scores["test"][0] for r in result.task_results}
    saved = {task.metadata.name: json.loads((predictions / f"{task.metadata.name}_predictions.json").read_text())
             for task in tasks}
    return {"tasks": tasks, "scores": scores, "predictions": saved, "encoder": encoder}


# ---------------------------------------------------------------------------------------------
# mteb's evaluation scores what clipvip retrieval scores
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("task_name,direction", [("TinyClipsT2V", "t2v"), ("TinyClipsV2T", "v2t")])
def test_mteb_scores_equal_clipvip_retrieval(bench, mteb_run, task_name, direction):
    ours = bench["results"][direction]
    assert bench["results"]["n_videos"] == N_VIDEOS and bench["results"]["n_texts"] == N_VIDEOS + len(TWO_CAPTIONS)
    qrels = split_data(bench, text_queries=direction == "t2v")["relevant_docs"]  # mteb unloads its tasks' data
    predictions = mteb_run["predictions"][task_name]["default"]["test"]
    assert len(predictions) == (N_VIDEOS + len(TWO_CAPTIONS) if direction == "t2v" else N_VIDEOS)
    ranks = pessimistic_ranks(predictions, qrels)
    assert metrics_from_ranks(ranks) == pytest.approx({k: ours[k] for k in METRICS})
    assert 0 < ours["R1"] < 100 and ours["MnR"] > 1.5  # a real ranking, not a trivial one
    # mteb's own numbers: a hit in the top k is R@k (a video's best caption, for video-to-text)
    scores = mteb_run["scores"][task_name]
    for k in (1, 5, 10):
        assert 100 * scores[f"hit_rate_at_{k}"] == pytest.approx(ours[f"R{k}"], abs=1e-3)


def test_encoder_features_are_the_models_unit_vectors(bench, mteb_run):
    """What mteb ranks with: the converted model's features, equal to the .pt model's."""
    corpus = split_data(bench, text_queries=True)["corpus"]
    loader = torch.utils.data.DataLoader(corpus, batch_size=4, collate_fn=lambda rows: rows)
    features = mteb_run["encoder"].encode(loader, task_metadata=TinyT2V.metadata, hf_split="test",
                                          hf_subset="default", show_progress_bar=False)
    assert features.shape == (N_VIDEOS, 24) and features.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1, rtol=1e-5)
    clip = clipvip.load_clip(os.path.join(bench["videos"], "clip3.mp4"), clipvip.load_config(
        os.path.join(bench["tmp"], "eval.json")))
    with torch.no_grad():
        expected = bench["model"].encode_video(clip[None])[0].numpy()
    np.testing.assert_allclose(features[3], expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# ModelMeta and loading
# ---------------------------------------------------------------------------------------------
def test_model_meta_describes_the_converted_model(bench):
    meta = model_meta(bench["folder"], training_datasets=FINE_TUNING_TASKS["msrvtt"], license="mit",
                      reference="https://example.org/clipvip-tiny")
    model = bench["model"]
    assert meta.name == "local/converted" and meta.revision is None and meta.loader is CLIPViPEncoder
    assert meta.loader_kwargs == {"path": os.path.abspath(bench["folder"]), "precision": "fp32"}
    assert meta.modalities == ["video", "text"] and meta.similarity_fn_name is ScoringFunction.COSINE
    assert meta.embed_dim == 24 and meta.max_tokens == 16 and meta.open_weights and meta.license == "mit"
    assert meta.n_parameters == sum(p.numel() for p in model.parameters())
    assert meta.n_embedding_parameters == model.clipmodel.text_model.embeddings.token_embedding.weight.numel()
    assert meta.training_datasets == {"MSRVTTT2V", "MSRVTTV2T"} and meta.use_instructions is False
    assert meta.is_zero_shot_on(["MSRVTTT2V"]) is False and meta.is_zero_shot_on(["DiDeMoT2VRetrieval"]) is True
    assert "CLIP-ViP" in meta.citation


def test_a_hub_id_names_the_results_and_its_revision(bench, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--clipvip-tiny"
    shutil.copytree(bench["folder"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    encoder = load_encoder("someone/clipvip-tiny")
    meta = encoder.mteb_model_meta
    assert (meta.name, meta.revision, meta.loader_kwargs["path"]) == ("someone/clipvip-tiny", commit, None)
    assert meta.training_datasets is None  # not stated: mteb then cannot call it zero-shot
    assert torch.equal(encoder.model.clipmodel.visual_projection.weight, bench["model"].clipmodel.visual_projection.weight)


def test_video_sources_and_refusals(bench, tmp_path):
    path = os.path.join(bench["videos"], "clip0.mp4")
    data = open(path, "rb").read()
    assert video_source(path) == path and video_source({"path": path, "bytes": None}) == path
    assert video_source({"path": "clip0.mp4", "bytes": data}) == VideoBytes(data, "clip0.mp4")

    class Decoder:  # what datasets.Video(decode=True) hands out: torchcodec's decoder, its source kept
        _hf_encoded = {"path": path, "bytes": None}

    assert video_source(Decoder()) == path
    with pytest.raises(DataError, match="cannot be read here"):
        video_source(np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(CheckpointError, match="not a converted CLIP-ViP model"):
        model_meta(str(tmp_path))
    with pytest.raises(ValueError, match="precision"):
        CLIPViPEncoder("someone/x", path=bench["folder"], precision="fp8")
