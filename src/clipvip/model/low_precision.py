"""Low-precision copies of the weights, made once per optimizer step instead of at every use.

Under bf16/fp16 autocast every matmul casts its fp32 weight to the low dtype where it is used:
once per forward pass for a plain weight (autocast caches casts of leaf tensors inside one
``autocast`` region), on every call for a weight the fast paths derive from the parameters (the
fused QKV weight is a ``cat`` of three; the folded MLP scales fc1 and fc2), again for every
micro-batch of an accumulated step and again when gradient checkpointing recomputes a layer. On a
GPU these casts are a visible share of a step (issue 23's profile: part of 748 ``copy_`` calls,
~14 ms of a ~75 ms B/32 step). Here each such weight is cast once, when its parameters have
changed, i.e. once per optimizer step; evaluation, where nothing changes, casts once.

The design, and why it is the simplest that stays equal to autocast:

- **The parameters stay fp32 and are the master weights**, as they are under autocast: the
  optimizer, gradient clipping, ``logit_scale``'s clamp, the state dicts (checkpoints keep their
  released key names and fp32 values), ``load_state_dict`` and DDP see exactly what they see
  without copies. The copies are plain attributes of the modules that use them (never buffers, so
  no state dict or ``model.to(dtype)`` ever sees them).
- **A copy is what autocast would have computed**: ``(scale * cat(masters)).to(dtype)``, the
  product in fp32 and then rounded, the same bits (:class:`Derived`). Autocast stays on around
  the forward pass, so LayerNorm, softmax, the loss and everything else run in the precision
  autocast gives them; only the weights of the fast paths' matmuls come from the copies.
- **Gradients reach the fp32 masters**: :class:`LowPrecisionCopy` hands the forward the copy and
  in backward turns the low-precision gradient of the copy into fp32 gradients of its masters
  (times ``scale``, split back into the masters), which is what autograd does for autocast's cast.
  So gradients accumulate in fp32 across micro-batches, and DDP all-reduces the fp32 master
  gradients, as without copies (apex O2 all-reduced fp16 gradients: half the traffic, but an fp16
  sum; the fp32 gradients keep the results of a run independent of this switch).
- **Made once per optimizer step**: a copy remembers the storage and version counter of its
  masters (in-place changes bump the counter: ``load_state_dict``, ``copy_``, an optimizer step;
  the fused AdamW kernel does not, so the training step bumps it with
  ``torch.autograd.graph.increment_version``, as any loop that uses such a kernel must) and is
  recomputed at the next :meth:`WeightCopies.refresh` only when they changed.
  A frozen text tower is therefore cast once per run, and an evaluation casts only what the last
  optimizer step changed. Refreshing writes into the same tensors in place (one multi-tensor
  copy), so compiled code and CUDA graphs see the same inputs step after step.
- **Scoped**: the copies are used only inside :func:`clipvip.model.fast_paths.weight_copies` (the
  training step around its micro-batches, evaluation around its batches), and only where the
  autocast dtype is theirs. Outside it, nothing changes: a parameter changed by hand between two
  steps cannot meet a stale copy.

What keeps its cast per use: embeddings (autocast leaves embedding lookups in fp32) and
everything the ``eager`` formulation and the plain layers of layers.py compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import nn

# Attributes kept on the modules (never buffers: no state dict, no ``model.to(dtype)`` sees them)
_STORE = "_weight_copy_store"  # on an owner: {name: _Entry}, the copies, kept between steps
_KEPT = "_weight_copies_kept"  # on an owner: its ActiveCopies, kept between steps
_ACTIVE = "_weight_copies"  # on an owner: that ActiveCopies while a weight_copies() block runs, else None
_OWNERS = "_weight_copy_owners"  # on the model: the modules that declare derived weights


@dataclass(frozen=True, eq=False)
class Derived:
    """A weight a fast path computes from parameters: ``scale * cat(masters)`` along dim 0, each
    master of more than one dimension flattened to (rows, -1) (a convolution's (D, C, p, p)
    weight becomes the (D, C*p*p) matrix of its patch matmul)."""

    masters: tuple[torch.Tensor, ...]
    scale: float = 1.0

    def shape(self) -> tuple[int, ...]:
        first = self.masters[0]
        cols = () if first.dim() == 1 else (first[0].numel(),)
        return (sum(m.shape[0] for m in self.masters), *cols)


class LowPrecisionCopy(torch.autograd.Function):
    """One module's copies for autograd. Forward: the copies themselves (no cast). Backward: each
    copy's low-precision gradient as gradients of its masters in their dtype, ``scale`` applied
    and split back along dim 0 (what the backward of autocast's cast, of the fused weights' cat and
    of the fold's scaling computes).

    ``apply(layout, *copies, *masters)``, ``layout`` one ``(scale, number of masters)`` per copy.
    """

    @staticmethod
    def forward(ctx, layout, *tensors):
        copies = tensors[:len(layout)]
        masters = tensors[len(layout):]
        ctx.layout = layout
        ctx.shapes = [m.shape for m in masters]
        ctx.dtypes = [m.dtype for m in masters]
        ctx.set_materialize_grads(False)  # a copy this call did not use: no gradient for its masters
        return tuple(c.view_as(c) for c in copies)

    @staticmethod
    def backward(ctx, *grads):
        out: list[Optional[torch.Tensor]] = []
        first = 0
        for (scale, count), grad in zip(ctx.layout, grads):
            shapes = ctx.shapes[first:first + count]
            if grad is None:
                out += [None] * count
            else:
                grad = grad.to(ctx.dtypes[first])
                if scale != 1.0:
                    grad = grad * scale
                parts = grad.split([s[0] for s in shapes]) if count > 1 else (grad,)
                out += [part.reshape(shape) for part, shape in zip(parts, shapes)]
            first += count
        return (None, *([None] * len(ctx.layout)), *out)


@dataclass(eq=False)
class _Entry:
    """One copy and what it was made from."""

    copy: torch.Tensor  # (rows, ...) in the low dtype
    targets: list[torch.Tensor]  # views of ``copy``, one per master, in the master's shape
    derived: Derived
    made_from: Optional[tuple] = None  # the masters' (storage, version) when last written


class ActiveCopies:
    """What a module's fast path reads while copies are in use (one object per module, reused
    from step to step so that compiled code sees the same object)."""

    def __init__(self, dtype: torch.dtype, entries: dict[str, _Entry]):
        self.dtype, self.entries = dtype, entries
        self.names = tuple(entries)
        self.copies = tuple(e.copy for e in entries.values())
        self.masters = tuple(m for e in entries.values() for m in e.derived.masters)
        self.layout = tuple((e.derived.scale, len(e.derived.masters)) for e in entries.values())

    def weights(self, x: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
        """The copies as autograd sees them, or None where ``x`` runs outside an autocast of
        this dtype (then the caller computes as without copies)."""
        device = x.device.type
        if not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) != self.dtype:
            return None
        if torch.is_grad_enabled() and any(m.requires_grad for m in self.masters):
            return dict(zip(self.names, LowPrecisionCopy.apply(self.layout, *self.copies, *self.masters)))
        return dict(zip(self.names, self.copies))  # no gradient wanted: the tensors themselves


def active(module: nn.Module, x: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
    """The low-precision weights of ``module`` for input ``x``, or None (compute as usual)."""
    copies: Optional[ActiveCopies] = getattr(module, _ACTIVE, None)
    return None if copies is None else copies.weights(x)


def _made_from(derived: Derived) -> tuple:
    return tuple((m.data_ptr(), m._version) for m in derived.masters)


def _owners(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` with a ``fast_weights()`` declaration, found once per model."""
    owners = model.__dict__.get(_OWNERS)
    if owners is None:
        owners = model.__dict__[_OWNERS] = [m for m in model.modules() if callable(getattr(type(m), "fast_weights", None))]
    return owners


