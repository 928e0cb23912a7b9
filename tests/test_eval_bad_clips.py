"""Issue 17: a test clip that passes the up-front scan and then fails to decode is dropped, not fatal.

The bad clip is an mp4 cut to half its bytes with its index at the front (``faststart``): the
scan reads the header and is satisfied, decoding the frames fails. The evaluation must drop it
with its captions, list it, and score exactly what the dataset without it scores: on one process
(loader in the main process, or 2 workers, where an exception would end the loader), on 2 gloo
processes (where every rank must drop the same clip), and through the retrieval app.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import write_clip
from test_distributed import _free_port, run_spawned
from tiny_models import tiny_cfg, write_hf_clip

N_CLIPS, WORLD = 6, 2
BAD = (2, 3)  # one process, batch size 2: the batch [2, 3] holds failures only
BAD_ON_RANK_1 = 4  # 2 processes: blocks [0, 3) and [3, 6); rank 1's batches are [3, 4] and [5]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _write_jsonl(path, records) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def _cut_in_half(path: str) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Clips (written with their index in front), records with 1-2 captions each, a tiny CLIP."""
    root = tmp_path_factory.mktemp("bad_clips")
    vis = root / "videos"
    records = []
    for k in range(N_CLIPS):
        write_clip(vis / f"clip{k}.mp4", n_frames=8, size=32, seed=k, faststart=True)
        texts = [f"clip number {k}"] + ([f"another caption of clip {k}"] if k % 2 else [])
        records.append({"clip_id": f"clip{k}", "text": texts})
    for k in set(BAD) | {BAD_ON_RANK_1}:
        half = vis / f"half{k}.mp4"
        half.write_bytes((vis / f"clip{k}.mp4").read_bytes())
        _cut_in_half(str(half))
    clip = str(root / "clip")
    write_hf_clip(clip, vocab_size=49408, max_positions=32)
    return {"root": root, "vis": str(vis), "records": records, "clip": clip}


def _with_bad(bench, bad) -> list[dict]:
    """The records with the clips at indices ``bad`` pointing at their half files."""
    return [{**r, "clip_id": f"half{k}"} if k in bad else r for k, r in enumerate(bench["records"])]


def _without(bench, bad) -> list[dict]:
    return [r for k, r in enumerate(bench["records"]) if k not in bad]


def _cfg(bench, n_workers: int = 0):
    cfg = tiny_cfg(bench["clip"])
    cfg.update(test_n_clips=1, test_num_frms=4, test_batch_size=2, max_txt_len=16, n_workers=n_workers,
               pin_mem=0, seed=0, fp16=0)
    return cfg


def _evaluate(bench, records, name: str, n_workers: int = 0):
    """(eval block, video features, text features) of ``records`` with the tiny model on the CPU."""
    from clipvip.data.loader import LoaderSettings
    from clipvip.data.retrieval_dataset import VideoRetrievalDataset
    from clipvip.model import build_model
    from clipvip.tokenizer import build_tokenizer
    from clipvip.engine.evaluate import encode_retrieval_set, evaluate_retrieval_set

    cfg = _cfg(bench, n_workers)
    torch.manual_seed(0)  # the proxy tokens start random: the same model on every call and rank
    model = build_model(cfg).eval()
    txt = _write_jsonl(bench["root"] / f"{name}.jsonl", records)
    dataset = VideoRetrievalDataset.from_config(cfg, {"name": "bad-clips", "txt": txt, "vis": bench["vis"]},
                                                build_tokenizer(cfg), training=False)
    assert dataset.scan_readable() == []  # the half files pass the cheap scan
    block = evaluate_retrieval_set(model, dataset, LoaderSettings.from_config(cfg), "fp32", torch.device("cpu"))
    videos, texts = encode_retrieval_set(model, dataset, LoaderSettings.from_config(cfg), "fp32", torch.device("cpu"),
                                         video_workers=0)
    return block, videos, texts


def _assert_same_scores(block, reference):
    assert block["n_videos"] == reference["n_videos"] and block["n_texts"] == reference["n_texts"]
    for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl"):
        assert block[direction] == pytest.approx(reference[direction]), direction


def test_half_file_passes_the_scan_and_fails_to_decode(bench):
    from clipvip.data.retrieval_dataset import VideoRetrievalDataset
    from clipvip.errors import DataError

    txt = _write_jsonl(bench["root"] / "one.jsonl", [{"clip_id": "half4", "text": "x"}, {"clip_id": "clip0", "text": "y"}])
    dataset = VideoRetrievalDataset.from_config(_cfg(bench), {"name": "t", "txt": txt, "vis": bench["vis"]}, training=False)
    assert dataset.scan_readable() == []
    with pytest.raises(DataError, match="half4"):
        dataset.video_view()[0]  # without marking, reading it is an error naming the file
    marked = dataset.video_view(mark_unreadable=True)
    item = marked[0]
    assert "video" not in item and "cannot read video" in item["failed"] and "half4" in item["failed"]
    batch = marked.collator([marked[1], item])
    assert batch["video"].shape[:2] == (1, 4) and batch["indices"].tolist() == [1]
    assert batch["failed"] == [(0, item["failed"])]
    assert dataset.scan_readable(decode=True) == ["half4"]  # the decoding scan finds it up front


