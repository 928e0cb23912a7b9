"""HD-VILA-style pretraining data: video clips, subtitles and auxiliary captions (DESIGN §2).

A pretraining set (one entry of ``train_datasets``):

* ``txt``: the subtitles. Either an LMDB folder (no suffix; key ``clip_id`` utf-8 -> subtitle
  utf-8) whose clips are listed in the sibling file ``<txt>.jsonl`` (``{"clip_id": ...}`` per
  line; the original appends ".jsonl" to the LMDB path), or a ``.jsonl``/``.json`` file whose
  records carry the text themselves (``{"clip_id", "text"}``).
* ``vid_cap_path``: auxiliary captions (OFA captions of the middle frame): an LMDB folder (key
  ``clip_id``) or a ``.json``/``.jsonl`` list of ``{"image_id", "caption"}``. Read only when
  ``vid_txt`` uses captions or ``vis_format`` is "videoframe".
* ``vis``: clips live at ``{vis}/{clip_id.split('.')[0]}/{clip_id}``; ids carry their extension.
* ``vid_txt``: which text pairs with the video; see :data:`VID_TXT_MODES`.
* ``vis_format``: "video", or "videoframe" to also return the middle frame (``image``) and its
  caption (``caption``) for the frame-caption loss terms.

LMDB environments are opened read-only, lazily, by the process that reads them (a DataLoader
worker opens its own on first access) and are never pickled: an LMDB handle shared across
``fork`` is undefined behaviour.

Differences from the original, where it silently used a wrong text: a clip whose subtitle key is
missing, or whose caption is missing or empty when the mode needs one, is a bad sample (warned
about and replaced at training time, like an unreadable video). The original fell back to the
subtitle in the caption modes and paired the middle frame with the string "None".
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

import torch

from clipvip.errors import ConfigError, DataError
from clipvip.logging_utils import get_logger
from clipvip.data.annotations import DatasetEntry, hdvila_video_path, iter_annotation_file
from clipvip.data.bad_samples import carry_from_items
from clipvip.data.retrieval_dataset import (ClipReader, DatasetSettings, SubstitutingDataset, collate_frames,
                                            loading_seconds, tokenize)

LOGGER = get_logger(__name__)

CONCAT_SEPARATOR = ". with subtitle: "


def _subtitle(caption: str, subtitle: str, rng) -> str:
    return subtitle


def _caption(caption: str, subtitle: str, rng) -> str:
    return caption


def _caption_subtitle_concat(caption: str, subtitle: str, rng) -> str:
    return caption + CONCAT_SEPARATOR + subtitle


def _caption_subtitle_random(caption: str, subtitle: str, rng) -> str:
    # A fair coin per example, as the original's random.randint(0, 1).
    return caption if rng.randint(0, 1) else subtitle


# vid_txt -> (needs the auxiliary caption, how the video's text is made from caption and subtitle)
VID_TXT_MODES: dict[str, tuple[bool, Callable[[str, str, Any], str]]] = {
    "subtitle": (False, _subtitle),
    "caption": (True, _caption),
    "caption_subtitle_concat": (True, _caption_subtitle_concat),
    "caption_subtitle_random": (True, _caption_subtitle_random),
}
VIS_FORMATS = ("video", "videoframe")


def _is_lmdb(path: str) -> bool:
    # The original's test: no file suffix means LMDB.
    return os.path.splitext(path)[1] == ""


# One environment per LMDB and process: LMDB forbids opening the same files twice in one process
# (py-lmdb refuses), so datasets sharing an LMDB (train and val, copies of a dataset) share it.
# realpath -> (pid that opened it, environment)
_OPEN_ENVS: dict[str, tuple[int, Any]] = {}


def _shared_env(path: str):
    import lmdb

    key = os.path.realpath(path)
    pid = os.getpid()
    entry = _OPEN_ENVS.pop(key, None)
    if entry is not None:
        owner, env = entry
        if owner == pid:
            _OPEN_ENVS[key] = entry
            return env
        # Inherited through fork from a parent that had it open. py-lmdb would refuse to open
        # the files again here, and LMDB handles must not be used across fork; closing this copy
        # in the child is harmless to the parent (opened with lock=False: no lock file, no
        # reader table to disturb) and frees the way for the child's own handle.
        env.close()
    try:
        env = lmdb.open(path, subdir=os.path.isdir(path), readonly=True, lock=False,
                        readahead=False, meminit=False, create=False)
    except lmdb.Error as e:
        raise DataError(f"cannot open LMDB {path}: {e}") from e
    _OPEN_ENVS[key] = (pid, env)
    return env


def _close_env(path: str) -> None:
    entry = _OPEN_ENVS.pop(os.path.realpath(path), None)
    if entry is not None:
        entry[1].close()


class LazyLmdb:
    """A read-only LMDB opened on first use by the process that reads it; pickled as its path."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise DataError(f"LMDB not found: {path}")
        self.path = path

    @property
    def is_open(self) -> bool:
        """Whether THIS process holds an open handle (a parent's handle does not count)."""
        entry = _OPEN_ENVS.get(os.path.realpath(self.path))
        return entry is not None and entry[0] == os.getpid()

    def get(self, key: str) -> str | None:
        with _shared_env(self.path).begin(buffers=False) as txn:
            value = txn.get(key.encode("utf-8"))
        return None if value is None else value.decode("utf-8")

    def close(self) -> None:
        """Close this process's handle (shared by every dataset reading this LMDB: they reopen lazily)."""
        _close_env(self.path)