class WeightCopies:
    """The copies of every module of ``model`` that declares derived weights.

    A module declares them with a ``fast_weights()`` method returning ``{name: Derived}`` (empty
    where its fast path is off; the same dict object as long as nothing changed, so that the
    checks here are identity checks). :meth:`refresh` (re)writes the stale copies and shows them to
    the modules; :meth:`release` puts back what the modules showed before.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        self.dtype = dtype
        self.owners = [(m, d) for m in _owners(model) for d in [m.fast_weights()] if d]
        self._previous: list = []

    def __len__(self) -> int:
        return sum(len(d) for _, d in self.owners)

    def _entry(self, store: dict, name: str, derived: Derived) -> _Entry:
        """The kept entry of ``name`` where it still fits ``derived``, else a new one."""
        entry = store.get(name)
        device = derived.masters[0].device
        if entry is not None and entry.copy.dtype == self.dtype and entry.copy.device == device:
            if entry.derived is derived:  # the usual case: the same declaration as last step
                return entry
            if (tuple(entry.copy.shape) == derived.shape() and len(entry.derived.masters) == len(derived.masters)
                    and all(a is b for a, b in zip(entry.derived.masters, derived.masters))):
                entry.derived = derived
                return entry
        copy = torch.empty(derived.shape(), dtype=self.dtype, device=device)
        if device.type == "cuda":  # written in place every step: CUDA graphs may read it where it is
            torch._dynamo.mark_static_address(copy)
        targets, row = [], 0
        for master in derived.masters:  # row slices of a contiguous tensor: contiguous views
            targets.append(copy[row:row + master.shape[0]].view(master.shape))
            row += master.shape[0]
        entry = store[name] = _Entry(copy, targets, derived)
        return entry

    def refresh(self) -> int:
        """Write every copy whose masters changed since it was written and show the copies to
        their modules; returns how many were written."""
        stale: list[_Entry] = []
        # Outside any inference_mode of the caller: the copies must stay usable by autograd later.
        with torch.inference_mode(False), torch.no_grad():
            for module, derived in self.owners:
                store = module.__dict__.setdefault(_STORE, {})
                entries = {name: self._entry(store, name, d) for name, d in derived.items()}
                stale += [e for e in entries.values() if e.made_from != _made_from(e.derived)]
                kept: Optional[ActiveCopies] = module.__dict__.get(_KEPT)
                if kept is None or kept.dtype != self.dtype or kept.entries != entries:
                    module.__dict__[_KEPT] = ActiveCopies(self.dtype, entries)
            _write(stale)
        for entry in stale:
            entry.made_from = _made_from(entry.derived)
        self._previous = [module.__dict__.get(_ACTIVE) for module, _ in self.owners]
        for module, _ in self.owners:
            module.__dict__[_ACTIVE] = module.__dict__[_KEPT]
        return len(stale)

    def release(self) -> None:
        for (module, _), previous in zip(self.owners, self._previous):
            module.__dict__[_ACTIVE] = previous


def _write(entries: Iterable[_Entry]) -> None:
    """``copy = (scale * cat(masters)).to(dtype)`` for every entry, as few kernels as possible:
    the masters are written into row slices of their copy (no cat), scaled ones first multiplied
    in fp32 (one multi-tensor kernel per scale), then all converted and copied at once."""
    by_scale: dict[float, tuple[list, list]] = {}
    for entry in entries:
        targets, sources = by_scale.setdefault(entry.derived.scale, ([], []))
        targets += entry.targets
        sources += [m.detach() for m in entry.derived.masters]
    for scale, (targets, sources) in by_scale.items():
        if scale != 1.0:
            sources = torch._foreach_mul(sources, scale)
        torch._foreach_copy_(targets, sources)
