"""End to end: `python -m clipvip retrieval` fine-tunes and evaluates on the synthetic benchmark."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tiny_models import write_hf_clip

os.environ.setdefault("HF_HUB_OFFLINE", "1")
EPOCHS, N_TRAIN, BATCH = 25, 32, 8
TOTAL_STEPS = EPOCHS * N_TRAIN // BATCH
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CLIPVIP_LOG_LEVEL": "WARNING"}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """Synthetic clips, a tiny CLIP with the real vocabulary, and a config file for them."""
    from clipvip.apps import synthetic

    root = tmp_path_factory.mktemp("retrieval")
    # Clips drawn at the model's input_res (32 px): the run measures learning, not resampling. (Drawn
    # at 64 px, the 2x downscale with the checkpoints' kernel aliases the shapes' edges, and this
    # 100-step run from random weights ended at R@1 2 of 16, the threshold.)
    paths = synthetic.generate(str(root / "data"), n_train=N_TRAIN, n_test=16, seed=1, size=32, frames=8,
                               n_pretrain_videos=1, clips_per_video=1, frame_folders=False, workers=1)
    clip = str(root / "clip")
    write_hf_clip(clip, vocab_size=49408, max_positions=32)
    data = str(root / "data")
    config = {
        "train_datasets": {"name": "synthetic-train", "txt": os.path.join(data, "train.jsonl"),
                           "vis": os.path.join(data, "videos")},
        "inference_datasets": [{"name": "synthetic-test", "txt": os.path.join(data, "test.jsonl"),
                                "vis": os.path.join(data, "videos")}],
        "train_num_frms": 4, "test_num_frms": 4, "input_res": [32, 32], "max_txt_len": 24,
        "clip_config": clip, "clip_weights": clip,
        # A lower initial temperature scale than CLIP's 4.6 lets a model this small learn in 100 steps.
        "clip_vision_additional_config": {"type": "ViP", "temporal_size": 4, "add_cls_num": 3,
                                          "logit_scale_init_value": 2.3},
        "train_batch_size": BATCH, "test_batch_size": 8, "n_workers": 0, "pin_mem": 0, "fp16": 0,
        "learning_rate": 5e-3, "weight_decay": 0.01, "warmup_ratio": 0.05, "num_train_epochs": EPOCHS,
        "num_valid": 2, "only_valid_steps": 1000, "save_steps_ratio": 0.1, "log_interval": 4, "seed": 0,
    }
    path = str(root / "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    return {"root": root, "config": path, "data": data, "paths": paths}


def run_cli(*args, check=True, timeout=300):
    result = subprocess.run([sys.executable, "-m", "clipvip", "retrieval", *args], capture_output=True, text=True,
                            env=ENV, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def trained(bench):
    out = str(bench["root"] / "run")
    run_cli("--config", bench["config"], "--is_train", "--output_dir", out)
    return out


def test_training_lowers_loss_and_lifts_r1(trained):
    records = read_jsonl(os.path.join(trained, "log", "metrics.jsonl"))
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) >= 5 and losses[-1] < 0.7 * losses[0]
    assert all({"step", "loss", "lr", "grad_norm", "logit_scale", "clips_per_s"} <= r.keys()
               for r in records if "loss" in r)
    evals = [r for r in records if "val/synthetic-test/t2v_R1" in r]
    assert evals[0]["step"] == 0  # zero-shot validation first, as the original
    with open(os.path.join(trained, "eval_results.json")) as f:
        results = json.load(f)["synthetic-test"]
    chance = 100 / 16
    assert results["t2v"]["R1"] > 2 * chance, results["t2v"]
    assert results["n_videos"] == 16 and results["n_texts"] == 16 and results["skipped_videos"] == []
    assert set(results) >= {"protocol", "t2v", "v2t", "t2v_dsl", "v2t_dsl"}
    ckpts = set(os.listdir(os.path.join(trained, "ckpt")))
    assert {"model_best.pt", "train_state.pt"} <= ckpts
    steps = sorted(int(n[len("model_step_"):-3]) for n in ckpts if n.startswith("model_step_"))
    assert steps[-1] == TOTAL_STEPS  # the last step is always saved
    for name in ("log/log.txt", "config.json"):
        assert os.path.isfile(os.path.join(trained, name))


def test_checkpoint_evaluates_to_the_same_numbers(bench, trained):
    """The run's results are those of the checkpoint they name (model_best.pt, at its step):
    evaluating that file gives the same file, labels included."""
    with open(os.path.join(trained, "eval_results.json")) as f:
        final = json.load(f)
    ckpt, step = final["synthetic-test"]["checkpoint"], final["synthetic-test"]["step"]
    assert ckpt == os.path.join(trained, "ckpt", "model_best.pt") and 0 <= step <= TOTAL_STEPS
    out = str(bench["root"] / "eval")
    result = run_cli("--config", bench["config"], "--e2e_weights_path", ckpt, "--output_dir", out)
    assert "t2v_dsl" in result.stdout and "R@1" in result.stdout
    assert result.stdout.startswith(f"scores of {ckpt} (step {step})\n")
    with open(os.path.join(out, "eval_results.json")) as f:
        again = json.load(f)
    assert again == final


def test_deferred_nonfinite_check_trains_the_same_run(bench, trained):
    """The CUDA default (non-finite check on the device, read at logging steps) through the whole
    app: the same weights, logged losses and results as the per-step host check."""
    out = str(bench["root"] / "deferred")
    run_cli("--config", bench["config"], "--is_train", "--output_dir", out, "--nonfinite_check", "deferred")
    a = torch.load(os.path.join(trained, "ckpt", f"model_step_{TOTAL_STEPS}.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "ckpt", f"model_step_{TOTAL_STEPS}.pt"), weights_only=True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logged = [[(r["step"], r["loss"], r["nonfinite_steps"]) for r in read_jsonl(os.path.join(run, "log", "metrics.jsonl"))
               if "loss" in r] for run in (trained, out)]
    assert logged[0] == logged[1]
    with open(os.path.join(trained, "eval_results.json")) as f, open(os.path.join(out, "eval_results.json")) as g:
        results = [json.load(f), json.load(g)]
    # Each names its own run's model_best.pt; the rest (scores, step, protocol) is the same.
    for run, blocks in zip((trained, out), results):
        for block in blocks.values():
            assert os.path.samefile(block.pop("checkpoint"), os.path.join(run, "ckpt", "model_best.pt"))
    assert results[0] == results[1]


def test_two_processes_evaluate_identically(bench, trained):
    ckpt = os.path.join(trained, "ckpt", "model_best.pt")
    outs = []
    for nproc in (1, 2):
        out = str(bench["root"] / f"eval_{nproc}proc")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "clipvip", "retrieval", "--config", bench["config"], "--e2e_weights_path", ckpt,
               "--output_dir", out, "--test_batch_size", "3"]
        result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        with open(os.path.join(out, "eval_results.json")) as f:
            outs.append(json.load(f))
    assert outs[0] == outs[1]


def _state_step(path):
    try:
        return torch.load(path, weights_only=True)["progress"]["step"]
    except Exception:  # not there yet, or being replaced
        return -1


def test_kill_9_then_rerun_gives_the_uninterrupted_weights(bench, trained):
    out = str(bench["root"] / "killed")
    args = [sys.executable, "-m", "clipvip", "retrieval", "--config", bench["config"], "--is_train", "--output_dir", out]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = os.path.join(out, "ckpt", "train_state.pt")
    deadline = time.time() + 240
    while _state_step(state) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at = _state_step(state)
    total = TOTAL_STEPS
    assert 0 < killed_at < total
    run_cli("--config", bench["config"], "--is_train", "--output_dir", out)  # the same command again
    a = torch.load(os.path.join(trained, "ckpt", f"model_step_{total}.pt"), weights_only=True)
    b = torch.load(os.path.join(out, "ckpt", f"model_step_{total}.pt"), weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [r["step"] for r in read_jsonl(os.path.join(out, "log", "metrics.jsonl")) if "loss" in r]
    assert steps == sorted(set(steps))  # the repeated steps replaced their old lines


def test_ctrl_c_writes_a_final_state(bench):
    out = str(bench["root"] / "interrupted")
    args = [sys.executable, "-m", "clipvip", "retrieval", "--config", bench["config"], "--is_train", "--output_dir", out,
            "--save_steps_ratio", "1.0", "--num_valid", "1"]
    proc = subprocess.Popen(args, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "log", "metrics.jsonl")
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if os.path.isfile(metrics) and any("loss" in r for r in read_jsonl(metrics)):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    messages = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip() and "%|" not in line]
    assert proc.returncode == 130, (proc.returncode, messages[-20:])
    state = os.path.join(out, "ckpt", "train_state.pt")
    step = _state_step(state)
    assert step >= 4  # saved on the interrupt, not by the schedule (which saves at the end only)
    # One clean last line: where the state is and how to go on; no traceback. The log ends with it too.
    last = (f"interrupted at step {step}: the training state is saved in {state}; rerun the same command to "
            "resume from it")
    assert messages[-1] == last and "Traceback" not in stderr, messages[-5:]
    with open(os.path.join(out, "log", "log.txt")) as f:
        assert f.read().rstrip().endswith(last)


def test_two_processes_train_saying_each_line_once(bench, tmp_path):
    """torchrun: rank 1 says warnings and errors only; DDP is built without torch's deprecation warning."""
    out = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "clipvip",
           "retrieval", "--config", bench["config"], "--is_train", "--output_dir", out, "--num_train_epochs", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**ENV, "CLIPVIP_LOG_LEVEL": "INFO", "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    info = [line for line in result.stderr.splitlines() if " INFO " in line]
    assert len([line for line in info if "clipvip.train: done: " in line]) == 1
    assert len([line for line in info if "clipvip.train: training: world size 2" in line]) == 1
    assert not any("[rank 1]" in line for line in info)
    assert "broadcast_buffers" not in result.stderr


