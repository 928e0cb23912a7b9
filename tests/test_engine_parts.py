"""The training engine's parts, each on its own: the step, the schedule, the state, the stop
request, the settings. The Trainer that wires them is tested in test_train_parts.py and
test_run_messages.py."""
import dataclasses
import math
import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clipvip
from clipvip.distributed import DistEnv, FeatureGather
from clipvip.engine.guard import PendingUpdate, UpdateReport
from clipvip.engine.logger import LogSettings
from clipvip.engine.optim import OptimizerSettings, learning_rate_at
from clipvip.engine.schedule import StepActions, TrainPlan, actions_at, best_model_change, needs_final_validation
from clipvip.engine.signals import StopRequest
from clipvip.engine.state import Progress, check_fingerprint, resume_training, run_fingerprint, save_training_state
from clipvip.engine.step import OptimizerStep, StepSettings, train_mode
from clipvip.engine.trainer import TrainerSettings
from clipvip.errors import CheckpointError
from clipvip.loss import LossOutput, LossSettings, build_loss

from tiny_models import ListStream

B, VIDEO_IN, WIDTH, VOCAB = 4, 6, 5, 11


class ToyRetrieval(nn.Module):
    """The interface the step needs of CLIPViPRetrieval, in a few parameters: video (B, VIDEO_IN)
    and text ids (B, S) in, L2-normalised ``vis_features``/``text_features`` (B, WIDTH) out."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.video = nn.Linear(VIDEO_IN, WIDTH)
        self.text = nn.Embedding(VOCAB, WIDTH)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, video, text_input_ids, text_input_mask):
        text = (self.text(text_input_ids) * text_input_mask[..., None]).sum(1)
        return {"vis_features": F.normalize(self.video(video), dim=-1), "text_features": F.normalize(text, dim=-1)}

    def freeze_text_encoder(self, freeze_projection: bool = False, cache_entries: int = 0) -> None:
        self.text.eval()
        self.text.weight.requires_grad_(False)

    def clamp_logit_scale(self) -> None:
        with torch.no_grad():
            self.logit_scale.clamp_(0, math.log(200))


def toy_batch(seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"video": torch.randn(B, VIDEO_IN, generator=g), "text_input_ids": torch.randint(0, VOCAB, (B, 3), generator=g),
            "text_input_mask": torch.ones(B, 3, dtype=torch.long), "num_skipped": 0}


def make_step(model, *overrides, total_steps=10):
    cfg = clipvip.load_config(None, ["--learning_rate", "1e-2", "--warmup_ratio", "0.5", *overrides])
    loss_fn = build_loss(LossSettings("NCELearnableTempLoss", gather=False))
    return OptimizerStep(model, loss_fn, StepSettings.from_config(cfg), OptimizerSettings.from_config(cfg), "fp32",
                         torch.device("cpu"), total_steps)


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------
def test_a_step_returns_its_loss_terms_and_update_and_changes_the_weights():
    model = ToyRetrieval()
    step = make_step(model, "--nonfinite_check", "step")
    batch = toy_batch()
    expected = step.loss_fn(model(batch["video"], batch["text_input_ids"], batch["text_input_mask"]),
                            model.logit_scale)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = step(3, [batch])
    assert result.step == 3 and result.clips == B
    assert result.lr == pytest.approx(learning_rate_at(3, step.optimizer_settings, 10))  # still in the warmup
    assert all(g["lr"] == pytest.approx(result.lr) for g in step.optimizer.param_groups)
    assert result.loss.item() == pytest.approx(expected.total.item())
    assert list(result.terms) == ["v2t", "t2v"] and not any(t.requires_grad for t in result.terms.values())
    assert sum(result.terms.values()).item() == pytest.approx(result.loss.item())
    assert isinstance(result.update, UpdateReport) and result.update.finite and result.update.nonfinite == 0
    assert result.update.loss == pytest.approx(result.loss.item())
    assert not any(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step


def test_a_nonfinite_step_changes_no_weight_and_says_so():
    model = ToyRetrieval()
    step = make_step(model, "--nonfinite_check", "step")
    real = step.loss_fn.forward
    step.loss_fn.forward = lambda outputs, scale: LossOutput(real(outputs, scale).total * float("nan"), {})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = step(1, [toy_batch()])
    assert not result.update.finite and result.update.nonfinite == 1 and result.update.in_a_row == 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_deferred_step_hands_back_a_pending_update_read_once():
    model = ToyRetrieval()
    step = make_step(model, "--nonfinite_check", "deferred")
    if not step.update.deferred:
        pytest.skip("no fused AdamW for CPU in this torch")
    first, second = step(1, [toy_batch(1)]), step(2, [toy_batch(2)])
    assert isinstance(first.update, PendingUpdate) and isinstance(second.update, PendingUpdate)
    assert bool(second.update.applied)
    report = second.update.read()  # both steps since the last read
    assert report.finite and report.nonfinite == 0 and report.loss == pytest.approx(second.loss.item())
    assert first.update.read() is None  # already read


def test_the_step_clamps_the_temperature():
    model = ToyRetrieval()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    make_step(model)(1, [toy_batch()])
    assert model.logit_scale.item() <= math.log(200) + 1e-6


def test_train_mode_is_where_the_text_tower_freezes():
    model = ToyRetrieval()
    frozen = StepSettings.from_config(clipvip.load_config(None, ["--freeze_text_encoder", "1"]))
    model.eval()
    train_mode(model, frozen)
    assert model.training and model.video.training and not model.text.training
    assert not model.text.weight.requires_grad
    step = make_step(model, "--freeze_text_encoder", "1")
    assert model.text.weight not in {p for g in step.optimizer.param_groups for p in g["params"]}
    train_mode(model, StepSettings.from_config(clipvip.load_config(None)))
    assert model.text.training  # not frozen by these settings: back to training like the rest


# ----------------------------------------------------------------------------------------------
# The schedule
# ----------------------------------------------------------------------------------------------
PLAN = TrainPlan(world_size=1, per_device_batch=2, accumulation=1, global_batch=2, num_examples=20,
                 steps_per_epoch=10, total_steps=20, valid_steps=10, only_valid_steps=4, state_steps=6,
                 epochs=2.0, epoch_steps=10.0)


def test_the_cadence_of_validation_state_and_logging():
    assert actions_at(PLAN, 10, log_every=5) == StepActions(log=True, validate=True, step_checkpoint=True,
                                                            save_state=True)
    assert actions_at(PLAN, 4, log_every=5) == StepActions(False, validate=True, step_checkpoint=False, save_state=True)
    assert actions_at(PLAN, 6, log_every=5) == StepActions(False, validate=False, step_checkpoint=False, save_state=True)
    assert actions_at(PLAN, 15, log_every=5) == StepActions(True, False, False, False)
    quiet = actions_at(PLAN, 7, log_every=5)
    assert quiet == StepActions(False, False, False, False) and not quiet.sync_point
    assert actions_at(PLAN, 20, log_every=7).log  # the last step always logs
    assert all(actions_at(PLAN, s, 5).sync_point for s in (4, 5, 6, 10, 20))


def test_the_end_validates_unless_the_last_step_did():
    assert not needs_final_validation(PLAN, 20)
    assert needs_final_validation(dataclasses.replace(PLAN, total_steps=21), 21)


def test_best_model_rule_ties_go_to_the_later_step():
    assert best_model_change(5.0, best_r1=-1.0, best_step=-1) == "first"
    assert best_model_change(6.0, best_r1=5.0, best_step=0) == "better"
    assert best_model_change(5.0, best_r1=5.0, best_step=0) == "tie"
    assert best_model_change(4.0, best_r1=5.0, best_step=0) == "worse"


# ----------------------------------------------------------------------------------------------
# The state
# ----------------------------------------------------------------------------------------------
def test_a_state_resumes_only_the_same_run(tmp_path):
    fingerprint = run_fingerprint(PLAN, seed=42)
    assert fingerprint == {"world_size": 1, "train_batch_size": 2, "gradient_accumulation_steps": 1,
                           "total_steps": 20, "seed": 42}
    check_fingerprint(dict(fingerprint), fingerprint, str(tmp_path))
    with pytest.raises(CheckpointError, match="seed: saved 42, now 7"):
        check_fingerprint(fingerprint, run_fingerprint(PLAN, seed=7), str(tmp_path))


def test_resume_training_restores_weights_optimizer_progress_and_position(tmp_path):
    folder = str(tmp_path)
    model = ToyRetrieval()
    step = make_step(model)
    stream = ListStream([toy_batch(i) for i in range(5)])
    assert resume_training(folder, {}, model, step.optimizer, step.scaler, stream) is None  # nothing saved
    step(1, [next(stream)])
    save_training_state(folder, model, step.optimizer, step.scaler, Progress(step=1, best_r1=3.0, best_step=1),
                        run_fingerprint(PLAN, 42), data=stream.state_dict())

    fresh = ToyRetrieval()
    fresh_step = make_step(fresh)
    fresh_stream = ListStream([toy_batch(i) for i in range(5)])
    progress = resume_training(folder, run_fingerprint(PLAN, 42), fresh, fresh_step.optimizer, fresh_step.scaler,
                               fresh_stream)
    assert (progress.step, progress.best_r1, progress.best_step) == (1, 3.0, 1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    assert fresh_step.optimizer.state_dict()["state"].keys() == step.optimizer.state_dict()["state"].keys()
    assert fresh_stream.state_dict() == stream.state_dict()
    with pytest.raises(CheckpointError, match="total_steps"):
        resume_training(folder, run_fingerprint(dataclasses.replace(PLAN, total_steps=30), 42), fresh,
                        fresh_step.optimizer, fresh_step.scaler, fresh_stream)


def test_a_state_from_before_the_settings_check_still_resumes(tmp_path, clipvip_log):
    """States written before they recorded the settings: the plan's numbers are compared, the rest is said."""
    folder = str(tmp_path)
    model = ToyRetrieval()
    step = make_step(model)
    stream = ListStream([toy_batch(i) for i in range(5)])
    save_training_state(folder, model, step.optimizer, step.scaler, Progress(step=1), run_fingerprint(PLAN, 42),
                        data=stream.state_dict())
    assert "settings" not in torch.load(os.path.join(folder, "train_state.pt"), weights_only=True)
    fresh = ToyRetrieval()
    fresh_step = make_step(fresh)
    progress = resume_training(folder, run_fingerprint(PLAN, 42), fresh, fresh_step.optimizer, fresh_step.scaler,
                               ListStream([]), settings={"learning_rate": 1e-3})
    assert progress.step == 1
    assert "records no settings besides world size, batch, accumulation, length and seed" in clipvip_log.text


