"""A released or fine-tuned checkpoint -> a Hugging Face model folder (``clipvip convert``).

The folder holds ``config.json`` (:class:`CLIPViPConfig`), ``model.safetensors`` (the
``clipmodel.*`` tensors, no pickle), the tokenizer files, ``preprocessor_config.json``
(:class:`VideoInputSettings`) and a model card ``README.md``. It is written beside its final
name and renamed into place, so an interrupted conversion never leaves a half folder at ``out``.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from transformers import CLIPConfig

from clipvip.errors import ClipvipError
from clipvip.files import atomic_folder, atomic_write_text
from clipvip.hf.configuration import CLIPViPConfig
from clipvip.hf.modeling import CLIPViPModel
from clipvip.hf.processing import CLIPViPProcessor, VideoInputSettings
from clipvip.model.clip_vip import VideoSettings
from clipvip.model.weights import load_checkpoint
from clipvip.weights_ref import checkpoint_file, download_command, is_converted_folder

CARD_FILE = "README.md"
# The eval blocks' metric columns (clipvip.metrics / eval_results.json), in table order.
METRIC_COLUMNS = (("R1", "R@1"), ("R5", "R@5"), ("R10", "R@10"), ("MdR", "MdR"), ("MnR", "MnR"))
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Source:
    """Where the weights came from, for the model card: the file, its hash, its training step if known."""

    path: str
    sha256: str
    step: int | None = None

    @classmethod
    def of(cls, path: str, step: int | None = None) -> "Source":
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(HASH_CHUNK), b""):
                digest.update(block)
        return cls(path=path, sha256=digest.hexdigest(), step=step)


def convert_checkpoint(weights: str, clip_config: CLIPConfig, video: VideoSettings, video_input: VideoInputSettings,
                       tokenizer, out: str, results: dict | None = None, replace: bool = False,
                       step: int | None = None) -> CLIPViPModel:
    """Write the converted folder ``out`` (which must not exist, or be empty) and return the model.

    ``weights``: a checkpoint in the released ``clipmodel.*`` layout or any this project writes;
    it must match the architecture exactly (:func:`clipvip.model.weights.load_checkpoint`).
    ``results``: an ``eval_results.json`` (``{dataset: eval block}``) for the card's table.
    ``step``: the training step the weights are from, named by the card (None: not known).
    ``replace``: an earlier converted folder at ``out`` is replaced (a rerun of a training run),
    moved aside only once the new one is complete, and put back if the new one cannot take its place.
    """
    replacing = replace and is_converted_folder(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not replacing:
        raise ClipvipError(f"--out {out} already exists and is not an empty folder; choose a new one")
    weights = checkpoint_file(weights)
    model = CLIPViPModel(CLIPViPConfig.from_parts(clip_config, video)).eval()
    load_checkpoint(model.retrieval, weights)  # refuses a checkpoint of another architecture
    processor = CLIPViPProcessor(tokenizer, video_input)
    with atomic_folder(out, replace=replacing) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        processor.save_pretrained(staging)
        atomic_write_text(os.path.join(staging, CARD_FILE),
                          model_card(model.config, video_input, Source.of(weights, step), results))
    return model


def results_table(results: dict) -> str:
    """A markdown table of an ``eval_results.json``: one row per dataset and direction."""
    header = "| dataset | direction | " + " | ".join(title for _, title in METRIC_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (2 + len(METRIC_COLUMNS))]
    for dataset, block in results.items():
        for direction, metrics in block.items():
            if isinstance(metrics, dict) and all(key in metrics for key, _ in METRIC_COLUMNS):
                cells = " | ".join(f"{float(metrics[key]):.1f}" for key, _ in METRIC_COLUMNS)
                lines.append(f"| {dataset} | {direction} | {cells} |")
    if len(lines) == 2:
        raise ClipvipError("the results hold no eval block (a dataset -> {t2v: {R1, R5, R10, MdR, MnR}, ...}): "
                           "pass the eval_results.json that `clipvip retrieval` writes")
    return "\n".join(lines)


def model_card(config: CLIPViPConfig, video_input: VideoInputSettings, source: Source, results: dict | None) -> str:
    """The ``README.md`` of a converted folder: the model, its source file, results, how to load it."""
    vision, text = config.vision_config, config.text_config
    video = (f"video proxy tokens (ViP), {config.add_cls_num} beside the CLS token, and a temporal "
             f"embedding of {config.temporal_size} frames" if config.use_proxies
             else "image CLIP on every frame, the frame features mean-pooled (the CLIP-ViP paper's baseline)")
    sampling = ("spread uniformly over the clip" if video_input.sample_rate == 0
                else f"in {video_input.n_clips} segments, every {video_input.sample_rate}th frame")
    kernel = ("bicubic, antialiased" if video_input.resize_antialias
              else "bicubic without antialiasing as torchvision 0.9, the released checkpoints' input")
    evaluation = results_table(results) if results else "No evaluation results were given to the conversion."
    scored = next(iter(results.values()), {}) if results else {}  # eval blocks name what they scored
    if isinstance(scored, dict) and scored.get("checkpoint"):
        at = f" (step {scored['step']})" if scored.get("step") is not None else ""
        evaluation = f"Scores of `{os.path.basename(scored['checkpoint'])}`{at}:\n\n{evaluation}"
    step = f"; step {source.step} of its training run" if source.step is not None else ""
    frames = video_input.n_clips * video_input.num_frms
    name = os.path.splitext(os.path.basename(source.path))[0]
    return f"""---
# Fill in the licence of these weights before uploading (where did the checkpoint come from?).
license: ""
library_name: clipvip
tags:
- clip-vip
- video-text-retrieval
- video
---

# CLIP-ViP {name}: patch {vision.patch_size}, {frames} frames

CLIP-ViP (Xue et al., *CLIP-ViP: Adapting Pre-trained Image-Text Model to Video-Language
Representation Alignment*, ICLR 2023) turns image CLIP into a video encoder.
This model uses {video}. Videos and sentences are encoded into one space of
{config.projection_dim}-d unit vectors; text-to-video retrieval ranks videos by cosine similarity.

- Vision tower: {vision.num_hidden_layers} layers of width {vision.hidden_size}, patch {vision.patch_size}, \
{vision.image_size}x{vision.image_size} frames.
- Text tower: {text.num_hidden_layers} layers of width {text.hidden_size}, at most \
{video_input.max_txt_len} tokens per caption.
- Input: {frames} frames {sampling}, resized to {video_input.input_res[0]}x{video_input.input_res[1]} \
({kernel}), CLIP's mean and std.
- Converted from `{os.path.basename(source.path)}` (sha256 `{source.sha256}`{step}) with `clipvip convert`.

## Evaluation

{evaluation}

## How to load

```python
import clipvip  # registers CLIP-ViP with transformers' AutoConfig, AutoModel and AutoProcessor
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained("OWNER/NAME").eval()  # or the local folder
processor = AutoProcessor.from_pretrained("OWNER/NAME")
inputs = processor(text=["a dog catches a frisbee"], videos=["video.mp4"], return_tensors="pt")
out = model(**inputs)
similarity = out.logits_per_text  # [texts, videos]; out.text_embeds, out.video_embeds: unit vectors
```

Offline, a Hub copy loads from the Hugging Face cache once downloaded: {download_command("OWNER/NAME")}.
`model.safetensors` holds the released CLIP-ViP layout (`clipmodel.*`); the folder or its Hub id
is a checkpoint for clipvip itself too (`python -m clipvip retrieval --e2e_weights_path OWNER/NAME ...`,
`clipvip encode|index --weights OWNER/NAME`).
"""