def test_corrupt_test_video_is_dropped_and_listed(bench, trained, tmp_path):
    import shutil

    videos = tmp_path / "videos"
    shutil.copytree(os.path.join(bench["data"], "videos"), videos)
    first = json.loads(open(os.path.join(bench["data"], "test.jsonl")).readline())["clip_id"]
    (videos / f"{first}.mp4").write_bytes(b"\x00\x00\x00 ftypisom garbage")
    cfg = json.load(open(bench["config"]))
    cfg["inference_datasets"][0]["vis"] = str(videos)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = str(tmp_path / "out")
    run_cli("--config", str(path), "--e2e_weights_path", os.path.join(trained, "ckpt", "model_best.pt"),
            "--output_dir", out)
    results = json.load(open(os.path.join(out, "eval_results.json")))["synthetic-test"]
    assert results["skipped_videos"] == [first] and results["n_videos"] == 15 and results["n_texts"] == 15


def test_unwritable_output_dir_fails_before_training(bench, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = run_cli("--config", bench["config"], "--is_train", "--output_dir", str(blocker / "run"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: output_dir")
    assert "Traceback" not in result.stderr


def test_mismatched_checkpoint_is_one_clear_line(bench, trained, tmp_path):
    state = torch.load(os.path.join(trained, "ckpt", "model_best.pt"), weights_only=True)
    state["clipmodel.vision_model.embeddings.added_cls"] = torch.zeros(1, 32)
    bad = str(tmp_path / "bad.pt")
    torch.save(state, bad)
    result = run_cli("--config", bench["config"], "--e2e_weights_path", bad, "--output_dir", str(tmp_path / "o"),
                     check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "added_cls: (1, 32) vs (3, 32)" in result.stderr


@pytest.mark.parametrize("check, stop_step", [("step", 3), ("deferred", 4)])
def test_non_finite_losses_stop_the_run_with_a_state(bench, tmp_path, monkeypatch, check, stop_step):
    """On the host the stop comes at the 3rd NaN step; deferred, at the next read (log_interval 2)."""
    import clipvip
    from clipvip.apps import retrieval
    from clipvip.engine import TrainingStopped
    from clipvip.apps import runner
    from clipvip.loss import LossOutput

    real_build_loss = runner.build_loss

    def nan_loss(settings, env):
        loss = real_build_loss(settings, env)
        loss.forward = lambda outputs, scale: LossOutput(torch.tensor(float("nan"), requires_grad=True) * scale, {})
        return loss

    monkeypatch.setattr(runner, "build_loss", nan_loss)
    out = str(tmp_path / "nan")
    cfg = clipvip.load_config(bench["config"], ["--is_train", "--output_dir", out, "--max_nonfinite_steps", "3",
                                                "--num_train_epochs", "2", "--nonfinite_check", check,
                                                "--log_interval", "2", "--save_steps_ratio", "0.5"])
    with pytest.raises(TrainingStopped, match=f"{stop_step} steps in a row"):
        retrieval.run(cfg)
    state = torch.load(os.path.join(out, "ckpt", "train_state.pt"), weights_only=True)
    assert state["progress"]["nonfinite_steps"] == stop_step and state["progress"]["step"] == stop_step
    runner.seed_everything(cfg.seed)  # as run() does before building the model
    reference = clipvip.build_model(cfg).state_dict()
    for key, value in state["model"].items():  # skipped steps leave the weights untouched
        assert torch.equal(value, reference[key]), key
