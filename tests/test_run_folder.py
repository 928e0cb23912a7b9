"""A run folder and who may write it (issue 26, items 4-7): an evaluation never writes over a
training run and writes nothing before its inputs are read; results name the checkpoint and step
they score; a resume with changed settings is refused or logged per setting; what the processes
of a job, a Ctrl-C and a failure leave on the console and in log/log.txt."""
from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal

import pytest
import torch

import clipvip
from clipvip.apps import retrieval
from clipvip.apps.cli import run_main
from clipvip.config import DEFAULTS
from clipvip.errors import CheckpointError

from search_helpers import make_bench
from tiny_models import ListStream, fixed_batches, tiny_cfg, write_hf_clip

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def said(log) -> list[str]:
    """The messages of the ``clipvip`` logger (conftest's ``clipvip_log``) at INFO and above."""
    return [r.getMessage() for r in log.records if r.levelno >= logging.INFO]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """4 training and 4 test clips of 32 px, a tiny CLIP with the real vocabulary, a config naming both sets."""
    root = tmp_path_factory.mktemp("run_folder")
    data = os.path.join(str(root), "data")
    return make_bench(root, n_train=4, n_test=4, size=32,
                      train_datasets={"name": "train", "txt": os.path.join(data, "train.jsonl"),
                                      "vis": os.path.join(data, "videos")},
                      inference_datasets=[{"name": "test", "txt": os.path.join(data, "test.jsonl"),
                                           "vis": os.path.join(data, "videos")}],
                      train_batch_size=2, test_batch_size=2, num_train_epochs=2, log_interval=1, save_hf=1)


