"""`python -m clipvip demo --quick`: every stage runs and the report agrees with the runs' own files.

The targets of the full demo (R@1, direction sensitivity, wall time) are not checked here: the
quick demo trains for seconds on a few dozen clips. See docs/demo.md for the measured numbers.
"""
import json
import math
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "CLIPVIP_LOG_LEVEL": "WARNING"}
DIRECTIONS = ("t2v", "v2t", "t2v_dsl", "v2t_dsl")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    result = subprocess.run([sys.executable, "-m", "clipvip", "demo", "--out", out, "--quick"], capture_output=True,
                            text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(out, "results.json")) as f:
        return {"out": out, "results": json.load(f), "stdout": result.stdout}


def test_results_structure(demo):
    results = demo["results"]
    assert {"vip", "meanpool", "direction_sensitive", "wall_seconds"} <= set(results)
    for name in ("vip", "meanpool"):
        block = results[name]
        for direction in DIRECTIONS:
            assert set(block[direction]) == {"R1", "R5", "R10", "MdR", "MnR"}
        assert set(results["direction_sensitive"][name]) >= {"t2v_R1"}
    assert results["wall_seconds"] > 0
    assert os.path.getsize(os.path.join(demo["out"], "curves.png")) > 1000


def test_eval_blocks_are_the_runs_own(demo):
    for name in ("vip", "meanpool"):
        with open(os.path.join(demo["out"], name, "eval_results.json")) as f:
            assert demo["results"][name] == json.load(f)["synthetic-test"]
    with open(os.path.join(demo["out"], "vip", "config.json")) as f:
        assert json.load(f)["clip_vision_additional_config"]["type"] == "ViP"
    with open(os.path.join(demo["out"], "meanpool", "config.json")) as f:
        assert json.load(f)["clip_vision_additional_config"]["type"] != "ViP"


def test_direction_sensitive_numbers_agree_with_the_eval_blocks(demo):
    results = demo["results"]
    with open(os.path.join(demo["out"], "data", "test.jsonl")) as f:
        records = [json.loads(line) for line in f]
    ids = {r["clip_id"] for r in records}
    n_twin = sum(r.get("twin") in ids for r in records)
    assert 0 < n_twin < len(records)
    for name in ("vip", "meanpool"):
        ds = results["direction_sensitive"][name]
        assert ds["n_queries"] == n_twin and ds["n_queries"] + ds["n_other_queries"] == len(records)
        for key in ("t2v_R1", "other_t2v_R1"):
            hits = ds[key] * (ds["n_queries"] if key == "t2v_R1" else ds["n_other_queries"]) / 100
            assert math.isclose(hits, round(hits), abs_tol=1e-6)  # a whole number of queries
        # The demo's own per-query ranks reproduce the app's overall R@1; the subsets split it.
        assert ds["all_t2v_R1"] == pytest.approx(results[name]["t2v"]["R1"], abs=100 / len(records) + 1e-9)
        combined = (ds["t2v_R1"] * ds["n_queries"] + ds["other_t2v_R1"] * ds["n_other_queries"]) / len(records)
        assert combined == pytest.approx(ds["all_t2v_R1"])


