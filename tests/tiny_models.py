"""Tiny CLIP / CLIP-ViP models for tests, written in the real on-disk formats (HF folders)."""
from __future__ import annotations

import contextlib
import os

import torch
from transformers import CLIPConfig, CLIPModel

import clipvip

VOCAB = 99  # tiny vocabulary; as in real CLIP the EOS id is the largest id
EOS = VOCAB - 1
BOS = VOCAB - 2


def tiny_clip_config(image_size: int = 32, patch_size: int = 8, max_positions: int = 16,
                     vocab_size: int = VOCAB) -> CLIPConfig:
    """A 2-layer CLIP (HF's CLIPVisionModelTester style) with CLIP's activation and layout.

    ``vocab_size=49408`` gives the real CLIP vocabulary, for use with the real tokenizer.
    """
    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=max_positions,
                         bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size),
        projection_dim=24,
    )


def write_hf_clip(folder: str, seed: int = 0, safe: bool = True, **config_kwargs) -> CLIPModel:
    """Save a randomly initialised HF CLIPModel (config.json + weights) and return it (eval mode)."""
    torch.manual_seed(seed)
    model = CLIPModel(tiny_clip_config(**config_kwargs)).eval()
    # HF inits some tensors to constants; perturb everything so a wrong mapping cannot pass.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)
    if not safe:  # the older HF layout; transformers 5 only writes safetensors itself
        from safetensors.torch import load_file

        weights = os.path.join(folder, "model.safetensors")
        torch.save(load_file(weights), os.path.join(folder, "pytorch_model.bin"))
        os.remove(weights)
    return model


def tiny_cfg(folder: str, *overrides: str, **vision_extra) -> clipvip.Config:
    """A clipvip config whose model is the tiny HF CLIP in ``folder``."""
    extra = {"type": "ViP", "temporal_size": 4, "if_use_temporal_embed": 1,
             "logit_scale_init_value": 4.6, "add_cls_num": 3}
    extra.update(vision_extra)
    # max_txt_len 16: the tiny CLIP's text positions (build_model refuses longer captions).
    cfg = clipvip.load_config(None, ["--clip_config", folder, "--clip_weights", folder,
                                     "--input_res", "32", "32", "--max_txt_len", "16", *overrides])
    cfg.clip_vision_additional_config.update(extra)
    return cfg


def released_tiny_model(folder: str, *overrides: str):
    """``(cfg, model, weights)``: a tiny CLIP-ViP on the real CLIP vocabulary (the real tokenizer's
    captions fit), every weight moved by noise, the proxies and temporal embedding too, so that
    clips differ clearly; saved in the released ``clipmodel.*`` layout as ``folder/model.pt``."""
    clip_folder = os.path.join(folder, "clip")
    write_hf_clip(clip_folder, vocab_size=49408)
    cfg = tiny_cfg(clip_folder, *overrides)
    model = clipvip.build_model(cfg).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    weights = os.path.join(folder, "model.pt")
    clipvip.model.save_checkpoint(model, weights)
    return cfg, model, weights


def random_text(batch: int, length: int, lengths=None, seed: int = 0):
    """Token ids shaped like the CLIP tokenizer's: BOS, words, EOS, then EOS padding; and the mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((batch, length), EOS, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    lengths = lengths or [int(torch.randint(2, length + 1, (1,), generator=g)) for _ in range(batch)]
    for i, n in enumerate(lengths):
        ids[i, 0] = BOS
        ids[i, 1:n - 1] = torch.randint(1, BOS, (n - 2,), generator=g)
        ids[i, n - 1] = EOS
        mask[i, :n] = 1
    return ids, mask


def hf_features(output):
    """transformers 4.x returns a tensor from get_*_features, 5.x a ModelOutput."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def tiny_model_folder(tmp_path, name: str = "clip", **kwargs) -> str:
    folder = os.path.join(str(tmp_path), name)
    write_hf_clip(folder, **kwargs)
    return folder


class ListStream:
    """A training stream over fixed batches, endlessly (its position: how many were taken)."""

    num_examples = 4

    def __init__(self, batches):
        self.batches, self.taken, self.epoch = batches, 0, 0

    def __next__(self):
        batch = self.batches[self.taken % len(self.batches)]
        self.taken += 1
        return batch

    def state_dict(self):
        return {"taken": self.taken}

    def load_state_dict(self, state):
        self.taken = state["taken"]


def fixed_batches(n_batches: int = 2, batch: int = 2, frames: int = 3, size: int = 32) -> list[dict]:
    """Training batches for a :class:`ListStream`: random clips ``[batch, frames, 3, size, size]``
    and captions of 10 tokens, batch ``k`` drawn with seed ``k``."""
    batches = []
    for seed in range(n_batches):
        ids, mask = random_text(batch, 10, seed=seed)
        video = torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))
        batches.append({"video": video, "text_input_ids": ids, "text_input_mask": mask})
    return batches


# What reads a tensor's value from Python: on a GPU each of these waits for the device.
TENSOR_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def tensor_reads(monkeypatch):
    """Inside, every read of a tensor's value from Python (:data:`TENSOR_READS`, what would be a
    host-device sync on a GPU) is recorded, by name, in the list yielded."""
    reads = []

    def recording(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            reads.append(name)
            return real(self, *args, **kwargs)
        return read

    with monkeypatch.context() as patch:
        for name in TENSOR_READS:
            patch.setattr(torch.Tensor, name, recording(name))
        yield reads
