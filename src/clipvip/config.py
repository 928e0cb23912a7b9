"""One config path: defaults <- JSON file <- command-line overrides, validated at load time.

The official configs (``configs/``) are JSON files with the keys of the original CLIP-ViP code.
``load_config(path, overrides)`` (or a dict of a file's keys instead of the path) returns a
:class:`Config` (a dict with attribute access, like the original's EasyDict) in which every known
key has a value: keys a file leaves out take the defaults in :data:`DEFAULTS`. Unknown keys are
errors that name the nearest known key.

Overrides are command-line words: ``["--learning_rate", "1e-5", "--is_train"]``. A value is typed
from the key's current value (bool, int, float, str, list, dict); a list takes several words or
one JSON list; a dict takes a JSON object; nested keys use dots
(``--clip_vision_additional_config.add_cls_num 0``). A bare flag (``--is_train``) means true.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
import re
from typing import Any, Iterable, Mapping, Sequence

from clipvip.errors import ConfigError
from clipvip.files import atomic_write_json


class Config(dict):
    """A dict whose keys are also attributes, recursively (``cfg.train_datasets[0].vis``)."""

    def __init__(self, *args, **kwargs):
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __setitem__(self, key, value):
        super().__setitem__(key, _wrap(value))

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setattr__(self, key, value):
        self[key] = value

    def __delattr__(self, key):
        del self[key]

    def __deepcopy__(self, memo):
        return Config(copy.deepcopy(dict(self), memo))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self))


def _wrap(value):
    if isinstance(value, Config):
        return value
    if isinstance(value, dict):
        return Config(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Known keys and their defaults. Every key a config file may hold is listed here; a value of
# None means "not set". The comment after each key is its documentation (docs/config.md).
# ----------------------------------------------------------------------------------------------
VISION_ADDITIONAL_DEFAULTS = {
    "type": "ViP",  # "ViP": video proxy tokens; anything else: frame-wise CLIP, mean-pooled
    "temporal_size": 12,  # length of the learned temporal embedding (interpolated to T frames)
    "if_use_temporal_embed": 1,  # add the temporal embedding to every patch of frame t
    "logit_scale_init_value": 4.60,  # log of the initial contrastive temperature scale
    "add_cls_num": 3,  # number of video proxy tokens besides CLS (M = 1 + add_cls_num)
    "temporal_init_std": 0.0,  # temporal embedding init: 0 = zeros (the original), else normal(0, std)
}

LOSS_DEFAULTS = {
    "loss_name": "NCELearnableTempLoss",  # a name from clipvip.loss.LOSSES
    "if_gather": 1,  # all-gather features (with gradient) across processes before the loss
}

DATASET_DEFAULTS = {
    "name": "",  # shown in logs and used as the key of eval_results.json
    "vis_format": "video",  # video | frame | videoframe (video + middle frame, pretraining) | webdataset (tar shards)
    "txt": "",  # annotation file (.jsonl/.json) or, for pretraining, the subtitles LMDB
    "vis": "",  # video folder (or frame-folder root)
    "vid_cap_path": "",  # auxiliary captions: LMDB or json list (pretraining)
    "vid_txt": "subtitle",  # subtitle | caption | caption_subtitle_concat | caption_subtitle_random
    "img_dir": "",  # kept from the original configs; image sources are not used
    "cap_path": "",
    "img_source": "",
    "img_ratio": 0,
    "ratio": 1,  # sampling weight of this training set when several are mixed
    # vis_format "webdataset" (training sets; docs/scaling.md): video2dataset's KEY.mp4/KEY.txt/KEY.json
    "shards": "",  # "DIR/{00000..00099}.tar", a glob, a .txt file of URLs, or a list; http(s)/s3/gs/pipe: URLs
    "shard_index": "",  # samples per shard (shards.json); default: shards.json beside them, else counted once
    "text_field": "txt",  # the text: member KEY.<text_field>, else that field of KEY.json (a list: one per example)
    "caption_field": "",  # pretraining: the auxiliary caption (member or KEY.json field); also turns on the middle frame
    "video_field": "",  # the video member's extension; "" = the first of mp4, avi, mkv, webm, mov, m4v
    "shuffle_buffer": 256,  # samples each reader shuffles among (their bytes are held in memory)
}

DEFAULTS: dict[str, Any] = {
    # --- run ---
    "config": None,  # path of the JSON file this config was read from
    "comment": "",  # free text for the reader of a config file (JSON has no comments); never read
    "blob_mount_dir": "",  # joined in front of data, weight and output paths (as the original)
    "output_dir": "output",  # run folder: ckpt/, log/, config.json, eval_results.json
    "is_train": False,  # train (fine-tune / pretrain) rather than only evaluate
    "seed": 42,  # model init, data order, caption choice and frame jitter all follow from it
    # --- data ---
    "train_datasets": [],  # a dataset dict, or a list of them
    "val_datasets": [],
    "inference_datasets": [],
    "train_n_clips": 1,
    "train_num_frms": 12,
    "test_n_clips": 1,
    "test_num_frms": 12,
    "sample_rate": 0,  # 0: uniform sampling; >0: frame interval of MMAction-style SampleFrames
    "sample_jitter": 1,  # random start/end jitter of uniform sampling at train time
    "video_res": [240, 320],  # (H, W) the videos were preprocessed to; one number means square
    "input_res": [224, 224],  # (H, W) fed to the model (bicubic resize, aspect not kept); one number means square
    "resize_antialias": 0,  # 0: bicubic without antialiasing, the kernel the released checkpoints saw (torchvision 0.9); 1: antialiased (PIL-like)
    "max_txt_len": 50,  # text tokens per caption (padded/truncated); at most clip_config's text positions (77 for OpenAI CLIP)
    "video_backend": "decord",  # decord | pyav (used where decord is not installed) | torchcodec (only if named; CUDA torch)
    "max_n_example_per_group": 1,
    "n_workers": -1,  # DataLoader workers per process; -1: the CPUs this process may use / processes on the machine - 1 (at least 1)
    "pin_mem": 1,  # pinned host memory for the batches (uint8 frames) on CUDA: the copy to the GPU does not block
    "persistent_workers": 1,  # training loaders keep their workers (and what they cache) from epoch to epoch
    "prefetch_factor": 2,  # batches each worker prepares ahead of the step
    "prefetch_to_device": 1,  # CUDA: copy the next batch to the GPU on a side stream during the step
    "dummy_data": 0,
    "cache_clips": 0,  # keep every decoded clip in memory (per process/worker): small sets decode once
    # --- model ---
    "e2e_weights_path": None,  # a released / fine-tuned .pt in the clipmodel.* layout; none: start from clip_weights
    "clip_weights": None,  # a HF CLIP folder (config.json + weights) used as initialisation; none (with e2e_weights_path none): random weights
    "clip_config": "openai/clip-vit-base-patch32",  # HF CLIP folder or known name (architecture); a folder with only config.json will do (docs/first-run.md)
    "clip_vision_additional_config": VISION_ADDITIONAL_DEFAULTS,
    "gradient_checkpointing": 0,  # recompute activations in backward to save memory
    "attn_implementation": "sdpa",  # sdpa (fast) or eager (the original formulation, the benchmark baseline; same results)
    "compile": 0,  # torch.compile: a training step's forward + loss as one graph (fullgraph), each encoder layer in evaluation; first steps slower while compiling; for GPUs (a C++ compiler on CPU)
    "compile_mode": "default",  # with compile: torch.compile mode: default | reduce-overhead (CUDA graphs: static shapes) | max-autotune | max-autotune-no-cudagraphs
    "compile_backend": "inductor",  # with compile: inductor (code generation) | aot_eager | eager (capture only: checks that the step traces)
    "fast_paths": "",  # "" = as CLIPVIP_FAST_PATHS says (default: all on); "0" = off (the plain layers); or e.g. "weight_copies=0,patch_matmul=0,proxy_attention=cat" (auto|cat|views|buffer|mask|flex); docs/performance.md
    "freeze_text_encoder": 0,  # keep the text tower fixed during training
    "freeze_text_proj": 0,  # with freeze_text_encoder: also keep text_projection fixed
    "frozen_text_cache": 0,  # with freeze_text_encoder: run the frozen tower once per caption, remember up to this many (0: off; entries x text width x 4 bytes)
    # --- optimisation ---
    "train_batch_size": 16,  # per process
    "train_pair_field": "",  # record field naming a partner clip (synthetic: "twin"): partners share a batch
    "test_batch_size": 16,  # per process
    "gradient_accumulation_steps": 1,
    "accum_feature_cache": 0,  # accumulate with cached features: every loss sees the whole global batch
    "fp16": 0,  # fp16 autocast + GradScaler (replaces apex O2)
    "bf16": 0,  # bf16 autocast
    "amp_level": "O2",  # kept for compatibility with the official configs; unused
    "optim": "adamw",
    "betas": [0.9, 0.98],
    "learning_rate": 1e-6,
    "weight_decay": 0.2,
    "lr_mul": 1.0,  # parameters whose name contains lr_mul_prefix get lr_mul x learning_rate
    "lr_mul_prefix": "",
    "loss_config": LOSS_DEFAULTS,
    "warmup_ratio": 0.01,
    "decay": "cosine",  # cosine | linear
    "grad_norm": 1.0,  # gradient clipping norm (<= 0: off)
    "num_train_epochs": 10,
    "min_valid_steps": 1,
    "num_valid": 1,
    "only_valid_steps": 100,
    "save_steps_ratio": 0.9,  # write the training state (for resuming) every this fraction of the run
    "max_nonfinite_steps": 5,  # stop (with a saved state) after this many non-finite steps in a row
    "nonfinite_check": "auto",  # step: host, every step; deferred: device, read when logging; auto: deferred on CUDA
    # --- logging ---
    "log_interval": 10,  # steps between lines of log/metrics.jsonl
    "if_tb_log": 0,
    "if_model_saver": 1,
    "save_hf": 0,  # 1: fine-tuning also writes ckpt/model_best_hf, the best model as a Hugging Face folder (docs/hf.md)
    "if_log2file": 1,
    "wandb_project": "",  # log to Weights & Biases when set (works offline)
}

# Keys that are None by default but have a definite type when overridden from the command line.
NONE_DEFAULT_TYPES = {"config": str, "e2e_weights_path": str, "clip_weights": str}

NESTED_DEFAULTS = {
    "clip_vision_additional_config": VISION_ADDITIONAL_DEFAULTS,
    "loss_config": LOSS_DEFAULTS,
}
DATASET_KEYS = ("train_datasets", "val_datasets", "inference_datasets")
# Keys whose values are paths under blob_mount_dir (the original's blob_mount()).
BLOB_PATH_KEYS = ("e2e_weights_path", "output_dir")
# The model's architecture and weights: a folder or file, or a name that is no path at all (a known
# architecture, a Hugging Face Hub id); where a config file's relative one is looked for: _find_model_paths.
MODEL_PATH_KEYS = ("clip_config", "clip_weights", "e2e_weights_path")
BLOB_DATASET_PATH_KEYS = ("txt", "vis", "vid_cap_path", "shard_index")
# (H, W) sizes: one number (from a file or ``--input_res 224``) means a square.
RESOLUTION_KEYS = ("video_res", "input_res")


# What other trainers (HF Trainer, open_clip, timm) call a key, where shortening the key cannot
# give the name (``--lr``, ``--wd`` and ``--out`` are found as abbreviations).
KEY_ALIASES = {
    "epochs": "num_train_epochs", "num_epochs": "num_train_epochs", "batch_size": "train_batch_size",
    "bs": "train_batch_size", "eval_batch_size": "test_batch_size", "workers": "n_workers",
    "num_workers": "n_workers", "max_grad_norm": "grad_norm", "clip_grad_norm": "grad_norm",
}


def _shortening(word: str, key: str) -> int | None:
    """How ``word`` shortens ``key``: 0, its initials (``lr``: learning_rate); 1, its first words
    each cut short (``learning_rat``, ``train_batch``: train_batch_size); None, neither."""
    parts, typed = key.split("_"), word.split("_")
    if len(typed) == 1 and len(word) == len(parts) > 1 and word == "".join(p[0] for p in parts):
        return 0
    if len(typed) <= len(parts) and all(t and p.startswith(t) for t, p in zip(typed, parts)):
        return 1
    return None


def nearest_key(word: str, known: Iterable[str]) -> str | None:
    """The known key a user most likely meant by ``word``: a common alias, else a key ``word``
    shortens (initials before cut words, then the shortest key), else the closest spelling.
    ``--lr`` is learning_rate, not the lr_mul that spelling alone ranks first."""
    known = list(known)
    lowered = word.lower().replace("-", "_")
    if KEY_ALIASES.get(lowered) in known:
        return KEY_ALIASES[lowered]
    ranked = sorted((rank, len(k), k) for k in known if (rank := _shortening(lowered, k)) is not None)
    if ranked:
        return ranked[0][2]
    matches = difflib.get_close_matches(lowered, known, n=1, cutoff=0.0)
    return matches[0] if matches else None


def _nearest(key: str, known: Iterable[str]) -> str:
    match = nearest_key(key, known)
    return f" (did you mean '{match}'?)" if match else ""


def _check_keys(values: dict, known: dict, where: str) -> None:
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}'{_nearest(key, known)}")


def _merge_nested(defaults: dict, values: Any, where: str) -> dict:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected an object, got {type(values).__name__}")
    _check_keys(values, defaults, where)
    merged = copy.deepcopy(defaults)
    merged.update(values)
    return merged


def _normalise_datasets(value: Any, where: str) -> list:
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a dataset object or a list of them")
    return [_merge_nested(DATASET_DEFAULTS, d, f"{where}[{i}]") for i, d in enumerate(value)]


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return values


def _parse_bool(text: str, key: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"--{key}: expected a boolean (1/0/true/false), got '{text}'")


def _parse_scalar(text: str, like: Any, key: str) -> Any:
    """Parse one command-line word into the type of ``like``."""
    kind = type(like) if like is not None else NONE_DEFAULT_TYPES.get(key.split(".")[0], str)
    try:
        if kind is bool:
            return _parse_bool(text, key)
        if kind is int:
            value = float(text)
            if not value.is_integer():
                raise ValueError
            return int(value)
        if kind is float:
            return float(text)
    except ValueError:
        raise ConfigError(f"--{key}: expected {kind.__name__}, got '{text}'") from None
    if kind in (list, dict):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise ConfigError(f"--{key}: expected a JSON {kind.__name__}, got '{text}'") from None
        if not isinstance(value, kind):
            raise ConfigError(f"--{key}: expected a JSON {kind.__name__}, got '{text}'")
        return value
    if text.lower() in ("none", "null") and key.split(".")[0] in NONE_DEFAULT_TYPES:
        return None
    return text


def _parse_list(words: Sequence[str], like: list, key: str) -> list:
    if len(words) == 1 and words[0].lstrip().startswith("["):
        return _parse_scalar(words[0], [], key)
    element = like[0] if like else None
    if element is None or isinstance(element, (dict, list)):
        element = ""
    return [_parse_scalar(w, element, key) for w in words]


def _split_overrides(overrides: Sequence[str]) -> list[tuple[str, list[str]]]:
    """["--a", "1", "--b=2", "--flag", "--l", "1", "2"] -> [(a,[1]), (b,[2]), (flag,[]), (l,[1,2])]."""
    pairs: list[tuple[str, list[str]]] = []
    for word in overrides:
        if word.startswith("--") and len(word) > 2 and not _is_number(word):
            name, eq, value = word[2:].partition("=")
            pairs.append((name.replace("-", "_") if name not in DEFAULTS else name, [value] if eq else []))
        elif pairs:
            pairs[-1][1].append(word)
        else:
            raise ConfigError(f"unexpected command-line word '{word}' (options look like --key value)")
    return pairs


def _is_number(word: str) -> bool:
    try:
        float(word)
        return True
    except ValueError:
        return False


def _apply_override(cfg: dict, key: str, words: list[str]) -> None:
    top, _, sub = key.partition(".")
    if top not in DEFAULTS:
        raise ConfigError(f"unknown option --{key}{_nearest(top, DEFAULTS)}")
    if sub:
        nested = NESTED_DEFAULTS.get(top)
        if nested is None:
            raise ConfigError(f"--{key}: '{top}' has no sub-keys that can be set from the command line")
        if sub not in nested:
            raise ConfigError(f"--{key}: unknown key '{sub}'{_nearest(sub, nested)}")
        target, name, like = cfg[top], sub, cfg[top].get(sub, nested[sub])
    else:
        target, name, like = cfg, top, cfg.get(top)
    if not words:
        if isinstance(like, bool) or (isinstance(like, int) and like in (0, 1)):
            target[name] = True if isinstance(like, bool) else 1
            return
        raise ConfigError(f"--{key} needs a value")
    if top in DATASET_KEYS and not sub and len(words) == 1 and words[0].lstrip().startswith(("{", "[")):
        try:  # --train_datasets '{"name": ..., "shards": ...}': a dataset object (or a list of them) as JSON
            value = json.loads(words[0])
        except json.JSONDecodeError as e:
            raise ConfigError(f"--{key}: invalid JSON at column {e.colno}: {e.msg}") from None
    elif isinstance(like, list):
        value = _parse_list(words, like, key)
    elif len(words) == 1:
        value = _parse_scalar(words[0], like, key)
    else:
        raise ConfigError(f"--{key} takes one value, got {len(words)}: {' '.join(words)}")
    if top in DATASET_KEYS and not sub:
        value = _normalise_datasets(value, f"--{key}")
    elif top in NESTED_DEFAULTS and not sub:
        value = _merge_nested(NESTED_DEFAULTS[top], value, f"--{key}")
    target[name] = value


def _find_model_paths(cfg: dict, config_file: str, typed: set[str]) -> set[str]:
    """Where the relative model paths a config file names are (docs/config.md, "Paths").

    Each of clip_config, clip_weights and e2e_weights_path that the file gives as a relative path
    (and the command line does not override: a typed path is relative to the current directory)
    is looked for under blob_mount_dir, when set, then in the config file's own folder; the first
    that exists replaces it. So a config beside its model folder works from any directory
    (``clipvip convert --config DIR/retrieval.json`` outside DIR). Where neither holds it the value
    is left to the usual rules: clip_config and clip_weights as written (the current directory, a
    known name, a Hub id such as openai/clip-vit-base-patch32), e2e_weights_path joined to
    blob_mount_dir. Returns the keys it replaced (absolute already, or joined: not joined again).
    """
    found = set()
    roots = [cfg.get("blob_mount_dir") or "", os.path.dirname(config_file)]
    for key in MODEL_PATH_KEYS:
        value = cfg.get(key)
        if key in typed or not isinstance(value, str) or not value or os.path.isabs(value):
            continue
        for root in filter(None, dict.fromkeys(roots)):
            candidate = os.path.join(root, value)
            if os.path.exists(candidate):
                cfg[key] = candidate
                found.add(key)
                break
    return found


def _join_blob(cfg: dict, skip: Iterable[str] = ()) -> None:
    """Join data, weight and output paths to blob_mount_dir as the original's blob_mount() does.

    os.path.join leaves absolute paths unchanged, so a config with absolute paths is unaffected.
    ``skip``: keys already resolved (:func:`_find_model_paths`).
    """
    root = cfg.get("blob_mount_dir") or ""
    if not root:
        return
    for key in BLOB_PATH_KEYS:
        if cfg.get(key) and key not in skip:
            cfg[key] = os.path.join(root, cfg[key])
    for key in DATASET_KEYS:
        for dataset in cfg.get(key) or []:
            for path_key in BLOB_DATASET_PATH_KEYS:
                if dataset.get(path_key):
                    dataset[path_key] = os.path.join(root, dataset[path_key])
            shards = dataset.get("shards")
            if shards:  # local shard paths only: a URL (scheme://, pipe:) is left as it is
                joined = [s if re.match(r"^[A-Za-z][A-Za-z0-9+.-]+:", s) else os.path.join(root, s)
                          for s in ([shards] if isinstance(shards, str) else shards)]
                dataset["shards"] = joined[0] if isinstance(shards, str) else joined


def _normalise_resolutions(cfg: dict, where: str) -> None:
    """``224``, ``[224]`` -> ``[224, 224]``; anything but one or two positive integers is an error.

    Every reader of these keys unpacks ``h, w``: checked here, a wrong value is one line naming
    the key instead of an unpacking error deep inside the data pipeline.
    """
    for key in RESOLUTION_KEYS:
        value = cfg[key]
        sizes = [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        ok = isinstance(sizes, list) and len(sizes) in (1, 2) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() and v > 0
            for v in sizes)
        if not ok:
            # Without a file the defaults are valid, so a bad value came from the command line.
            name = f"--{key}" if where == "defaults" else f"{where}: {key}"
            raise ConfigError(f"{name} should be one positive integer (a square) or two (H W), got {value!r}")
        cfg[key] = [int(v) for v in sizes] * (2 if len(sizes) == 1 else 1)


def _check_types(cfg: dict, where: str) -> None:
    for key, default in DEFAULTS.items():
        value = cfg[key]
        if default is None or value is None or key in DATASET_KEYS or key in NESTED_DEFAULTS:
            continue
        ok = isinstance(value, type(default))
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if isinstance(default, bool) and isinstance(value, int):
            ok = True
        if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, bool):
            ok = True
        if not ok:
            raise ConfigError(
                f"{where}: key '{key}' should be {type(default).__name__}, got {type(value).__name__} ({value!r})"
            )
    if cfg["loss_config"] and not isinstance(cfg["loss_config"].get("loss_name"), str):
        raise ConfigError(f"{where}: loss_config.loss_name should be a string")


def dataset_entry(values: Mapping, where: str = "dataset") -> Config:
    """One dataset entry (a dict of ``train_datasets`` etc.) with every key of :data:`DATASET_DEFAULTS`.

    Entries read by :func:`load_config` are complete already; a caller that builds a dataset from
    its own dict (a test, a script) goes through here, so the data code reads every key plainly.
    """
    return Config(_merge_nested(DATASET_DEFAULTS, dict(values), where))


def load_config(source: str | Mapping | None = None, overrides: Sequence[str] | None = None) -> Config:
    """Read a config file (or take a dict of its keys), apply command-line overrides, fill in defaults.

    ``source`` is a JSON file's path, or a dict holding what such a file would (a config stored
    with a search index); it may be None when ``overrides`` holds ``--config FILE`` (the seed's
    flag), or for a config made of defaults and overrides alone.
    """
    pairs = _split_overrides(list(overrides or []))
    for key, words in pairs:
        if key == "config":
            if len(words) != 1:
                raise ConfigError("--config takes one file path")
            source = words[0]

    cfg: dict[str, Any] = copy.deepcopy(DEFAULTS)
    where = "defaults"
    if source is not None:
        if isinstance(source, Mapping):
            where, values = "the given config", copy.deepcopy(dict(source))
        else:
            where = str(source)
            values = _read_json(where)
        _check_keys(values, DEFAULTS, where)
        for key, value in values.items():
            if key in DATASET_KEYS:
                value = _normalise_datasets(value, f"{where}: {key}")
            elif key in NESTED_DEFAULTS:
                value = _merge_nested(NESTED_DEFAULTS[key], value, f"{where}: {key}")
            cfg[key] = value
        if not isinstance(source, Mapping):
            cfg["config"] = str(source)

    for key, words in pairs:
        if key != "config":
            _apply_override(cfg, key, words)

    _normalise_resolutions(cfg, where)
    _check_types(cfg, where)
    cfg["is_train"] = bool(cfg["is_train"])
    found = set()
    if source is not None and not isinstance(source, Mapping):
        found = _find_model_paths(cfg, str(source), {key.partition(".")[0] for key, _ in pairs})
    _join_blob(cfg, skip=found)
    return Config(cfg)


def save_config(cfg: Config, output_dir: str | None = None, name: str = "config.json") -> str:
    """Write the resolved config into the run folder (atomically) and return its path.

    Paths in the file are already joined to blob_mount_dir, so blob_mount_dir is written empty:
    ``--config <output_dir>/config.json`` then reproduces the run.
    """
    output_dir = output_dir or cfg.output_dir
    os.makedirs(output_dir, exist_ok=True)
    resolved = cfg.to_dict()
    resolved["blob_mount_dir"] = ""
    target = os.path.join(output_dir, name)
    atomic_write_json(target, resolved, indent=2, sort_keys=True)
    return target