# ----------------------------------------------------------------------------------------------
# The stop request
# ----------------------------------------------------------------------------------------------
def test_a_signal_only_asks_for_a_stop_and_the_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest() as stop:
        assert not stop.anywhere(1, torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.anywhere(1, torch.device("cpu"))
    assert signal.getsignal(signal.SIGTERM) is before


# ----------------------------------------------------------------------------------------------
# Settings and the gather
# ----------------------------------------------------------------------------------------------
def test_settings_come_from_the_config_and_are_frozen(tmp_path):
    cfg = clipvip.load_config(None, ["--output_dir", str(tmp_path), "--log_interval", "0", "--grad_norm", "0",
                                     "--freeze_text_encoder", "1", "--loss_config.if_gather", "0"])
    settings = TrainerSettings.from_config(cfg)
    assert settings.output_dir == str(tmp_path) and settings.seed == cfg.seed
    assert settings.log_interval == 1  # at least every step
    assert settings.step.grad_norm == 0 and settings.step.freeze_text_encoder
    assert settings.optimizer == OptimizerSettings.from_config(cfg) and settings.log == LogSettings.from_config(cfg)
    assert settings.log.run_config == cfg.to_dict()
    assert LossSettings.from_config(cfg) == LossSettings(cfg.loss_config["loss_name"], gather=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1


def test_the_loss_gathers_over_the_job_it_was_built_for():
    env = DistEnv(rank=0, world_size=1)
    loss_fn = build_loss(LossSettings("NCELearnableTempLoss", gather=True), env)
    assert loss_fn.gather == FeatureGather(env) and loss_fn.gather.equal_sizes
    x = torch.randn(3, 2)
    assert loss_fn.gather(x) is x  # one process: the identity
    assert build_loss(LossSettings("NCELearnableTempLoss", gather=False), env).gather is None