def retrieval_cli(*args) -> int:
    return run_main(retrieval.main, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(bench):
    """A finished fine-tuning run (4 steps, validated at steps 0 and 4) in ``bench/run``."""
    run = os.path.join(bench["root"], "run")
    assert retrieval_cli("--config", bench["config"], "--is_train", "--output_dir", run) == 0
    return run


def snapshot(folder: str) -> dict:
    """Every file under ``folder``: its bytes."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                files[os.path.relpath(os.path.join(root, name), folder)] = f.read()
    return files


def copy_run(trained: str, tmp_path, run: str | None = None) -> str:
    """A copy of the finished run at ``run`` (default ``tmp_path/run``), its config.json naming the copy."""
    run = run or str(tmp_path / "run")
    shutil.copytree(trained, run)
    path = os.path.join(run, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["output_dir"] = run
    with open(path, "w") as f:
        json.dump(config, f)
    return run


# ----------------------------------------------------------------------------------------------
# Item 4: an evaluation never writes over a training run, nor anything before its inputs are read
# ----------------------------------------------------------------------------------------------
def test_evaluating_with_the_runs_config_leaves_the_run_alone(trained, tmp_path, capsys):
    """docs/first-run.md's old step 4 (no --output_dir): the config's output_dir is the run itself."""
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    best = os.path.join(run, "ckpt", "model_best.pt")
    assert retrieval_cli("--config", os.path.join(run, "config.json"), "--e2e_weights_path", best,
                         "--is_train", "0") == 0
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k in before} == before  # not one byte of the run changed
    added = sorted(set(after) - set(before))
    assert added == [os.path.join("eval", "model_best", name)
                     for name in ("config.json", "eval_results.json", os.path.join("log", "log.txt"))]
    with open(os.path.join(run, "eval", "model_best", "config.json")) as f:
        assert json.load(f)["output_dir"] == os.path.join(run, "eval", "model_best")
    # The evaluation of model_best.pt is the run's own result block, its step included (item 5);
    # the path differs only because the run was copied here.
    with open(os.path.join(run, "eval", "model_best", "eval_results.json")) as f:
        evaluated = json.load(f)["test"]
    with open(os.path.join(run, "eval_results.json")) as f:
        reported = json.load(f)["test"]
    assert evaluated.pop("checkpoint") == best and reported.pop("checkpoint") == os.path.join(trained, "ckpt",
                                                                                            "model_best.pt")
    assert evaluated == reported
    assert f"scores of {best} (step " in capsys.readouterr().out


def test_a_failed_evaluation_writes_nothing(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    notes = tmp_path / "notes.pt"
    notes.write_text("evaluation notes\n")
    assert retrieval_cli("--config", os.path.join(run, "config.json"), "--e2e_weights_path", notes,
                         "--is_train", "0") == 2
    assert "is not a checkpoint" in capsys.readouterr().err
    assert snapshot(run) == before and not os.path.exists(os.path.join(run, "eval"))


@pytest.mark.parametrize("missing", ["annotations", "videos", "training annotations"])
def test_missing_inputs_leave_no_run_folder(bench, tmp_path, capsys, missing):
    """A command that fails on its inputs creates nothing: no output_dir with an empty log/."""
    with open(bench["config"]) as f:
        config = json.load(f)
    if missing == "annotations":
        config["inference_datasets"][0]["txt"] = str(tmp_path / "nowhere.jsonl")
    elif missing == "videos":
        config["inference_datasets"][0]["vis"] = str(tmp_path / "no_videos")
    else:
        config["train_datasets"]["txt"] = str(tmp_path / "nowhere.jsonl")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    train = ["--is_train"] if missing == "training annotations" else []
    assert retrieval_cli("--config", path, "--output_dir", out, *train) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_first_run_doc_step_4_evaluates_beside_the_run(trained, tmp_path, monkeypatch, capsys):
    """The page's own command, run as written from a folder holding its ``first_run/vip`` run."""
    with open(os.path.join(REPO, "docs", "first-run.md")) as f:
        doc = f.read()
    section = doc[doc.index("## 4. Evaluate the checkpoint"):]
    command = re.search(r"\n {4}(python -m clipvip retrieval .*?)\n\n", section, re.S).group(1)
    words = shlex.split(command.replace("\\\n", " "))
    assert words[:4] == ["python", "-m", "clipvip", "retrieval"] and "--output_dir" in words
    monkeypatch.chdir(tmp_path)
    copy_run(trained, tmp_path, "first_run/vip")
    before = snapshot("first_run/vip")
    assert retrieval_cli(*words[4:]) == 0
    assert snapshot("first_run/vip") == before
    out = words[words.index("--output_dir") + 1]
    with open(os.path.join(out, "eval_results.json")) as f:
        assert json.load(f)["test"]["checkpoint"] == "first_run/vip/ckpt/model_best.pt"
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------
# Item 5: results name the checkpoint and step they score; the card and the HF folder say the step
# ----------------------------------------------------------------------------------------------
def test_the_runs_results_name_model_best_and_its_step(trained):
    with open(os.path.join(trained, "eval_results.json")) as f:
        block = json.load(f)["test"]
    with open(os.path.join(trained, "ckpt", "model_best.json")) as f:
        note = json.load(f)
    state = torch.load(os.path.join(trained, "ckpt", "train_state.pt"), weights_only=True)
    best_step = state["progress"]["best_step"]
    assert block["checkpoint"] == os.path.join(trained, "ckpt", "model_best.pt") and block["step"] == best_step
    assert note == {"checkpoint": "model_best.pt", "step": best_step, "t2v_R1": block["t2v"]["R1"], "dataset": "test"}
    assert block["t2v"]["R1"] == state["progress"]["best_r1"]
    # --save_hf: the converted best model's card says the step and shows these results.
    with open(os.path.join(trained, "ckpt", "model_best_hf", "README.md")) as f:
        card = f.read()
    assert f"step {best_step} of its training run" in card
    assert f"Scores of `model_best.pt` (step {best_step}):" in card
    assert f"| test | t2v | {block['t2v']['R1']:.1f} |" in card


def eval_block(r1: float) -> dict:
    metrics = {"R1": r1, "R5": 100.0, "R10": 100.0, "MdR": 1.0, "MnR": 1.0}
    return {direction: dict(metrics) for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl")}


def tiny_trainer(tmp_path, r1s=(), *overrides, stream=None):
    """A Trainer over 2 fixed batches of 2 clips: 2 epochs = 4 steps, validated at steps 0, 2 and 4
    with the text-to-video R@1 values ``r1s`` in turn."""
    from clipvip.distributed import DistEnv
    from clipvip.engine import Trainer, TrainerSettings, TrainPlan
    from clipvip.loss import LossSettings, build_loss

    folder = str(tmp_path / "clip")
    if not os.path.isdir(folder):
        write_hf_clip(folder)
    cfg = tiny_cfg(folder, "--output_dir", str(tmp_path / "run"), "--train_batch_size", "2", "--num_train_epochs", "2",
                   "--num_valid", "2", "--log_interval", "1", *overrides)
    torch.manual_seed(0)
    model = clipvip.build_model(cfg)
    plan = TrainPlan.from_config(cfg, num_examples=4, world_size=1)
    scores = iter(r1s)
    return Trainer(TrainerSettings.from_config(cfg), model, build_loss(LossSettings.from_config(cfg)),
                   stream or ListStream(fixed_batches()), plan,
                   evaluate=lambda m: {"test": eval_block(next(scores))}, env=DistEnv(), precision="fp32")


def test_the_trainer_reports_its_best_model_not_its_last_step(tmp_path):
    trainer = tiny_trainer(tmp_path, [5.0, 20.0, 15.0])
    trainer.fit()
    ckpt = str(tmp_path / "run" / "ckpt")
    reported = trainer.reported_results()["test"]
    assert (reported["t2v"]["R1"], reported["step"]) == (20.0, 2)  # the last validation (step 4) scored 15
    assert reported["checkpoint"] == os.path.join(ckpt, "model_best.pt")
    from clipvip.engine.checkpoints import checkpoint_step

    assert checkpoint_step(os.path.join(ckpt, "model_best.pt")) == 2
    assert checkpoint_step(os.path.join(ckpt, "model_step_4.pt")) == 4
    # A rerun of the finished run (nothing left to train or validate) reports the same.
    again = tiny_trainer(tmp_path)
    again.fit()
    assert again.reported_results() == trainer.reported_results()


def test_without_saved_models_the_last_validation_is_reported_and_names_no_file(tmp_path):
    trainer = tiny_trainer(tmp_path, [5.0, 20.0, 15.0], "--if_model_saver", "0")
    trainer.fit()
    reported = trainer.reported_results()["test"]
    assert (reported["t2v"]["R1"], reported["step"], reported["checkpoint"]) == (15.0, 4, None)
    assert not os.path.exists(tmp_path / "run" / "ckpt" / "model_best.json")


def test_convert_refuses_results_of_another_step(trained, bench, tmp_path, capsys):
    from clipvip.apps.main import main

    with open(os.path.join(trained, "eval_results.json")) as f:
        results = json.load(f)
    step = results["test"]["step"]
    results["test"]["step"] = step + 100
    other = tmp_path / "other_results.json"
    other.write_text(json.dumps(results))
    weights = os.path.join(trained, "ckpt", "model_best.pt")
    out = tmp_path / "hf"
    assert run_main(main, ["convert", "--config", os.path.join(trained, "config.json"), "--weights", weights,
                           "--out", str(out), "--results", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--results scores step {step + 100}, but {weights} holds step {step}" in err
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# Item 6: a resume with changed settings is refused or logged, per setting
# ----------------------------------------------------------------------------------------------
def test_a_changed_learning_rate_is_refused_in_one_line_and_in_the_log(trained, bench, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    before = snapshot(run)
    with open(bench["config"]) as f:
        saved_lr = json.load(f).get("learning_rate", DEFAULTS["learning_rate"])
    assert retrieval_cli("--config", bench["config"], "--is_train", "--output_dir", run,
                         "--learning_rate", "0.0083") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert f"learning_rate: saved {saved_lr}, now 0.0083" in err[0]
    assert "--output_dir" in err[0] and "--e2e_weights_path" in err[0]  # how to start a fresh run
    after = snapshot(run)
    log = after.pop(os.path.join("log", "log.txt")).decode()
    assert after == {k: v for k, v in before.items() if k != os.path.join("log", "log.txt")}
    assert log.rstrip().splitlines()[-1].endswith(err[0])  # the failure is the log's last line


def test_a_legitimate_change_is_logged_in_one_line_and_resumes(trained, bench, tmp_path, clipvip_log, capsys):
    run = copy_run(trained, tmp_path)
    assert retrieval_cli("--config", bench["config"], "--is_train", "--output_dir", run,
                         "--test_batch_size", "4", "--log_interval", "3") == 0
    messages = said(clipvip_log)
    changed = [m for m in messages if m.startswith("resuming with changed settings")]
    assert changed == ["resuming with changed settings that leave the run's course alone: test_batch_size: saved 2, "
                       "now 4; log_interval: saved 1, now 3"]
    assert any(m.startswith(f"resumed from {run}/ckpt/train_state.pt at step 4") for m in messages)
    capsys.readouterr()


def test_every_config_key_has_a_resume_rule():
    from clipvip.engine.state import LOG, NOT_COMPARED, REFUSE, RESUME_RULES

    unclassified = set(DEFAULTS) - set(RESUME_RULES) - NOT_COMPARED
    assert not unclassified, f"classify {sorted(unclassified)} in clipvip.engine.state.RESUME_RULES"
    assert set(RESUME_RULES.values()) == {REFUSE, LOG}


@pytest.mark.parametrize("overrides, rule", [
    (["--learning_rate", "1e-3"], "refuse"), (["--warmup_ratio", "0.2"], "refuse"), (["--decay", "linear"], "refuse"),
    (["--weight_decay", "0"], "refuse"), (["--betas", "0.9", "0.999"], "refuse"), (["--grad_norm", "5"], "refuse"),
    (["--loss_config.loss_name", "NCELearnableTempDSLLoss"], "refuse"), (["--bf16", "1"], "refuse"),
    (["--train_num_frms", "8"], "refuse"), (["--clip_vision_additional_config.add_cls_num", "1"], "refuse"),
    (["--train_datasets", '{"name": "other", "txt": "a.jsonl", "vis": "v"}'], "refuse"),
    (["--train_datasets", '{"name": "train", "txt": "/mnt/a.jsonl", "vis": "/mnt/v"}'], "log"),
    (["--train_datasets", '[{"name": "train", "txt": "a.jsonl", "vis": "v"}, {"name": "b"}]'], "refuse"),
    (["--n_workers", "0"], "log"), (["--test_batch_size", "64"], "log"), (["--e2e_weights_path", "x.pt"], "log"),
    (["--clip_vision_additional_config.temporal_init_std", "0.5"], "log"), (["--num_valid", "5"], "log"),
])
def test_resume_rules_per_setting(tmp_path, clipvip_log, overrides, rule):
    from clipvip.engine.state import check_fingerprint, resume_settings

    base = ["--train_datasets", '{"name": "train", "txt": "a.jsonl", "vis": "v"}']
    saved, now = (resume_settings(clipvip.load_config(None, words)) for words in (base, base + overrides))
    assert saved != now
    fingerprint = {"world_size": 1, "train_batch_size": 2, "gradient_accumulation_steps": 1, "total_steps": 4,
                   "seed": 0}
    if rule == "refuse":
        with pytest.raises(CheckpointError, match=r"other settings \(.*: saved .*, now .*\)"):
            check_fingerprint(fingerprint, fingerprint, str(tmp_path), saved, now)
    else:
        check_fingerprint(fingerprint, fingerprint, str(tmp_path), saved, now)
        assert len([m for m in said(clipvip_log) if m.startswith("resuming with changed settings")]) == 1


def test_another_architecture_is_refused_before_loading(tmp_path):
    """clip_config may name another folder (a moved copy), but not another shape."""
    tiny_trainer(tmp_path, [1.0, 1.0, 1.0]).fit()
    other = str(tmp_path / "patch4")
    write_hf_clip(other, patch_size=4)
    with pytest.raises(CheckpointError, match=r"holds a model of another shape \(.*patch_embedding.weight: "
                                              r"saved \(32, 3, 8, 8\), now \(32, 3, 4, 4\)"):
        tiny_trainer(tmp_path, [], "--clip_config", other, "--clip_weights", other)


# ----------------------------------------------------------------------------------------------
# Item 7: the console of a job, Ctrl-C, failures in log.txt
# ----------------------------------------------------------------------------------------------
class InterruptingStream(ListStream):
    """Sends this process SIGINT while the batch of step ``at`` is drawn (a Ctrl-C mid-run)."""

    def __init__(self, batches, at: int):
        super().__init__(batches)
        self.at = at

    def __next__(self):
        if self.taken + 1 == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return super().__next__()


def test_ctrl_c_ends_with_one_line_naming_the_saved_state(tmp_path, capsys):
    from clipvip.engine import TrainingInterrupted

    trainer = tiny_trainer(tmp_path, [1.0, 1.0], stream=InterruptingStream(fixed_batches(), at=2))
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit()
    state = os.path.join(str(tmp_path / "run"), "ckpt", "train_state.pt")
    assert str(info.value) == (f"interrupted at step 2: the training state is saved in {state}; rerun the same "
                               "command to resume from it")
    assert torch.load(state, weights_only=True)["progress"]["step"] == 2

    def interrupted(argv):
        raise info.value

    capsys.readouterr()  # the progress bars
    assert run_main(interrupted, []) == 130
    assert capsys.readouterr().err == str(info.value) + "\n"


def test_a_launchers_forwarded_sigint_is_not_a_second_ctrl_c(monkeypatch):
    from clipvip.engine.signals import StopRequest

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # a worker of torchrun / accelerate launch
    with StopRequest() as stop:
        try:
            os.kill(os.getpid(), signal.SIGINT)  # the terminal's
            os.kill(os.getpid(), signal.SIGINT)  # the launcher's, passed on
        except KeyboardInterrupt:
            pytest.fail("the launcher's copy of the Ctrl-C was taken for a second one: the step was cut short")
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)  # the user's second Ctrl-C
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    with StopRequest() as stop:  # a plain process: the second SIGINT is the user's
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def console():
    """What the ``clipvip`` logger's own stderr handler prints, as rank 1 of a job."""
    import io

    from clipvip import logging_utils

    buffer = io.StringIO()
    stream = logging_utils._CONSOLE.setStream(buffer)
    logging_utils.set_rank(1)
    yield buffer
    logging_utils.set_rank(0)
    logging_utils._CONSOLE.setStream(stream)


def test_other_ranks_log_warnings_and_errors_only_naming_their_rank(console, capsys):
    from clipvip.errors import ConfigError
    from clipvip.logging_utils import get_logger

    logger = get_logger("train")
    logger.info("done: 4 steps")
    logger.warning("a bad clip")
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING \[rank 1\] clipvip\.train: a bad clip\n", console.getvalue())

    def fails(argv):
        raise ConfigError("no data")

    def interrupted(argv):
        raise KeyboardInterrupt("interrupted at step 2: ...")

    assert run_main(fails, []) == 2 and run_main(interrupted, []) == 130
    assert capsys.readouterr().err == "error (rank 1): no data\n"  # the interrupt line is rank 0's alone
