"""Ctrl-C / SIGTERM during training, turned into a stop between two optimizer steps."""
from __future__ import annotations

import os
import signal
import threading

import torch

from clipvip import distributed
from clipvip.logging_utils import get_logger

LOGGER = get_logger("train")


class StopRequest:
    """Ctrl-C / SIGTERM during training: finish the current step, save the state, then stop.

    A signal only sets a flag that the loop checks between steps (a second Ctrl-C interrupts at
    once). Raising KeyboardInterrupt wherever the signal lands is not enough: inside a decoder's
    C callback (decord) it is printed and swallowed, and mid-step it would leave processes of a
    distributed job at different steps. With several processes the flag is combined over all of
    them each step, so every process stops after the same step.

    Under torchrun (and ``accelerate launch``, which runs its agent) one Ctrl-C reaches a worker
    twice: from the terminal, and again from the launcher, which passes the signal it got on to its
    workers. That second SIGINT is not the user's "stop now": it is ignored once.
    """

    def __init__(self, when: str = "after this step", forwarded_sigints: int | None = None):
        self.requested = False
        self.when = when  # where the loop looks at the flag, for the message
        # SIGINTs a launcher forwards per Ctrl-C (TORCHELASTIC_RUN_ID: a worker of torch's elastic agent)
        self.forwarded = int("TORCHELASTIC_RUN_ID" in os.environ) if forwarded_sigints is None else forwarded_sigints
        self._repeats = 0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            self._repeats += 1
            if self._repeats > self.forwarded:
                raise KeyboardInterrupt
            return
        if self.requested:
            return
        self.requested = True
        LOGGER.warning("%s: stopping %s and saving the training state (Ctrl-C again to stop now)",
                       signal.Signals(signum).name, self.when)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def anywhere(self, world_size: int, device: torch.device) -> bool:
        """Whether any process was asked to stop (a collective when ``world_size`` > 1)."""
        if world_size <= 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        return bool(distributed.all_reduce_mean(flag).item() > 0)
