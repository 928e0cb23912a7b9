"""The CLIP BPE tokenizer, offline.

If the ``clip_config`` folder holds tokenizer files, HF's ``CLIPTokenizerFast`` is loaded from
them (as the original code does). Otherwise the tokenizer is built from the CLIP BPE merges
shipped with this package (``assets/bpe_simple_vocab_16e6.txt.gz``, from the MIT-licensed
``open_clip_torch`` wheel; licence in ``assets/LICENSE-open_clip.txt``): ``vocab.json`` and
``merges.txt`` are derived once into a cache folder and ``CLIPTokenizerFast`` is built from them.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from functools import lru_cache
from importlib import resources

from transformers import CLIPTokenizerFast

from clipvip.config import Config
from clipvip.files import atomic_write_text

BPE_ASSET = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 48894 merges of the file (49152 - 256 - 2).
NUM_MERGES = 49152 - 256 - 2
SOT_TOKEN, EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 77
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    mapped = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            mapped.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in mapped)))


def read_bpe_merges(path: str | None = None) -> list[tuple[str, str]]:
    """The merge rules CLIP uses, in priority order."""
    if path is None:
        data = resources.files("clipvip").joinpath("assets", BPE_ASSET).read_bytes()
    else:
        with open(path, "rb") as f:
            data = f.read()
    lines = gzip.decompress(data).decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]  # line 0 is a version header
    return [tuple(line.split()) for line in merges]


def clip_vocab(merges: list[tuple[str, str]]) -> list[str]:
    """Token strings in id order: bytes, bytes + '</w>', one token per merge, then SOT and EOT."""
    byte_tokens = list(bytes_to_unicode().values())
    return byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]


def write_vocab_files(folder: str, merges: list[tuple[str, str]] | None = None) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (HF's CLIP tokenizer files) into ``folder``."""
    merges = merges if merges is not None else read_bpe_merges()
    vocab = {token: i for i, token in enumerate(clip_vocab(merges))}
    os.makedirs(folder, exist_ok=True)
    for name, text in (
        ("vocab.json", json.dumps(vocab, ensure_ascii=False)),
        ("merges.txt", "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"),
    ):
        atomic_write_text(os.path.join(folder, name), text)


def _cache_folder() -> str:
    root = os.environ.get("CLIPVIP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "clipvip")
    digest = hashlib.sha1(resources.files("clipvip").joinpath("assets", BPE_ASSET).read_bytes()).hexdigest()[:12]
    return os.path.join(root, f"clip-bpe-{digest}")


@lru_cache(maxsize=None)
def packaged_tokenizer_folder() -> str:
    """A folder with vocab.json/merges.txt derived from the packaged BPE file (made once)."""
    folder = _cache_folder()
    if not all(os.path.isfile(os.path.join(folder, n)) for n in ("vocab.json", "merges.txt")):
        write_vocab_files(folder)
    return folder


def load_clip_tokenizer(folder: str) -> CLIPTokenizerFast:
    """CLIPTokenizerFast from a folder of CLIP tokenizer files, with CLIP's special tokens."""
    return CLIPTokenizerFast.from_pretrained(
        folder,
        bos_token=SOT_TOKEN, eos_token=EOT_TOKEN, unk_token=EOT_TOKEN, pad_token=EOT_TOKEN,
        model_max_length=MODEL_MAX_LENGTH, local_files_only=True,
    )


def tokenizer_for(clip_config: str | None) -> CLIPTokenizerFast:
    """The tokenizer of the ``clip_config`` folder if it holds tokenizer files, else the packaged
    BPE (a known model name, a folder with only config.json, or None)."""
    folder = clip_config
    if folder and os.path.isdir(folder) and any(os.path.isfile(os.path.join(folder, n)) for n in TOKENIZER_FILES):
        return load_clip_tokenizer(folder)
    return load_clip_tokenizer(packaged_tokenizer_folder())


def build_tokenizer(cfg: Config | None = None) -> CLIPTokenizerFast:
    """The tokenizer for ``cfg.clip_config`` (:func:`tokenizer_for`); without a config, the packaged BPE."""
    return tokenizer_for(cfg.clip_config if cfg is not None else None)