class _DictTexts:
    """In-memory ``{key: text}``, with the same ``get`` as :class:`LazyLmdb`."""

    def __init__(self, texts: dict[str, str], path: str):
        self.texts = texts
        self.path = path

    def get(self, key: str) -> str | None:
        return self.texts.get(key)

    def close(self) -> None:
        pass


def _load_caption_file(path: str) -> _DictTexts:
    texts: dict[str, str] = {}
    for where, record in iter_annotation_file(path):
        key, caption = record.get("image_id"), record.get("caption")
        if not isinstance(key, str) or not isinstance(caption, str):
            raise DataError(f"{where}: caption records need 'image_id' and 'caption' strings")
        texts[key] = caption
    return _DictTexts(texts, path)


class PretrainDataset(SubstitutingDataset):
    """One HD-VILA-style pretraining set: its ``entry`` (of ``train_datasets``) read by ``reader``.

    Item: ``{"video": uint8 [T, H, W, 3], "text": str, "clip_id", "index", "num_skipped"}`` plus, for
    ``vis_format == "videoframe"``, ``"image": uint8 [H, W, 3]`` (the middle frame) and ``"caption"``:
    frames at the decoded size, made model input where the model is (``reader.transform``).
    :meth:`from_config` builds one from a run config.
    """

    def __init__(self, entry: DatasetEntry, reader: ClipReader, settings: DatasetSettings, tokenizer=None):
        self.training = reader.training
        self.name = entry.name
        self.vis = entry.vis
        self.vis_format = entry.vis_format
        self.vid_txt = entry.vid_txt
        if self.vis_format not in VIS_FORMATS:
            raise ConfigError(f"{self.name}: vis_format '{self.vis_format}' is not one of {', '.join(VIS_FORMATS)} "
                              "for pretraining sets")
        if self.vid_txt not in VID_TXT_MODES:
            raise ConfigError(f"{self.name}: unknown vid_txt '{self.vid_txt}' (valid: {', '.join(VID_TXT_MODES)})")
        self.needs_caption, self._make_text = VID_TXT_MODES[self.vid_txt]
        self.with_frame = self.vis_format == "videoframe"
        self.reader = reader
        self.collator = PretrainCollator(tokenizer, settings.max_txt_len) if tokenizer is not None else None
        self._init_state(settings.seed)

        txt = entry.txt
        self.subtitles: LazyLmdb | None = None
        if _is_lmdb(txt):
            self.subtitles = LazyLmdb(txt)
            self.clip_ids, self.inline_texts = self._read_clip_list(txt + ".jsonl", with_text=False)
        else:
            self.clip_ids, self.inline_texts = self._read_clip_list(txt, with_text=True)

        if not self.clip_ids:
            raise DataError(f"{self.name}: no clips listed in {txt if not _is_lmdb(txt) else txt + '.jsonl'}")

        self.captions: LazyLmdb | _DictTexts | None = None
        if self.needs_caption or self.with_frame:
            cap_path = entry.vid_cap_path
            if not cap_path:
                raise ConfigError(f"{self.name}: vid_txt '{self.vid_txt}' / vis_format '{self.vis_format}' "
                                  "needs 'vid_cap_path'")
            self.captions = LazyLmdb(cap_path) if _is_lmdb(cap_path) else _load_caption_file(cap_path)
        LOGGER.info("[%s] pretraining clips: %d (vid_txt %s, vis_format %s)",
                    self.name, len(self.clip_ids), self.vid_txt, self.vis_format)

    @classmethod
    def from_config(cls, cfg: Mapping, entry: Mapping, training: bool = True, tokenizer=None) -> "PretrainDataset":
        """The set of config ``entry`` (a dict of ``cfg.train_datasets``), read as ``cfg`` says."""
        return cls(DatasetEntry.from_config(entry), ClipReader.from_config(cfg, bool(training)),
                   DatasetSettings.from_config(cfg), tokenizer)

    @staticmethod
    def _read_clip_list(path: str, with_text: bool) -> tuple[list[str], list[str] | None]:
        clip_ids, texts = [], []
        for where, record in iter_annotation_file(path):
            clip_id = record.get("clip_id", record.get("video_id"))
            if not isinstance(clip_id, str) or not clip_id:
                raise DataError(f"{where}: record has no 'clip_id' string")
            clip_ids.append(clip_id)
            if with_text:
                text = record.get("text")
                if isinstance(text, list):  # a list of sentences is one subtitle text
                    text = " ".join(t for t in text if isinstance(t, str))
                if not isinstance(text, str):
                    raise DataError(f"{where}: record has no 'text'")
                texts.append(text)
        return clip_ids, (texts if with_text else None)

    def __len__(self) -> int:
        return len(self.clip_ids)

    def video_path(self, index: int) -> str:
        return hdvila_video_path(self.vis, self.clip_ids[index])

    def clip_path(self, index: int) -> str:
        return self.video_path(index)

    def init_worker(self, worker_id: int, seed: int) -> None:
        super().init_worker(worker_id, seed)
        self.close()  # whatever was inherited is the parent's; open afresh on first access

    def close(self) -> None:
        for store in (self.subtitles, self.captions):
            if store is not None:
                store.close()

    def _texts(self, index: int) -> tuple[str, str | None]:
        clip_id = self.clip_ids[index]
        if self.subtitles is not None:
            subtitle = self.subtitles.get(clip_id)
            if subtitle is None:
                raise DataError(f"subtitle of {clip_id} not in {self.subtitles.path}")
        else:
            subtitle = self.inline_texts[index]
        caption = None
        if self.captions is not None:
            caption = self.captions.get(clip_id)
            if caption is None or not caption.strip():
                raise DataError(f"no caption for {clip_id} in {self.captions.path}")
        text = self._make_text(caption, subtitle, self.rng)
        if not text.strip():
            raise DataError(f"empty text for {clip_id}")
        return text, caption

    def _load(self, index: int) -> dict:
        # Texts first: a missing key costs no decoding.
        text, caption = self._texts(index)
        video, image = self.reader.read_frames(self.video_path(index), self.rng, with_middle=self.with_frame)
        item = {"video": video, "text": text, "clip_id": self.clip_ids[index], "index": index}
        if self.with_frame:
            item["image"] = image  # (H, W, 3) uint8
            item["caption"] = caption
        return item


