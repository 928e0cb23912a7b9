"""What the apps say: `clipvip serve` port errors before the model loads, the precision notice,
the training plan / final line / epoch count, the resume line in log.txt, and which step
`model_best.pt` keeps when validations tie."""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from types import SimpleNamespace

import pytest
import torch

import clipvip
from clipvip.apps.cli import run_main
from clipvip.logging_utils import LOGGER as ROOT_LOGGER

from search_helpers import ENV, one_line_error
from tiny_models import ListStream


@pytest.fixture
def messages():
    """Every record of the ``clipvip`` logger, DEBUG included (it does not propagate to caplog's root)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, level = Keep(logging.DEBUG), ROOT_LOGGER.level
    ROOT_LOGGER.addHandler(handler)
    ROOT_LOGGER.setLevel(logging.DEBUG)
    yield records
    ROOT_LOGGER.removeHandler(handler)
    ROOT_LOGGER.setLevel(level)


def texts(records, level=logging.DEBUG):
    return [r.getMessage() for r in records if r.levelno >= level]


# ----------------------------------------------------------------------------------------------
# clipvip serve: the port is checked (bound) before the index and the model are loaded
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    """Opening the engine (index + model: seconds for B/32) records the call and fails loudly."""
    from clipvip.apps.search.engine import SearchEngine

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(SearchEngine, "open", classmethod(lambda cls, *a, **k: refuse(*a, **k)))
    return calls


def serve(capsys, *argv):
    from clipvip.apps.search.cli import serve_main

    code = run_main(serve_main, list(argv))
    return code, capsys.readouterr().err


def test_busy_port_is_one_line_before_any_model_load(tmp_path, capsys, no_model_load):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, err = serve(capsys, str(tmp_path / "idx"), "--port", str(port))
    assert no_model_load == []
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and f"port {port}" in lines[0] and "--port" in lines[0]
    assert "in use" in lines[0]


@pytest.mark.parametrize("port", ["99999", "65536", "-1"])
def test_port_out_of_range_is_one_line_before_any_model_load(tmp_path, capsys, no_model_load, port):
    code, err = serve(capsys, str(tmp_path / "idx"), "--port", port)
    assert no_model_load == [] and code == 2
    assert err.strip() == f"error: port {port} is out of range: a port is a number from 0 to 65535 " \
                          "(--port 0 picks a free one)"


def test_port_out_of_range_from_the_command_line(tmp_path):
    """The real command: no OverflowError traceback, one line, exit 2 (the index does not exist:
    the port is looked at first)."""
    result = subprocess.run([sys.executable, "-m", "clipvip", "serve", str(tmp_path / "nowhere"), "--port", "99999"],
                            capture_output=True, text=True, env=ENV, timeout=120)
    assert "port 99999 is out of range" in one_line_error(result)


def test_requests_made_while_the_model_loads_are_answered_on_the_bound_socket():
    """listen() binds first; a request sent before the engine is there waits in the backlog and is
    answered once serve() attaches the engine to that same socket."""
    from clipvip.apps.search.server import listen, serve as serve_engine

    class Index:  # what /api/info reads of an index
        meta = {"created": "then", "updated": None}
        dim = 24

        def __len__(self):
            return 3

    server = listen("127.0.0.1", 0)
    engine = SimpleNamespace(index=Index(), spec=SimpleNamespace(kind="flat"))
    answer = {}

    def ask():  # connects while nothing serves yet
        with urllib.request.urlopen(server.url + "api/info", timeout=60) as response:
            answer.update(json.loads(response.read()))

    client = threading.Thread(target=ask)
    client.start()
    client.join(0.3)
    assert client.is_alive() and not answer  # waiting: the "model" is still loading
    thread = threading.Thread(target=serve_engine, args=(engine,), kwargs={"server": server}, daemon=True)
    thread.start()
    client.join(60)
    server.shutdown()
    thread.join(60)
    assert answer == {"videos": 3, "dim": 24, "index_type": "flat", "created": "then", "updated": None,
                      "weights": None}
    assert server.socket.fileno() == -1  # serve() closed the socket it was given


# ----------------------------------------------------------------------------------------------
# The precision notice: only training talks about training
# ----------------------------------------------------------------------------------------------
def test_fp16_on_a_cpu_warns_only_when_training(messages):
    from clipvip.precision import precision_from_config

    cfg = clipvip.load_config(None, ["--fp16", "1"])
    assert precision_from_config(cfg, "cpu") == "fp32"
    assert precision_from_config(cfg, "cpu", "evaluation") == "fp32"
    assert texts(messages, logging.INFO) == []  # inference: nothing above DEBUG
    assert not any("train" in m for m in texts(messages))
    assert precision_from_config(cfg, "cpu", "training") == "fp32"
    assert texts(messages, logging.WARNING) == [
        "fp16 was asked for on cpu: training in fp32 (use --bf16 1 for mixed precision)"]


def test_search_encoder_does_not_talk_about_training(tmp_path, messages):
    """`clipvip index/search/serve` build an Encoder from the (fp16) config of the index."""
    from clipvip.apps.search.encode import Encoder
    from tiny_models import tiny_cfg, write_hf_clip

    folder = str(tmp_path / "clip")
    write_hf_clip(folder, vocab_size=49408, max_positions=32)
    encoder = Encoder(tiny_cfg(folder, "--fp16", "1", "--max_txt_len", "24"), "cpu")
    assert encoder.precision == "fp32"
    assert not any("fp16" in m or "training" in m for m in texts(messages, logging.INFO))


# ----------------------------------------------------------------------------------------------
# Training: the plan line, epochs, the last line, log.txt, model_best.pt
# ----------------------------------------------------------------------------------------------
def test_plan_line_explains_its_total():
    from clipvip.engine import TrainPlan

    cfg = clipvip.load_config(None, ["--train_batch_size", "8", "--num_train_epochs", "2"])
    plan = TrainPlan.from_config(cfg, num_examples=100, world_size=1)
    assert plan.total_steps == 25  # ceil(2 * 100 / 8), the original's count
    assert "100 examples: 12.5 steps per epoch, 2 epochs = 25 steps;" in plan.describe()
    assert plan.epochs_at(25) == 2.0 and plan.epochs_at(0) == 0.0
    cfg.update(num_train_epochs=3)
    plan = TrainPlan.from_config(cfg, num_examples=100, world_size=1)
    assert "12.5 steps per epoch, 3 epochs = 38 steps (37.5 rounded up);" in plan.describe()
    cfg.update(num_train_epochs=3, train_batch_size=3)
    plan = TrainPlan.from_config(cfg, num_examples=10, world_size=1)
    assert plan.total_steps == 10 and "3 epochs = 10 steps;" in plan.describe()  # no float noise


def eval_block(r1: float) -> dict:
    metrics = {"R1": r1, "R5": 100.0, "R10": 100.0, "MedianR": 1.0, "MeanR": 1.0}
    return {direction: dict(metrics) for direction in ("t2v", "v2t", "t2v_dsl", "v2t_dsl")}


def tiny_run(tmp_path, r1s: list[float], *overrides):
    """A Trainer over 2 fixed batches of 2 clips: 4 examples, 2 epochs = 4 steps, validated at
    steps 0, 2 and 4 with the text-to-video R@1 values ``r1s`` in turn."""
    from clipvip.distributed import DistEnv
    from clipvip.loss import LossSettings, build_loss
    from clipvip.engine import Trainer, TrainerSettings, TrainPlan
    from tiny_models import fixed_batches, tiny_cfg, write_hf_clip

    folder = str(tmp_path / "clip")
    if not os.path.isdir(folder):
        write_hf_clip(folder)
    cfg = tiny_cfg(folder, "--output_dir", str(tmp_path / "run"), "--train_batch_size", "2",
                   "--num_train_epochs", "2", "--num_valid", "2", "--log_interval", "1", "--max_txt_len", "16",
                   *overrides)
    torch.manual_seed(0)
    model = clipvip.build_model(cfg)
    batches = fixed_batches()
    plan = TrainPlan.from_config(cfg, num_examples=4, world_size=1)
    assert (plan.total_steps, plan.valid_steps) == (4, 2)
    scores = iter(r1s)
    return Trainer(TrainerSettings.from_config(cfg), model, build_loss(LossSettings.from_config(cfg)),
                   ListStream(batches), plan,
                   evaluate=lambda m: {"test": eval_block(next(scores))}, env=DistEnv(), precision="fp32")


def test_tied_validations_keep_the_latest_model_not_step_0(tmp_path, messages):
    trainer = tiny_run(tmp_path, [10.0, 10.0, 10.0])
    progress = trainer.fit()
    assert (progress.best_r1, progress.best_step) == (10.0, 4)
    ckpt = os.path.join(str(tmp_path / "run"), "ckpt")
    best = torch.load(os.path.join(ckpt, "model_best.pt"), weights_only=True)
    last = torch.load(os.path.join(ckpt, "model_step_4.pt"), weights_only=True)
    assert all(torch.equal(best[k], last[k]) for k in last)
    said = texts(messages, logging.INFO)
    assert "step 2: text-to-video R@1 10.00 ties step 0; ties go to the later step: ckpt/model_best.pt" in said
    assert "step 4: text-to-video R@1 10.00 ties step 2; ties go to the later step: ckpt/model_best.pt" in said


def test_a_lower_score_leaves_the_best_alone(tmp_path, messages):
    trainer = tiny_run(tmp_path, [5.0, 20.0, 15.0])
    progress = trainer.fit()
    assert (progress.best_r1, progress.best_step) == (20.0, 2)
    said = texts(messages, logging.INFO)
    assert "step 2: new best text-to-video R@1 20.00 (was 5.00 at step 0): ckpt/model_best.pt" in said
    assert not any(m.startswith("step 4: ") and "best" in m for m in said)


def test_epochs_plan_and_last_line_agree_and_the_resume_line_is_in_log_txt(tmp_path, messages):
    run = str(tmp_path / "run")
    tiny_run(tmp_path, [1.0, 2.0, 3.0]).fit()
    said = texts(messages, logging.INFO)
    assert any("4 examples: 2 steps per epoch, 2 epochs = 4 steps;" in m for m in said)
    done = [m for m in said if m.startswith("done: ")]
    assert done == ["done: 4 steps (2 epochs); best text-to-video R@1 3.00 at step 4; 0 non-finite steps "
                    "skipped, 0 fp16 overflow steps, 0 unreadable clips replaced"]
    with open(os.path.join(run, "log", "metrics.jsonl")) as f:
        epochs = [r["epoch"] for r in map(json.loads, f) if "loss" in r]
    assert epochs == [0.5, 1.0, 1.5, 2.0]  # epochs trained on, the last one = num_train_epochs
    state = torch.load(os.path.join(run, "ckpt", "train_state.pt"), weights_only=True)
    assert "epoch" not in state["progress"]  # it was always 0: the stream's state holds the position

    # The same command again: resumes from the final state, and log.txt says so.
    again = tiny_run(tmp_path, [])
    assert again.resumed and again.progress.step == 4
    again.fit()
    with open(os.path.join(run, "log", "log.txt")) as f:
        log = f.read()
    assert f"resumed from {run}/ckpt/train_state.pt at step 4" in log
    assert log.count("done: 4 steps (2 epochs)") == 2
