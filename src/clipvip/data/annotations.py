"""Retrieval annotation files and the per-dataset rules that turn their records into clips.

An annotation file is ``.jsonl`` (one JSON object a line) or ``.json`` (a list of objects), one
record per clip: ``{"clip_id": "video7010", "text": "a man is ..."}``. ``text`` is a caption or a
list of captions; frame-folder datasets also carry ``num_frame``; other fields are kept in
:attr:`ClipRecord.extra` (the synthetic test set marks time-reversed twins there).

What a record means depends on the dataset, as in the original code; each case is one entry of
:data:`ANNOTATION_RULES`, chosen by :func:`select_rule` from the dataset config:

=========  ==========================================  ==========================================
rule       recognised by                               effect
=========  ==========================================  ==========================================
frame      ``vis_format == "frame"`` (ActivityNet)     ``{vis}/{clip_id}/{clip_id}_{i:03d}.jpg``,
                                                       ``num_frame`` read from the record
didemo     "didemo" in the name or a path              a list of sentences is ONE paragraph,
                                                       joined with single spaces
lsmdc      "lsmdc" in the name or a path               ``{vis}/{clip_id}.avi``: the id is a
                                                       relative path and keeps its folders
hdvila     never guessed; ask for it by name           ``{vis}/{clip_id.split('.')[0]}/{clip_id}``
                                                       (HD-VILA clips carry their extension)
default    anything else (MSR-VTT, ...)                ``{vis}/{basename(clip_id)}.mp4``
=========  ==========================================  ==========================================

The original appends ``.mp4`` to the id's last path component unconditionally (ids never carry an
extension in the retrieval sets), and recognises LSMDC by its video folder and DiDeMo by its
annotation path; matching the dataset name as well costs nothing and survives renamed folders.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from clipvip.config import dataset_entry
from clipvip.errors import DataError
from clipvip.logging_utils import get_logger

LOGGER = get_logger(__name__)

ANNOTATION_SUFFIXES = (".jsonl", ".json")


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------
def iter_annotation_file(path: str) -> Iterator[tuple[str, dict]]:
    """Yield ``(where, record)`` for every record of a ``.jsonl`` or ``.json`` file.

    ``where`` is ``"<path>:<line>"`` (jsonl) or ``"<path>[<item>]"`` (json list), so every later
    complaint about a record can name it. Blank lines of a jsonl file are skipped.
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in ANNOTATION_SUFFIXES:
        raise DataError(f"{path}: annotation files must be .jsonl or .json, got '{suffix or 'no suffix'}'")
    if not os.path.isfile(path):
        raise DataError(f"annotation file not found: {path}")
    try:
        if suffix == ".jsonl":
            yield from _iter_jsonl(path)
        else:
            yield from _iter_json_list(path)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read: {e}") from None


def _iter_jsonl(path: str) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            text = line.rstrip("\r\n")
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: {_jsonl_error(text, e)}") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def _jsonl_error(text: str, e: json.JSONDecodeError) -> str:
    """What is wrong with one jsonl line, and where in it.

    The line is parsed without its newline: with it, a record cut short (a missing ``}``) is
    reported at "line 2, column 1" of the one-line document, which points nowhere useful.
    """
    if e.msg.startswith("Unterminated string"):
        return f"malformed JSON: the string opened at column {e.pos + 1} is never closed (a missing '\"'?)"
    if e.pos >= len(text.rstrip()):
        return (f"malformed JSON: the line ends (column {e.pos + 1}) before the record is complete, "
                f"a missing closing '}}' or ']'? (parser: {e.msg})")
    near = text[max(0, e.pos - 20):e.pos + 20]
    return f"malformed JSON at column {e.pos + 1}: {e.msg} (near {near!r})"


def _iter_json_list(path: str) -> Iterator[tuple[str, dict]]:
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: a .json annotation file must hold a list of objects")
    for i, record in enumerate(records):
        where = f"{path}[{i}]"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        yield where, record


def read_records(path: str) -> list[dict]:
    """All records of an annotation file, as plain dicts (errors name the file and line)."""
    return [record for _, record in iter_annotation_file(path)]


# ----------------------------------------------------------------------------------------------
# Per-dataset rules
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClipRecord:
    """One clip of a retrieval set, resolved by its dataset's rule."""

    clip_id: str
    texts: tuple[str, ...]  # non-empty captions; empty when the record had none usable
    path: str  # video file, or frame folder for frame datasets
    num_frame: int | None = None  # frame datasets: frames in the folder
    where: str = ""  # "<file>:<line>" of the record, for messages
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def is_frame_folder(self) -> bool:
        return self.num_frame is not None


def _texts_as_given(texts: list[str]) -> list[str]:
    return texts


def _texts_as_paragraph(texts: list[str]) -> list[str]:
    # DiDeMo describes a video with several consecutive moments; the paragraph is the query.
    return [" ".join(texts)] if texts else []


def _flat_mp4(vis: str, clip_id: str) -> str:
    return os.path.join(vis, os.path.basename(clip_id) + ".mp4")


def _relative_avi(vis: str, clip_id: str) -> str:
    return os.path.join(vis, clip_id + ".avi")


def _frame_folder(vis: str, clip_id: str) -> str:
    return os.path.join(vis, clip_id)


def hdvila_video_path(vis: str, clip_id: str) -> str:
    """``QMi8x8o55Ns.1.mp4`` -> ``{vis}/QMi8x8o55Ns/QMi8x8o55Ns.1.mp4`` (one folder per YouTube video)."""
    return os.path.join(vis, clip_id.split(".")[0], clip_id)