def test_table_and_curves_inputs(demo):
    assert "direction" in demo["stdout"] and "CLIP-ViP" in demo["stdout"] and "mean-pool" in demo["stdout"]
    for name in ("vip", "meanpool"):
        with open(os.path.join(demo["out"], name, "log", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        assert any("loss" in r for r in records)
        assert any("val/synthetic-test/t2v_R1" in r for r in records)


def test_both_runs_start_from_the_same_written_clip(demo):
    """The start CLIP is a real HF folder loaded through clip_weights by both runs; its vision
    position embeddings are drawn at the demo's larger scale, everything else as the library inits."""
    from safetensors.torch import load_file

    from clipvip.apps.demo import QUICK

    starts = set()
    for name in ("vip", "meanpool"):
        with open(os.path.join(demo["out"], name, "config.json")) as f:
            cfg = json.load(f)
        assert cfg["clip_weights"] == cfg["clip_config"]
        assert cfg["freeze_text_encoder"] == 1
        starts.add(cfg["clip_weights"])
    (start,) = starts
    weights = load_file(os.path.join(start, "model.safetensors"))
    positions = weights["vision_model.embeddings.position_embedding.weight"]
    assert positions.std().item() == pytest.approx(QUICK.position_init_std, rel=0.3)
    assert weights["text_model.embeddings.position_embedding.weight"].std().item() < 0.05
    assert not any("added_cls" in k or "temporal_embedding" in k for k in weights)


def test_plan_epochs_fits_the_budget_and_never_exceeds_the_config():
    from clipvip.apps.demo import plan_epochs

    # 2000 clips in batches of 32: 62.5 steps an epoch. 0.15 s a step in 480 s: 3200 steps = 51 epochs,
    # capped at the config's 40; 0.3 s a step: 1600 steps = 25 epochs (1563 steps, 469 s).
    assert plan_epochs(0.15, 480, 2000, 32, 40) == 40
    assert plan_epochs(0.3, 480, 2000, 32, 40) == 25
    assert 25 * 62.5 * 0.3 <= 480 < 26 * 62.5 * 0.3
    assert plan_epochs(100.0, 480, 2000, 32, 40) == 1  # never zero epochs
    with pytest.raises(ValueError):
        plan_epochs(0.0, 480, 2000, 32, 40)


def test_measure_step_seconds_times_the_runs_own_model(tmp_path, monkeypatch):
    """The timing builds the model the run would (start weights from the written CLIP, text tower
    frozen) and really steps it on the run's own batches: the weights move, the frozen tower does not."""
    import torch

    from clipvip.apps import demo
    from clipvip.config import load_config
    from clipvip.model import build_model

    from clipvip.apps import synthetic

    spec = demo.QUICK
    synthetic.generate(str(tmp_path / "data"), n_train=spec.n_train, n_test=4, seed=0, size=spec.video_size,
                       frames=spec.video_frames, n_pretrain_videos=0, frame_folders=False, workers=1)
    clip = demo.write_start_clip(str(tmp_path / "clip_config"), spec.architecture, 0, spec.position_init_std)
    cfg = load_config(os.path.join(demo.find_config_dir(), "vip.json"),
                      [*demo.train_overrides(str(tmp_path), clip), *spec.overrides])
    seconds = demo.measure_step_seconds(cfg, threads=1, steps=2, warmup=1)
    assert 0 < seconds < 30
    calls = []
    real_build = build_model

    def spy(c):
        model = real_build(c)
        calls.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
        return model

    monkeypatch.setattr("clipvip.apps.demo.build_model", spy)
    demo.measure_step_seconds(cfg, threads=1, steps=1, warmup=0)
    (model, before), = calls
    after = model.state_dict()
    assert not torch.equal(before["clipmodel.vision_model.embeddings.added_cls"], after["clipmodel.vision_model.embeddings.added_cls"])
    assert torch.equal(before["clipmodel.text_model.final_layer_norm.weight"], after["clipmodel.text_model.final_layer_norm.weight"])


@pytest.mark.parametrize("step_seconds,layers,epochs", [
    ({2: 0.05, 1: 0.025}, 2, 6),   # the configs' epochs fit with the first architecture: it is kept
    ({2: 0.5, 1: 0.05}, 1, 6),     # they do not: the smaller one, which fits them all
    ({2: 0.5, 1: 0.3}, 1, 3),      # neither fits: the smaller one, with the epochs that fit
])
def test_fit_budget_keeps_the_first_architecture_that_fits(tmp_path, monkeypatch, step_seconds, layers, epochs):
    """The timing decides the architecture and the epochs (QUICK's data: 48 clips in batches of 8,
    6 epochs; a budget of 6 s: 12 steps of 0.5 s = 2 epochs, 20 steps of 0.3 s = 3 epochs)."""
    import copy
    import dataclasses

    from clipvip.apps import demo

    small = copy.deepcopy(demo.QUICK.architecture)
    big = copy.deepcopy(small)
    big["vision_config"]["num_hidden_layers"] = 2
    spec = dataclasses.replace(demo.QUICK, architecture=big, fallback_architecture=small, train_budget_s=6.0)
    monkeypatch.setattr(demo, "measure_step_seconds",
                        lambda cfg, threads: step_seconds[_vision_layers(cfg.clip_config)])
    clip, budget = demo.fit_budget(os.path.join(demo.find_config_dir(), "vip.json"), str(tmp_path), spec,
                                   parallel=True, threads=1)
    assert (budget["vision_layers"], budget["epochs"], budget["config_epochs"]) == (layers, epochs, 6)
    assert _vision_layers(clip) == layers  # the start CLIP on disk is the chosen one
    assert [t["vision_layers"] for t in budget["tried"]] == ([2] if layers == 2 else [2, 1])


def _vision_layers(clip_folder: str) -> int:
    with open(os.path.join(clip_folder, "config.json")) as f:
        return json.load(f)["vision_config"]["num_hidden_layers"]
