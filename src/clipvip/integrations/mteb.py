"""CLIP-ViP as an MTEB model: videos and texts in, the unit vectors evaluation ranks with out.

    pip install "clipvip[mteb]"

    import mteb
    from clipvip.integrations.mteb import load_encoder

    encoder = load_encoder("owner/clipvip-b32")          # a converted folder or its Hub id
    results = mteb.evaluate(encoder, mteb.get_tasks(tasks=["MSRVTTT2V", "MSRVTTV2T"]))

:func:`model_meta` describes a converted model (``clipvip convert``, docs/hf.md) as mteb's
``ModelMeta`` (name, revision, modalities, cosine similarity, embedding width, parameter count,
training data, licence, open weights), with :class:`CLIPViPEncoder` as its loader; the encoder
loads the folder or Hub id through transformers' ``AutoModel`` / ``AutoProcessor`` (which
``import clipvip`` teaches ``model_type: "clipvip"``).

What ``encode`` does with mteb's data loader (the contract of mteb's video models, e.g. its
X-CLIP and ViCLIP wrappers): the loader's dataset has a ``"text"`` and/or a ``"video"`` column;
a text is tokenised as evaluation tokenises captions, a video is read as evaluation reads a test
clip: the same frame indices (the converted folder's ``n_clips * num_frms`` frames, 12 for the
released models), decoder and resize kernel. mteb's own frame collator is not used: it would hand
over frames that torchcodec decoded at indices rounded differently. A ``datasets.Video`` column
is read undecoded (its ``{"path", "bytes"}``) and the encoded file goes through clipvip's reader,
so a clip scores here exactly as ``clipvip retrieval`` scores it, and torchcodec is not needed to
encode. A row with both a text and a video (mteb's video-centric QA) gets the sum of the two unit
vectors, as mteb's other CLIP-style video wrappers do; CLIP-ViP was not trained for such inputs.
"""
from __future__ import annotations

import os
import re
from math import prod
from typing import Any

import numpy as np
import torch
from datasets import Video
from mteb.models.abs_encoder import AbsEncoder
from mteb.models.model_meta import ModelMeta, ScoringFunction
from safetensors import safe_open
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModel, AutoProcessor

from clipvip.data.video import VideoBytes
from clipvip.errors import CheckpointError, DataError
from clipvip.hf.configuration import CLIPViPConfig
from clipvip.weights_ref import WEIGHTS_FILE, is_converted_folder, is_hub_id, resolve_folder
from clipvip.hf.processing import CLIPViPProcessor
from clipvip.precision import PRECISIONS, autocast, resolve_precision

CITATION = r"""@inproceedings{xue2023clipvip,
  title = {{CLIP-ViP}: Adapting Pre-trained Image-Text Model to Video-Language Representation Alignment},
  author = {Xue, Hongwei and Sun, Yuchong and Liu, Bei and Fu, Jianlong and Song, Ruihua and Li, Houqiang and Luo, Jiebo},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year = {2023},
}"""
TRAINING_CODE = "https://github.com/microsoft/XPretrain/tree/main/CLIP-ViP"
# The MTEB tasks built on each fine-tuning set of the paper: a checkpoint fine-tuned on one of
# them is not zero-shot there (``model_meta(training_datasets=...)``; LSMDC has no MTEB task).
FINE_TUNING_TASKS = {
    "msrvtt": frozenset({"MSRVTTT2V", "MSRVTTV2T"}),
    "didemo": frozenset({"DiDeMoT2VRetrieval", "DiDeMoV2TRetrieval"}),
    "actnet": frozenset({"ActivityNetCaptionsT2VRetrieval", "ActivityNetCaptionsV2TRetrieval"}),
    "lsmdc": frozenset(),
}
TOKEN_EMBEDDING = "clipmodel.text_model.embeddings.token_embedding.weight"
SNAPSHOT = re.compile(r"^[0-9a-f]{40}$")  # a Hub snapshot folder is named by its commit