class PretrainCollator:
    """Pretraining items -> one batch dict.

    ``video`` uint8 [B, T, H, W, 3] (a list where clips differ in size); ``text_input_ids``,
    ``text_input_mask`` [B, L] (the video's text); ``image`` uint8 [B, H, W, 3] and ``caption_ids``,
    ``caption_masks`` [B, L] for "videoframe" sets, else None; ``clip_ids``; ``indices`` [B] long;
    ``num_skipped`` int; ``load_s`` float (as :class:`~clipvip.data.retrieval_dataset.RetrievalCollator`); ``bad_samples``
    when any (:mod:`clipvip.data.bad_samples`).
    """

    def __init__(self, tokenizer, max_txt_len: int = 50):
        self.tokenizer = tokenizer
        self.max_txt_len = int(max_txt_len)

    def __call__(self, items: list[dict]) -> dict:
        started = time.perf_counter()
        batch: dict[str, Any] = {"video": collate_frames([it["video"] for it in items])}  # (B, T, H, W, 3)
        batch["text_input_ids"], batch["text_input_mask"] = tokenize(
            self.tokenizer, [it["text"] for it in items], self.max_txt_len)  # (B, L) each
        if "image" in items[0]:
            batch["image"] = collate_frames([it["image"] for it in items])  # (B, H, W, 3)
            batch["caption_ids"], batch["caption_masks"] = tokenize(
                self.tokenizer, [it["caption"] for it in items], self.max_txt_len)  # (B, L) each
        else:
            batch["image"] = batch["caption_ids"] = batch["caption_masks"] = None
        batch["clip_ids"] = [it["clip_id"] for it in items]
        batch["indices"] = torch.tensor([it["index"] for it in items], dtype=torch.long)  # (B,)
        batch["num_skipped"] = int(sum(it.get("num_skipped", 0) for it in items))
        batch["load_s"] = loading_seconds(items, started)
        return carry_from_items(batch, items)
