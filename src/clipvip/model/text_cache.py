"""The pooled states of a frozen text tower, remembered by caption.

A frozen text tower (``freeze_text_encoder``: no gradient, eval mode, so no dropout) gives a
caption the same pooled state every time it sees it; a fine-tuning run sees each of its captions
once an epoch, and its validations see the test captions again and again. The cache computes each
caption's state once and gives it back afterwards: the text tower's share of a step is saved from
the second epoch on (5-12 % of the demo's step on a CPU, docs/performance.md). Only the frozen
part is cached: ``text_projection``, which usually still learns, runs every step.

What a cached state stands for, exactly:

- the caption is its token ids where the attention mask is 1, so the same caption padded to
  another length is the same entry (its pooled EOS state does not depend on padding: the
  attention is causal and never looks at padding keys);
- the tower's weights are those the state was computed with: the cache remembers each text
  parameter's storage and version counter (``Tensor._version``, bumped by every in-place change:
  ``load_state_dict``, ``copy_``, an optimizer step) and the autocast dtype, and starts afresh when
  any of them differ;
- it is only consulted when nothing could need a gradient through the tower (no text parameter
  requires one) and the tower is in eval mode; otherwise the tower runs as always;
- not inside compiled code (``compile: 1``): finding the captions reads the token ids on the host,
  which a compiled training step cannot do without a graph break, so there the frozen tower runs
  every step, as without the cache.

A hit returns the state computed the first time, which may differ from a recomputation in the last
float bits (another batch, another summation order): the same tolerance as any change of batch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class FrozenTextCache:
    """Up to ``max_entries`` pooled text states (B, D) by caption; the first ones seen are kept."""

    def __init__(self, max_entries: int):
        if max_entries <= 0:
            raise ValueError(f"max_entries must be > 0, got {max_entries}")
        self.max_entries = int(max_entries)
        self._states: dict[tuple[int, ...], torch.Tensor] = {}  # caption -> (D,)
        self._weights: Optional[tuple] = None  # what the states were computed with
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._states)

    def clear(self) -> None:
        self._states.clear()
        self._weights = None

    @staticmethod
    def applies(text_model: nn.Module) -> bool:
        """Whether the tower is frozen: eval mode and no parameter that wants a gradient."""
        return not text_model.training and not any(p.requires_grad for p in text_model.parameters())

    @staticmethod
    def _weights_key(text_model: nn.Module, device: torch.device) -> tuple:
        params = tuple((p.data_ptr(), p._version, p.dtype) for p in text_model.parameters())
        autocast = torch.is_autocast_enabled(device.type) and torch.get_autocast_dtype(device.type)
        return params, device, autocast

    def __call__(self, text_model: nn.Module, input_ids: torch.Tensor,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``text_model(input_ids, attention_mask)``, (B, S) -> (B, D), from the cache where it can."""
        # Compiled code: no host reads inside a graph (see the module docstring).
        if torch.compiler.is_compiling() or not self.applies(text_model):
            return text_model(input_ids, attention_mask)
        weights = self._weights_key(text_model, input_ids.device)
        if weights != self._weights:
            self.clear()
            self._weights = weights
        ids = input_ids.tolist()
        if attention_mask is None:
            captions = [tuple(row) for row in ids]
        else:
            captions = [tuple(t for t, m in zip(row, mask) if m) for row, mask in zip(ids, attention_mask.tolist())]
        missing = [i for i, caption in enumerate(captions) if caption not in self._states]
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        if len(missing) == len(captions):  # the first epoch: the whole batch, as without the cache
            with torch.no_grad():
                states = text_model(input_ids, attention_mask)
            self._remember(captions, states)
            return states
        missing_set = set(missing)
        hit_rows = [i for i in range(len(captions)) if i not in missing_set]
        cached = torch.stack([self._states[captions[i]] for i in hit_rows])  # (hits, D)
        if not missing:
            return cached
        rows = torch.tensor(missing, device=input_ids.device)
        with torch.no_grad():
            computed = text_model(input_ids[rows], None if attention_mask is None else attention_mask[rows])
        self._remember([captions[i] for i in missing], computed)
        states = computed.new_empty(len(captions), computed.shape[-1])
        states[rows] = computed
        states[torch.tensor(hit_rows, device=input_ids.device)] = cached.to(computed.dtype)
        return states

    def _remember(self, captions: list[tuple[int, ...]], states: torch.Tensor) -> None:
        for caption, state in zip(captions, states):
            if len(self._states) >= self.max_entries:
                return
            self._states.setdefault(caption, state.detach().clone())