@pytest.mark.parametrize("n_workers", [0, 2])
def test_clip_failing_while_encoded_is_dropped_with_its_captions(bench, n_workers, clipvip_log):
    block, videos, texts = _evaluate(bench, _with_bad(bench, BAD), "bad", n_workers)
    reference, ref_videos, ref_texts = _evaluate(bench, _without(bench, BAD), "clean")
    assert block["skipped_videos"] == ["half2", "half3"]
    assert all("cannot read video" in block["skip_reasons"][c] for c in ("half2", "half3"))
    assert reference["skipped_videos"] == [] and reference["n_videos"] == N_CLIPS - len(BAD)
    _assert_same_scores(block, reference)
    # Features in dataset order, the failed ones out: the clean dataset's features.
    assert torch.allclose(videos, ref_videos, atol=1e-5) and torch.allclose(texts, ref_texts, atol=1e-5)
    lines = [r.getMessage() for r in clipvip_log.records if "left out of evaluation with its" in r.getMessage()]
    assert len(lines) == 2 and "half2.mp4" in lines[0] and "its 1 caption:" in lines[0]
    assert "half3.mp4" in lines[1] and "its 2 captions:" in lines[1]


def test_every_clip_failing_is_one_clear_error(bench):
    from clipvip.errors import DataError

    records = [{"clip_id": f"half{k}", "text": "x"} for k in BAD]
    with pytest.raises(DataError, match=r"none of the 2 test videos can be read \(first: cannot read video .*half2"):
        _evaluate(bench, records, "all_bad")


# ----------------------------------------------------------------------------------------------
# Two gloo processes, the bad clip in rank 1's block only
# ----------------------------------------------------------------------------------------------
def _rank_worker(rank, port, bench, out_dir):
    import clipvip.distributed as D

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    D.init_distributed(backend="gloo", device="cpu")
    try:
        block, videos, texts = _evaluate(bench, _with_bad(bench, {BAD_ON_RANK_1}), f"bad_rank{rank}")
        torch.save({"block": block, "videos": videos, "texts": texts}, os.path.join(out_dir, f"rank{rank}.pt"))
        D.barrier()
    finally:
        D.cleanup()
    # As in test_distributed: skip the interpreter teardown that can abort after the group is gone.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_processes_drop_the_same_clip(bench, tmp_path):
    run_spawned(_rank_worker, (_free_port(), bench, str(tmp_path)), nprocs=WORLD)
    reference, ref_videos, ref_texts = _evaluate(bench, _without(bench, {BAD_ON_RANK_1}), "clean_rank")
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["block"]["skipped_videos"] == ["half4"], rank
        _assert_same_scores(got["block"], reference)
        assert torch.allclose(got["videos"], ref_videos, atol=1e-5) and torch.allclose(got["texts"], ref_texts, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# The retrieval app, zero-shot: the clip is listed in eval_results.json, the run exits 0
# ----------------------------------------------------------------------------------------------
def test_retrieval_app_lists_the_clip_in_eval_results(bench, tmp_path):
    config = {
        "inference_datasets": [{"name": "bad-clips", "vis": bench["vis"],
                                "txt": _write_jsonl(tmp_path / "test.jsonl", _with_bad(bench, {BAD_ON_RANK_1}))}],
        "test_n_clips": 1, "test_num_frms": 4, "input_res": [32, 32], "max_txt_len": 16, "test_batch_size": 2,
        "n_workers": 2, "pin_mem": 0, "fp16": 0, "seed": 0, "clip_config": bench["clip"], "clip_weights": bench["clip"],
        "clip_vision_additional_config": {"type": "ViP", "temporal_size": 4, "add_cls_num": 3},
    }
    (tmp_path / "cfg.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "clipvip", "retrieval", "--config", str(tmp_path / "cfg.json"),
                             "--output_dir", str(out)], capture_output=True, text=True, env=ENV, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    block = json.load(open(out / "eval_results.json"))["bad-clips"]
    assert block["skipped_videos"] == ["half4"] and "cannot read video" in block["skip_reasons"]["half4"]
    assert block["n_videos"] == N_CLIPS - 1 and block["n_texts"] == 9 - 1  # 9 captions, 1 of them clip 4's
    assert "unreadable videos left out" in result.stdout