class CLIPViPEncoder(AbsEncoder):
    """mteb's encoder protocol over a converted CLIP-ViP model (a folder or a Hub id).

    ``model_name``: what mteb files the results under (``owner/name``); ``path``: a local folder
    to load instead of the Hub id ``model_name``. ``precision``: fp32 | fp16 | bf16 autocast, as
    ``clipvip retrieval`` evaluates (fp16 only on CUDA; the official configs evaluate in fp16 on GPUs).
    """

    def __init__(self, model_name: str, revision: str | None = None, *, path: str | None = None,
                 device: str | None = None, precision: str = "fp32"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        folder = converted_folder(path or model_name, revision)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # As evaluation: fp16 is for CUDA (fp32 elsewhere), bf16 anywhere.
        self.precision = resolve_precision(precision == "fp16", precision == "bf16", self.device.type)
        self.model = AutoModel.from_pretrained(folder).eval().to(self.device)
        self.processor = AutoProcessor.from_pretrained(folder)

    def encode(self, inputs: DataLoader, *, task_metadata, hf_split: str, hf_subset: str, prompt_type=None,
               **kwargs: Any) -> np.ndarray:
        """``[N, P]`` float32 unit vectors (text + video for a row holding both), in dataset order."""
        columns = inputs.dataset.features
        text, video = "text" in columns, "video" in columns
        if not (text or video):
            raise ValueError(f"CLIP-ViP embeds texts and videos; this input has the columns {list(columns)}")
        dataset = inputs.dataset
        if video and isinstance(columns["video"], Video) and columns["video"].decode:
            dataset = dataset.cast_column("video", Video(decode=False))  # the encoded file, for clipvip's reader
        loader = DataLoader(dataset, batch_size=inputs.batch_size or 1, shuffle=False, num_workers=inputs.num_workers,
                            collate_fn=Collator(self.processor, text, video))
        features = []
        with torch.no_grad():
            for batch in tqdm(loader, desc=f"CLIP-ViP {task_metadata.name}", leave=False,
                              disable=not kwargs.get("show_progress_bar", True)):
                with autocast(self.precision, self.device.type):
                    parts = []
                    if text:
                        parts.append(self.model.get_text_features(batch["input_ids"].to(self.device),
                                                                  batch["attention_mask"].to(self.device)))
                    if video:
                        parts.append(self.model.get_video_features(batch["pixel_values"].to(self.device)))
                features.append(sum(parts).float().cpu())  # [b, P]
        if not features:
            return np.zeros((0, self.model.config.projection_dim), dtype=np.float32)
        return torch.cat(features).numpy()


class Collator:
    """mteb rows -> ``input_ids``/``attention_mask`` and/or ``pixel_values [B, T, 3, H, W]``, as the processor makes them."""

    def __init__(self, processor: CLIPViPProcessor, text: bool, video: bool):
        self.processor, self.text, self.video = processor, text, video

    def __call__(self, rows: list[dict]) -> dict:
        batch = {}
        if self.text:
            batch.update(self.processor(text=[row["text"] for row in rows]))
        if self.video:
            batch["pixel_values"] = torch.stack([self.processor.video_input(video_source(row["video"]))
                                                 for row in rows])
        return batch


def video_source(value) -> str | VideoBytes:
    """The encoded file behind an mteb video: a path, ``datasets.Video``'s undecoded ``{"path", "bytes"}``,
    or a decoder that ``datasets`` made (it keeps that dict as ``_hf_encoded``)."""
    encoded = getattr(value, "_hf_encoded", value)
    if isinstance(encoded, (str, os.PathLike)):
        return os.fspath(encoded)
    if isinstance(encoded, dict):
        if encoded.get("bytes"):
            return VideoBytes(encoded["bytes"], encoded.get("path") or "video bytes")
        if encoded.get("path"):
            return encoded["path"]
    raise DataError(f"a video given as {type(value).__name__} cannot be read here: pass a path or a "
                    "datasets.Video column ({'path', 'bytes'})")


def converted_folder(model: str, revision: str | None = None) -> str:
    """The local folder of a converted model (itself, or the Hub snapshot in the HF cache)."""
    folder = resolve_folder(model, revision=revision)
    if not is_converted_folder(folder):
        raise CheckpointError(f"{model} is not a converted CLIP-ViP model (config.json of model_type clipvip and "
                              f"{WEIGHTS_FILE}; clipvip convert writes one)")
    return folder


def model_meta(model: str, *, name: str | None = None, revision: str | None = None,
               training_datasets: set[str] | None = None, license: str | None = None,
               release_date: str | None = None, reference: str | None = None,
               public_training_data: str | None = None, precision: str = "fp32") -> ModelMeta:
    """mteb's ``ModelMeta`` of the converted model ``model`` (a folder or a Hub id), loader included.

    Read from the folder: the embedding width, the parameter count (the safetensors header), the
    caption length (``max_tokens``), the revision of a Hub snapshot. Given by the caller, since a
    folder cannot know them: ``name`` (``owner/name``; default the Hub id, or ``local/<folder>``),
    ``training_datasets`` (MTEB task names of the data it was trained on, e.g.
    ``FINE_TUNING_TASKS["msrvtt"]`` for an MSR-VTT fine-tuned model; None: not stated),
    ``license``, ``release_date`` (YYYY-MM-DD), ``reference`` (a URL), ``public_training_data``.
    """
    folder = converted_folder(model, revision)
    hub = is_hub_id(model)
    if name is None:
        name = model if hub else f"local/{os.path.basename(os.path.normpath(folder))}"
    if revision is None and hub and SNAPSHOT.match(os.path.basename(os.path.normpath(folder))):
        revision = os.path.basename(os.path.normpath(folder))
    config = CLIPViPConfig.from_pretrained(folder)
    processor = CLIPViPProcessor.from_pretrained(folder)
    with safe_open(os.path.join(folder, WEIGHTS_FILE), framework="pt") as weights:
        shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
    n_parameters = sum(prod(shape) for shape in shapes.values())
    return ModelMeta(
        loader=CLIPViPEncoder,
        loader_kwargs={"path": None if hub else os.path.abspath(folder), "precision": precision},
        name=name, revision=revision, release_date=release_date, languages=["eng-Latn"],
        n_parameters=n_parameters,
        n_embedding_parameters=prod(shapes[TOKEN_EMBEDDING]) if TOKEN_EMBEDDING in shapes else None,
        memory_usage_mb=round(n_parameters * 4 / 2**20),  # float32 weights
        max_tokens=processor.settings.max_txt_len, embed_dim=config.projection_dim,
        license=license, open_weights=True, public_training_code=TRAINING_CODE,
        public_training_data=public_training_data, framework=["PyTorch", "Transformers"], reference=reference,
        similarity_fn_name=ScoringFunction.COSINE, use_instructions=False,
        training_datasets=None if training_datasets is None else set(training_datasets),
        modalities=["video", "text"], model_type=["dense"], citation=CITATION,
    )


def load_encoder(model: str, *, device: str | None = None, **meta_options: Any) -> CLIPViPEncoder:
    """The encoder of ``model`` (a folder or a Hub id) with its :func:`model_meta` attached.

    ``mteb.evaluate(load_encoder(...), tasks)`` runs it. ``meta.load_model()`` does the same, but
    mteb first checks its ``video`` extra (torchcodec) for every video model, which this encoder
    does not use; torchcodec's PyPI wheels load only beside a CUDA build of torch.
    """
    meta = model_meta(model, **meta_options)
    encoder = CLIPViPEncoder(meta.name, meta.revision, device=device, **meta.loader_kwargs)
    encoder.mteb_model_meta = meta
    return encoder