@dataclass(frozen=True)
class DatasetEntry:
    """One entry of ``train_datasets`` / ``val_datasets`` / ``inference_datasets``, as the data code reads it.

    Built by :meth:`from_config` from the entry's dict; the keys it leaves out take the defaults of
    ``clipvip.config.DATASET_DEFAULTS``, the keys it must not hold are errors there.
    """

    name: str  # the entry's name, or its ``txt`` where it has none (logs, eval_results.json)
    txt: str
    vis: str
    vis_format: str
    vid_cap_path: str
    vid_txt: str
    # vis_format "webdataset" (clipvip.data.shards): the tar shards and how their members are read
    shards: str | tuple[str, ...] = ""
    shard_index: str = ""
    text_field: str = "txt"
    caption_field: str = ""
    video_field: str = ""
    shuffle_buffer: int = 256

    @classmethod
    def from_config(cls, entry: Mapping) -> "DatasetEntry":
        entry = dataset_entry(entry)
        shards = entry.shards if isinstance(entry.shards, str) else tuple(entry.shards)
        return cls(name=str(entry.name or entry.txt or (shards if isinstance(shards, str) else shards[0])),
                   txt=str(entry.txt), vis=str(entry.vis or ""),
                   vis_format=str(entry.vis_format), vid_cap_path=str(entry.vid_cap_path or ""),
                   vid_txt=str(entry.vid_txt), shards=shards, shard_index=str(entry.shard_index or ""),
                   text_field=str(entry.text_field or ""), caption_field=str(entry.caption_field or ""),
                   video_field=str(entry.video_field or ""), shuffle_buffer=int(entry.shuffle_buffer))


def _mentions(word: str) -> Callable[[DatasetEntry], bool]:
    def match(entry: DatasetEntry) -> bool:
        return any(word in text.lower() for text in (entry.name, entry.txt, entry.vis))
    return match


@dataclass(frozen=True)
class AnnotationRule:
    """How the records of one kind of dataset become clips."""

    name: str
    matches: Callable[[DatasetEntry], bool]  # does this rule apply to the dataset?
    locate: Callable[[str, str], str]  # (vis, clip_id) -> video file or frame folder
    merge_texts: Callable[[list[str]], list[str]] = _texts_as_given  # a record's captions -> queries
    frame_folders: bool = False  # clips are folders of jpgs with num_frame in the record


# Checked in order; the first rule whose ``matches`` says yes is used.
ANNOTATION_RULES: dict[str, AnnotationRule] = {
    rule.name: rule
    for rule in (
        AnnotationRule("frame", lambda d: d.vis_format == "frame", _frame_folder, frame_folders=True),
        AnnotationRule("didemo", _mentions("didemo"), _flat_mp4, merge_texts=_texts_as_paragraph),
        AnnotationRule("lsmdc", _mentions("lsmdc"), _relative_avi),
        AnnotationRule("hdvila", lambda d: False, hdvila_video_path),
        AnnotationRule("default", lambda d: True, _flat_mp4),
    )
}


def select_rule(entry: DatasetEntry, name: str | None = None) -> AnnotationRule:
    """The rule for a dataset; ``name`` forces one (e.g. "hdvila" for pretraining val sets)."""
    if name is not None:
        if name not in ANNOTATION_RULES:
            raise DataError(f"unknown annotation rule '{name}' (valid: {', '.join(ANNOTATION_RULES)})")
        return ANNOTATION_RULES[name]
    return next(rule for rule in ANNOTATION_RULES.values() if rule.matches(entry))


def _record_texts(record: dict, where: str) -> list[str]:
    if "text" not in record:
        raise DataError(f"{where}: record has no 'text'")
    text = record["text"]
    texts = text if isinstance(text, list) else [text]
    if not all(isinstance(t, str) for t in texts):
        raise DataError(f"{where}: 'text' must be a string or a list of strings")
    # Empty captions are not errors of the file's format: they are bad samples, handled by the
    # dataset (substituted in training, dropped in evaluation).
    return [t for t in texts if t.strip()]


def _record_clip_id(record: dict, where: str) -> str:
    # The original's pretraining reader also accepts "video_id".
    clip_id = record.get("clip_id", record.get("video_id"))
    if not isinstance(clip_id, str) or not clip_id:
        raise DataError(f"{where}: record has no 'clip_id' string")
    return clip_id


def load_annotations(path: str, entry: DatasetEntry, rule: AnnotationRule | str | None = None) -> list[ClipRecord]:
    """Read a retrieval annotation file into :class:`ClipRecord` objects, in file order.

    ``entry`` supplies ``vis`` (and the name / vis_format the rule is chosen by).
    A record without ``clip_id`` or ``text``, or a frame record without an integer
    ``num_frame``, is a :class:`DataError` naming the file and line.
    """
    if not isinstance(rule, AnnotationRule):
        rule = select_rule(entry, rule)
    vis = entry.vis
    clips = []
    for where, record in iter_annotation_file(path):
        clip_id = _record_clip_id(record, where)
        texts = rule.merge_texts(_record_texts(record, where))
        num_frame = None
        if rule.frame_folders:
            num_frame = record.get("num_frame")
            if isinstance(num_frame, bool) or not isinstance(num_frame, int) or num_frame <= 0:
                raise DataError(f"{where}: frame-folder record needs a positive integer 'num_frame'")
        extra = {k: v for k, v in record.items() if k not in ("clip_id", "video_id", "text", "num_frame")}
        clips.append(ClipRecord(clip_id, tuple(texts), rule.locate(vis, clip_id), num_frame, where, extra))
    LOGGER.debug("%s: %d clips (rule '%s')", path, len(clips), rule.name)
    return clips
