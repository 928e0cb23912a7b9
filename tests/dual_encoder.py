"""A tiny two-tower model for the distributed tests (gloo in test_distributed.py, horovod in
horovod_worker.py): one linear map per tower, plus the log-temperature."""
import math

import torch
import torch.nn.functional as F
from torch import nn

import clipvip.distributed as D
from clipvip.loss import LossSettings, build_loss

WORLD, B, P_IN, P = 2, 3, 6, 4  # processes, clips per process, input width, feature width


class TinyDualEncoder(nn.Module):
    """Video/frame and text/caption encoders: one linear map each, plus the log-temperature."""

    def __init__(self):
        super().__init__()
        self.vision = nn.Linear(P_IN, P)
        self.text = nn.Linear(P_IN, P)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, video, sub, frame, cap):
        return {"vis_features": F.normalize(self.vision(video), dim=-1),
                "text_features": F.normalize(self.text(sub), dim=-1),
                "img_features": F.normalize(self.vision(frame), dim=-1),
                "cap_features": F.normalize(self.text(cap), dim=-1),
                "logit_scale": self.logit_scale}


def assert_close(a, b, what):
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), f"{what}: {a} vs {b}"


def check_gather_and_loss_gradient(rank):
    """Run on every rank: the gather is in rank order; gathered loss and gradients match one process."""
    g = torch.Generator().manual_seed(0)
    full_v, full_t = (torch.randn(WORLD * B, P, generator=g, dtype=torch.float64) for _ in range(2))
    mine = slice(rank * B, (rank + 1) * B)

    gathered = D.all_gather_with_grad(full_v[mine].clone(), D.get_env())
    assert_close(gathered, full_v, "gathered batch in rank order")

    # single-process reference on the global batch
    ref_v, ref_t = full_v.clone().requires_grad_(), full_t.clone().requires_grad_()
    ref_scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    ref_loss = build_loss(LossSettings("NCELearnableTempLoss", gather=False))(
        {"vis_features": F.normalize(ref_v, dim=-1), "text_features": F.normalize(ref_t, dim=-1)}, ref_scale).total
    ref_loss.backward()

    v, t = full_v[mine].clone().requires_grad_(), full_t[mine].clone().requires_grad_()
    scale = torch.tensor(math.log(10.0), dtype=torch.float64, requires_grad=True)
    loss = build_loss(LossSettings("NCELearnableTempLoss", gather=True), D.get_env())(
        {"vis_features": F.normalize(v, dim=-1), "text_features": F.normalize(t, dim=-1)}, scale).total
    loss.backward()
    assert_close(loss, ref_loss, "gathered loss")
    assert_close(v.grad / WORLD, ref_v.grad[mine], "video grad / world")  # DDP's average divides by world
    assert_close(t.grad / WORLD, ref_t.grad[mine], "text grad / world")
    assert_close(scale.grad, ref_scale.grad, "logit_scale grad")  # full on every rank, so its average too
