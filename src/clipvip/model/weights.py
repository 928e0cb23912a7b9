"""Reading and writing weights: HF CLIP folders, released CLIP-ViP ``.pt`` files, our checkpoints.

Every ``torch.load`` here passes ``weights_only=True``: a checkpoint is data and must never run code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterable

import torch
from safetensors.torch import load_file
from torch import nn

from clipvip.errors import CheckpointError
from clipvip.files import atomic_write
from clipvip.logging_utils import get_logger
from clipvip.weights_ref import HF_WEIGHT_FILES, checkpoint_file, hf_weights_file, resolve_pretrained_path

LOGGER = get_logger("weights")

# Prefixes that wrappers add to parameter names and that a checkpoint must not depend on.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Buffers that are always arange() and that checkpoints may or may not carry.
OPTIONAL_KEY_SUFFIXES = ("position_ids",)
SUMMARY_KEYS_SHOWN = 8
# Suffixes of weight files, for "did you mean" when a folder is given where a file is expected.
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
SUGGESTIONS_SHOWN = 3
# A run folder's resumable training state (clipvip.engine.state.STATE_FILE): optimizer and all,
# not model weights, so never suggested as a checkpoint.
TRAIN_STATE_FILE = "train_state.pt"


def _file_format(path: str) -> str:
    """``"torch"`` (a torch.save zip or legacy pickle), ``"safetensors"``, or what else it looks like.

    Read from the first bytes, not the suffix, so that a text or HTML file saved under a ``.pt``
    name (an error page, a Git LFS pointer) is named as such instead of failing inside the unpickler.
    """
    with open(path, "rb") as f:
        head = f.read(64)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # zip (torch >= 1.6) / pickle protocol 2+
        return "torch"
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    if len(head) > 8 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    if not head:
        return "an empty file (an interrupted download?)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer (run git lfs pull where the file came from)"
    text = head.decode("utf-8", errors="replace")
    printable = sum(c.isprintable() or c.isspace() for c in text) >= 0.9 * len(text)
    return f"a text file beginning {text[:40]!r}" if printable else f"binary data beginning {head[:16]!r}"


def _weight_files_in(folder: str) -> list[str]:
    """Weight files in ``folder`` and its direct subfolders (a run folder keeps them in ``ckpt/``),
    ``model_best`` first, then the newest."""
    found = []
    for root in [folder] + sorted(e.path for e in os.scandir(folder) if e.is_dir()):
        found += [e.path for e in os.scandir(root)
                  if e.is_file() and e.name.endswith(WEIGHT_SUFFIXES) and e.name != TRAIN_STATE_FILE]
    return sorted(found, key=lambda p: ("model_best" not in os.path.basename(p), -os.path.getmtime(p)))


def _directory_message(path: str) -> str:
    try:
        found = _weight_files_in(path)
    except OSError:
        found = []
    if os.path.isfile(os.path.join(path, "config.json")) and any(
            os.path.isfile(os.path.join(path, name)) for name in HF_WEIGHT_FILES):
        return (f"{path} is a directory - a Hugging Face model folder: pass it as --clip_weights "
                f"(image CLIP initialisation); a CLIP-ViP checkpoint is a single .pt file")
    if not found:
        return f"{path} is a directory with no {', '.join(WEIGHT_SUFFIXES)} file in it or its subfolders"
    others = f" (also there: {', '.join(found[1:SUGGESTIONS_SHOWN + 1])}" + \
        (f" and {len(found) - SUGGESTIONS_SHOWN - 1} more)" if len(found) > SUGGESTIONS_SHOWN + 1 else ")")
    return f"{path} is a directory - did you mean {found[0]}?" + (others if len(found) > 1 else "")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or ``torch.save`` file, on the CPU."""
    if os.path.isdir(path):
        raise CheckpointError(_directory_message(path))
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        kind = _file_format(path)
        if kind == "safetensors":
            state = load_file(path, device="cpu")
        elif kind == "torch":
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, pickle with code, truncated download ...
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    if kind not in ("torch", "safetensors"):
        raise CheckpointError(f"{path} is not a checkpoint (a torch.save or .safetensors file): it is {kind}")
    # Some tools wrap the weights: {"model": {...}} / {"state_dict": {...}}.
    for wrapper_key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper_key), dict) and len(state) <= 4:
            state = state[wrapper_key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a dict of tensors (a state dict)")
    return {strip_wrapper_prefixes(k): v for k, v in state.items()}


def strip_wrapper_prefixes(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key.replace("._orig_mod.", ".")


def is_optional_key(key: str) -> bool:
    return key.endswith(OPTIONAL_KEY_SUFFIXES)


@dataclass
class LoadReport:
    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, checkpoint, model
    initialised: list[str] = field(default_factory=list)  # missing on purpose (new CLIP-ViP tensors)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self) -> str:
        return "\n".join([f"loaded {self.loaded} tensors from {self.source}", *self.detail_lines()])

    def detail_lines(self) -> list[str]:
        lines = []

        def block(title: str, items: list[str]) -> None:
            if items:
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {item}" for item in items[:SUMMARY_KEYS_SHOWN])
                if len(items) > SUMMARY_KEYS_SHOWN:
                    lines.append(f"    ... and {len(items) - SUMMARY_KEYS_SHOWN} more")

        block("initialised fresh", self.initialised)
        block("missing from the checkpoint", self.missing)
        block("unexpected in the checkpoint", self.unexpected)
        block("shape mismatch (checkpoint vs model), not loaded",
              [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in self.mismatched])
        return lines

    def patch_size_hint(self) -> str:
        """A note for the refusal when the patch embeddings differ (a B/16 checkpoint, a B/32 config)."""
        for key, ckpt, model in self.mismatched:
            if key.endswith("patch_embedding.weight") and len(ckpt) == 4 and ckpt[2:] != model[2:]:
                return f" (the checkpoint has patch size {ckpt[-1]}, the config {model[-1]})"
        return ""


def match_state(
    module: nn.Module, state: dict[str, torch.Tensor], source: str, expected_missing: Iterable[str] = ()
) -> tuple[LoadReport, dict[str, torch.Tensor]]:
    """Compare ``state`` with the module's: the report, and the tensors whose name and shape match."""
    own = module.state_dict()
    report = LoadReport(source)
    expected_missing = set(expected_missing)
    usable = {}
    for key, tensor in state.items():
        if key not in own:
            if not is_optional_key(key):
                report.unexpected.append(key)
        elif tuple(tensor.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(tensor.shape), tuple(own[key].shape)))
        else:
            usable[key] = tensor
    for key in own:
        if key not in state and not is_optional_key(key):
            (report.initialised if key in expected_missing else report.missing).append(key)
    return report, usable


def load_matching(
    module: nn.Module, state: dict[str, torch.Tensor], source: str, expected_missing: Iterable[str] = ()
) -> LoadReport:
    """Copy every tensor whose name and shape match; report the rest (never silently)."""
    report, usable = match_state(module, state, source, expected_missing)
    module.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report


def load_clip_weights(model, path: str) -> LoadReport:
    """Initialise ``model.clipmodel`` from image CLIP (a HF folder, or a weights file).

    The proxies keep their standard-normal init and the temporal embedding its zeros; the
    logit scale is reset to ``logit_scale_init_value`` afterwards, as the original does.
    """
    folder_or_file = resolve_pretrained_path(path, kind="clip_weights")
    weights_file = hf_weights_file(folder_or_file) if os.path.isdir(folder_or_file) else folder_or_file
    state = read_state_dict(weights_file)
    # A whole-retrieval-model checkpoint passed as clip_weights: take its clipmodel part.
    if any(k.startswith("clipmodel.") for k in state):
        state = {k[len("clipmodel."):]: v for k, v in state.items() if k.startswith("clipmodel.")}
    clip = model.clipmodel
    new_tensors = [f"vision_model.embeddings.{name}" for name in ("added_cls", "temporal_embedding")]
    report = load_matching(clip, state, weights_file, expected_missing=new_tensors)
    with torch.no_grad():
        clip.logit_scale.fill_(clip.video.logit_scale_init_value)
    LOGGER.info("CLIP initialisation: %s", report.summary())
    if report.loaded == 0:
        raise CheckpointError(f"{weights_file}: no tensor matches the model; is it a CLIP checkpoint?")
    return report


def load_checkpoint(model: nn.Module, path: str) -> LoadReport:
    """Load a released or fine-tuned CLIP-ViP ``.pt`` (``clipmodel.*`` keys) exactly.

    Anything missing, unexpected or of another shape, beyond the optional ``position_ids``
    buffers, is a :class:`CheckpointError` listing the keys: a checkpoint that does not match
    the config would otherwise evaluate a half-random model. A folder written by ``clipvip
    convert`` or a Hub id of one stands for its ``model.safetensors`` (:mod:`clipvip.weights_ref`).
    """
    path = checkpoint_file(path)
    state = read_state_dict(path)
    if state and not any(k.startswith("clipmodel.") for k in state):
        state = {f"clipmodel.{k}": v for k, v in state.items()}  # a bare CLIPViPTowers state dict
    report, usable = match_state(model, state, path)
    if not report.clean:  # refused before anything is copied: the model keeps its init
        raise CheckpointError("\n".join([
            f"checkpoint {path} does not match the model built from the config{report.patch_size_hint()} "
            f"(check clip_config and clip_vision_additional_config); nothing was loaded:",
            *report.detail_lines()]))
    model.load_state_dict(usable, strict=False)  # every key matched: usable is the whole state
    report.loaded = len(usable)
    LOGGER.info("%s", report.summary())
    return report


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / torch.compile / accelerate wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same folder, then rename: never a half-written file."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(model: nn.Module, path: str) -> None:
    """Write the model's weights in the released layout (``clipmodel.*``, plain tensors, CPU)."""
    state = {strip_wrapper_prefixes(k): v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    atomic_torch_save(state, path)
