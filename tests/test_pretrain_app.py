"""End to end: 2-process CPU pretraining on the synthetic HD-VILA set, then retrieval on its checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

from tiny_models import write_hf_clip

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CLIPVIP_LOG_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from clipvip.apps import synthetic

    root = tmp_path_factory.mktemp("pretrain")
    paths = synthetic.generate(str(root / "data"), n_train=2, n_test=12, seed=2, size=64, frames=8,
                               n_pretrain_videos=8, clips_per_video=4, frame_folders=False, workers=1)
    clip = str(root / "clip")
    write_hf_clip(clip, vocab_size=49408, max_positions=32)
    config = {
        "train_datasets": [{"name": "hdvila-synthetic", "vis_format": "videoframe",
                            "txt": paths["pretrain_subtitles"], "vis": paths["pretrain_videos"],
                            "vid_cap_path": paths["pretrain_captions"], "vid_txt": "subtitle"}],
        "val_datasets": [{"name": "synthetic-test", "txt": paths["test"], "vis": paths["videos"]}],
        "train_num_frms": 4, "test_num_frms": 4, "input_res": [32, 32], "max_txt_len": 32,
        "clip_config": clip, "clip_weights": clip,
        "clip_vision_additional_config": {"type": "ViP", "temporal_size": 4, "add_cls_num": 3,
                                          "logit_scale_init_value": 2.3},
        "loss_config": {"loss_name": "NCELearnableTempLoss_vsc_fc", "if_gather": 1},
        # 2 processes x 2 clips x 2 accumulated micro-batches, every loss seeing all 8 (feature cache)
        "train_batch_size": 2, "gradient_accumulation_steps": 2, "accum_feature_cache": 1, "test_batch_size": 6, "n_workers": 0, "pin_mem": 0, "fp16": 0,
        "learning_rate": 2e-3, "weight_decay": 0.01, "warmup_ratio": 0.05, "num_train_epochs": 20,
        "num_valid": 2, "only_valid_steps": 1000, "save_steps_ratio": 0.5, "log_interval": 5, "seed": 0,
        "grad_norm": 5.0,
        # what CUDA runs get by default: non-finite steps skipped on the device, counts read (and
        # the stop flag combined over the processes) at logging and state steps only
        "nonfinite_check": "deferred",
    }
    path = str(root / "pretrain.json")
    with open(path, "w") as f:
        json.dump(config, f)
    out = str(root / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "clipvip", "pretrain", "--config", path, "--output_dir", out]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"root": root, "out": out, "config": config, "paths": paths, "clip": clip}


def test_two_process_pretraining_lowers_the_loss(pretrained):
    with open(os.path.join(pretrained["out"], "log", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r for r in records if "loss" in r]
    assert len(losses) >= 4
    assert losses[-1]["loss"] < 0.8 * losses[0]["loss"], [r["loss"] for r in losses]
    # every term of V<->(S,C) + F<->C is logged
    terms = {k for k in losses[-1] if k.startswith("loss/")}
    assert terms == {"loss/s2v", "loss/c2v", "loss/v2s", "loss/v2c", "loss/f2c", "loss/c2f"}
    assert records[0]["step"] == 0 and "val/synthetic-test/t2v_R1" in records[0]  # zero-shot first
    steps = [r["step"] for r in losses]
    assert steps == sorted(steps)


def test_pretrained_checkpoint_evaluates_in_retrieval(pretrained, tmp_path):
    with open(os.path.join(pretrained["out"], "eval_results.json")) as f:
        during_pretraining = json.load(f)["synthetic-test"]
    checkpoint = during_pretraining["checkpoint"]  # the file the results score: ckpt/model_best.pt
    assert checkpoint == os.path.join(pretrained["out"], "ckpt", "model_best.pt")
    state = torch.load(checkpoint, weights_only=True)
    assert all(k.startswith("clipmodel.") for k in state)
    retrieval_cfg = {k: v for k, v in pretrained["config"].items() if k not in ("train_datasets", "loss_config")}
    retrieval_cfg["inference_datasets"] = retrieval_cfg.pop("val_datasets")
    path = tmp_path / "retrieval.json"
    path.write_text(json.dumps(retrieval_cfg))
    out = str(tmp_path / "eval")
    result = subprocess.run([sys.executable, "-m", "clipvip", "retrieval", "--config", str(path), "--e2e_weights_path",
                             checkpoint, "--output_dir", out], capture_output=True, text=True, env=ENV, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]  # strict load: no missing or unexpected keys
    with open(os.path.join(out, "eval_results.json")) as f:
        ours = json.load(f)["synthetic-test"]
    assert ours == during_pretraining  # the same model (and step), evaluated by the retrieval app


def test_validation_sets_on_hdvila_folders_use_its_layout():
    import clipvip
    from clipvip.apps.pretrain import validation_rule

    cfg = clipvip.load_config("configs/pretrain/pretrain_vip_base_32.json", ["--blob_mount_dir", "/data"])
    rule_for = validation_rule(cfg)
    assert [rule_for(entry) for entry in cfg.val_datasets] == [None, "hdvila", "hdvila"]  # msrvtt, how2, ours


def test_the_documented_pretraining_run(tmp_path):
    """docs/first-pretrain.md's commands, exactly as written, in order (issue 26: no minimal
    ``clipvip pretrain`` run was documented): synthetic data, the tiny CLIP, pretraining, then
    fine-tuning from the checkpoint it names."""
    import re

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "docs", "first-pretrain.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```(sh|python)\n(.*?)```", f.read(), re.S)
    assert [kind for kind, _ in blocks] == ["sh", "python", "sh", "sh"]
    os.symlink(os.path.join(repo, "configs"), tmp_path / "configs")  # the page runs from the repository
    shims = tmp_path / "bin"
    shims.mkdir()
    shim = shims / "python"  # "python" is this interpreter (the page says: .venv active)
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    shim.chmod(0o755)
    env = {**ENV, "PATH": f"{shims}{os.pathsep}{os.environ.get('PATH', '')}"}
    for kind, code in blocks:
        command = [sys.executable, "-"] if kind == "python" else ["bash", "-e", "-c", code]
        done = subprocess.run(command, input=code if kind == "python" else None, cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{code}\n{done.stderr[-3000:]}"
    run = tmp_path / "first_pretrain" / "pretrain"
    assert sorted(os.listdir(run / "ckpt")) == [
        "model_best.json", "model_best.pt", "model_step_8.pt", "train_state.pt"]
    with open(run / "log" / "metrics.jsonl") as f:
        losses = [r for r in map(json.loads, f) if "loss" in r]
    assert losses[-1]["step"] == 8 and {"loss/v2s", "loss/v2c", "loss/f2c"} <= set(losses[-1])
    with open(tmp_path / "first_pretrain" / "finetune" / "config.json") as f:
        finetune = json.load(f)
    assert finetune["e2e_weights_path"] == os.path.join("first_pretrain", "pretrain", "ckpt", "model_step_8.pt")
    assert (tmp_path / "first_pretrain" / "finetune" / "eval_results.json").is_file()
