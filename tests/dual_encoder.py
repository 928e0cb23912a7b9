"""A tiny two-tower model for the distributed tests (gloo in test_distributed.py, horovod in
horovod_worker.py): one linear map per tower, plus the log-temperature."""
import math

import torch
import torch.nn.functional as F
from torch import nn

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
