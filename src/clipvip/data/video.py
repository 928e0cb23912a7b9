"""Reading frames from video files or encoded bytes in memory (decord or PyAV) and from folders
of JPEG frames.

A video source is a path or a :class:`VideoBytes` (a whole encoded file held in memory, e.g. a
member of a WebDataset tar shard, with the name errors give it); bytes are decoded from an
in-memory file object and never written to disk.

Every failure to read a clip is a :class:`VideoDecodeError` naming the file, so a dataset can
log it and pick another clip instead of dying (DESIGN §2). The decoders themselves are C
libraries: a file that makes one of them crash the process or hang cannot be caught here, so
the cheap checks (the file exists, is a file, is not empty; bytes are not empty) run before any
decoder sees it.

Frame indices are 0-based positions in presentation order. Indices past the last frame that
can really be decoded are clamped to it, because container metadata (and ``num_frame`` in
annotations) can promise more frames than a file holds.

The decoders' own diagnostics ("moov atom not found", decord's ``video_reader.cc:83: ERROR
opening``) are kept off stderr, where they would repeat the one-line error of the same file in a
foreign format; they are logged at DEBUG on the ``clipvip.data.video`` logger instead. Set
``CLIPVIP_NATIVE_STDERR=1`` to let them through untouched. The reason a
:class:`VideoDecodeError` gives is one line without the decoders' source positions and build paths.

A still image renamed ``.mp4`` is not a video: PyAV would open a PNG as a clip of one frame, so
the PyAV reader refuses image containers, and :func:`probe_video` says so from the file's header
alone (``clipvip index`` sorts a folder with it before loading a model).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import numpy as np
import torch

from clipvip.errors import ConfigError, DataError
from clipvip.logging_utils import get_logger

logger = get_logger(__name__)

DEFAULT_BACKEND = "decord"
# Preference order: decord is what the original code used and seeks well in long videos;
# PyAV has wheels everywhere (decord has x86_64 Linux/Windows wheels only).
_BACKEND_ORDER = ("decord", "pyav")
# Backends used only when asked for by name, never by default or as a fallback: torchcodec's PyPI
# wheels are built against CUDA torch and fail to load beside a CPU torch (libnvrtc.so.13), and
# importing it costs a second or more; a CPU machine must not pay for, or trip over, it.
_OPTIONAL_BACKENDS = ("torchcodec",)
_MODULES = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec.decoders"}
_BACKEND_ENV = "CLIPVIP_VIDEO_BACKEND"
_NATIVE_STDERR_ENV = "CLIPVIP_NATIVE_STDERR"


@dataclass(frozen=True)
class VideoBytes:
    """An encoded video file held in memory, read like a file on disk but never written to one."""

    data: bytes  # the whole encoded file (e.g. a tar member), container and all
    name: str    # what errors and logs call it, e.g. "/data/shards/00003.tar:000030017.mp4"

    def __repr__(self) -> str:  # not the bytes: a repr of a 5 MB member in a log line is noise
        return f"VideoBytes(name={self.name!r}, {len(self.data)} bytes)"


# What count_frames / load_frames / load_sampled_frames read: a path or bytes in memory.
VideoSource = Union[str, "os.PathLike[str]", VideoBytes]


class BackendUnavailable(ConfigError, ImportError):
    """A video backend asked for by name cannot be loaded here (a one-line config error that
    ``except ImportError`` catches too)."""


class VideoDecodeError(DataError):
    """A video file or frame folder is missing, empty, truncated or cannot be decoded.

    The one place every reason a clip is skipped for is made: it becomes one readable line
    (:func:`readable_reason`), whatever the decoder put in its message.
    """

    def __init__(self, path, reason: str | None = None):
        self.path = os.fspath(path)
        reason = None if reason is None else readable_reason(reason)
        self.reason = reason
        # args = (path, reason) so the error pickles across DataLoader worker processes.
        super().__init__(*((self.path,) if reason is None else (self.path, reason)))

    def __str__(self) -> str:
        if self.reason is None:  # built from a bare message (e.g. torch's ExceptionWrapper)
            return self.path
        return f"cannot read video {self.path}: {self.reason}"


# What a native library puts in its messages that says nothing about the user's file: dmlc's log
# prefix "[14:18:32] ", a build path and line such as "/tmp/pip-req-build-x/src/video/video_reader.cc:151: "
# (decord's messages carry both; the path is where the wheel was built), and errno's "[Errno -1094995529] ".
_NATIVE_NOISE = re.compile(r"\[\d\d:\d\d:\d\d\]\s*|\[Errno -?\d+\]\s*"
                           r"|(?:[^\s:'\"]*/)?[\w.+-]+\.(?:cc|cpp|cxx|c|h|hpp):\d+:\s*")


def readable_reason(text: str) -> str:
    """``text`` as one line, without native source positions, build paths or a stack trace."""
    text = str(text).split("Stack trace", 1)[0]  # dmlc appends the native frames to its message
    return " ".join(_NATIVE_NOISE.sub("", text).split())


# ---------------------------------------------------------------------------------------------
# Backend selection
# ---------------------------------------------------------------------------------------------
_importable: dict[str, bool] = {}
_import_errors: dict[str, str] = {}  # why a backend could not be imported, in one line
_warned_fallback = False


def _is_importable(name: str) -> bool:
    if name not in _importable:
        try:
            __import__(_MODULES[name])
            _importable[name] = True
        except Exception as e:  # an ImportError, or a broken native library raising anything else
            _importable[name] = False
            _import_errors[name] = _import_reason(e)
    return _importable[name]


def _import_reason(exc: BaseException) -> str:
    """The loader's own message, first line, and the root cause's where it says more.

    torchcodec raises ``OSError: Could not load this library: .../libtorchcodec_image.so`` from
    ``OSError: libnvrtc.so.13: cannot open shared object file``: the second names what is missing.
    """
    first = f"{type(exc).__name__}: {_one_line(exc)}"
    root = exc
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__
    if root is not exc and _one_line(root) and _one_line(root) not in first:
        first += f" ({_one_line(root)})"
    return first


def available_backends(optional: bool = False) -> list[str]:
    """Names of the video backends that can be imported here, most preferred first; ``optional``:
    also those only used when asked for by name (torchcodec), which this tries to import."""
    names = _BACKEND_ORDER + (_OPTIONAL_BACKENDS if optional else ())
    return [name for name in names if _is_importable(name)]


def backend_import_error(name: str) -> str | None:
    """Why backend ``name`` cannot be imported here (one line), or None if it can."""
    return None if _is_importable(name) else _import_errors.get(name, "not installed")


def resolve_backend(backend: str | None) -> str:
    """The backend to use for ``backend`` (None: ``$CLIPVIP_VIDEO_BACKEND`` or "decord").

    "decord" falls back to "pyav" (with one warning per process) where decord cannot be
    imported, so configs written for the original code run on machines without decord wheels.
    "torchcodec" is imported only here, when asked for, and never falls back: a run that asked
    for it is told in one line (:class:`BackendUnavailable`) why it cannot load and what to do.
    """
    global _warned_fallback
    name = backend if backend is not None else os.environ.get(_BACKEND_ENV, DEFAULT_BACKEND)
    name = name.lower()
    if name not in _BACKEND_ORDER + _OPTIONAL_BACKENDS:
        raise ValueError(f"unknown video backend {name!r}; valid names: "
                         f"{', '.join(_BACKEND_ORDER + _OPTIONAL_BACKENDS)}")
    if _is_importable(name):
        return name
    if name == "torchcodec":
        raise BackendUnavailable(
            f"video backend 'torchcodec' cannot be loaded here: {_import_errors[name]}. Its Linux wheels "
            "need a CUDA build of torch and FFmpeg's shared libraries (FFmpeg 4 or newer); install those "
            "(pip install 'clipvip[torchcodec]' beside a CUDA torch), or set video_backend to "
            "'decord' or 'pyav'")
    if name == "decord" and _is_importable("pyav"):
        if not _warned_fallback:
            logger.warning("decord cannot be imported; decoding videos with PyAV instead")
            _warned_fallback = True
        return "pyav"
    raise ImportError(f"video backend {name!r} is not installed (available: {available_backends()})")


# ---------------------------------------------------------------------------------------------
# Native diagnostics
# ---------------------------------------------------------------------------------------------
# decord writes to file descriptor 2 from C++: its bundled ffmpeg's av_log lines and its dmlc
# LOG(...) lines. decord.logging.set_level only reaches the former, so the descriptor itself is
# pointed at a temporary file while decord works (_decord_stderr_to_debug). Readers in several
# threads share one redirection (a count under a lock: a second dup2 nested inside the first and
# undone out of order would leave stderr pointing at a dead temporary file for good), and what was
# caught is sorted afterwards: decoder lines go to DEBUG, anything else (another thread's output in
# the meantime) is written back to stderr, late but not lost. DataLoader workers are processes,
# each with its own descriptor table; a fork in the middle of a redirection is undone in the child.
_NATIVE_LINE = re.compile(
    rb"^(\[[^\]\n]* @ (0x)?[0-9a-fA-F]+\] "   # av_log with a context: "[mov,mp4,... @ 0x55..] "
    rb"|\[\d\d:\d\d:\d\d\] \S+:\d+: "      # dmlc LOG: "[04:18:47] .../video_reader.cc:83: "
    rb"|\s*Last message repeated \d+ times)"  # av_log's own repeat counter
)
_redirect_lock = threading.Lock()
_redirect_depth = 0
_saved_stderr_fd: int | None = None
_capture_file = None
_fork_generation = 0  # bumped in a forked child, whose inherited redirections are void


def _sort_native_output(data: bytes) -> None:
    """Log decoder lines of ``data`` at DEBUG; write every other line back to stderr."""
    passthrough = []
    for line in data.splitlines(keepends=True):
        if _NATIVE_LINE.match(line):
            logger.debug("native decoder: %s", line.decode("utf-8", "replace").rstrip())
        else:
            passthrough.append(line)
    if passthrough:
        os.write(2, b"".join(passthrough))


@contextlib.contextmanager
def _decord_stderr_to_debug() -> Iterator[None]:
    """Keep what native code writes to fd 2 inside this block off the terminal (see above)."""
    global _redirect_depth, _saved_stderr_fd, _capture_file
    if os.environ.get(_NATIVE_STDERR_ENV, "") not in ("", "0") or not _fd2_is_open():
        yield
        return
    with _redirect_lock:
        generation = _fork_generation
        if _redirect_depth == 0:
            _flush_python_stderr()
            capture = tempfile.TemporaryFile()
            saved = os.dup(2)
            os.dup2(capture.fileno(), 2)
            _saved_stderr_fd, _capture_file = saved, capture
        _redirect_depth += 1
    try:
        yield
    finally:
        caught = b""
        with _redirect_lock:
            # A block entered before a fork and left in the child has nothing left to undo.
            inherited = generation != _fork_generation
            if not inherited:
                _redirect_depth -= 1
            if not inherited and _redirect_depth == 0:
                _flush_python_stderr()  # Python text written meanwhile belongs to the capture
                os.dup2(_saved_stderr_fd, 2)
                os.close(_saved_stderr_fd)
                _capture_file.seek(0)
                caught = _capture_file.read()
                _capture_file.close()
                _saved_stderr_fd = _capture_file = None
        if caught:
            _sort_native_output(caught)


def _fd2_is_open() -> bool:
    try:
        os.fstat(2)
    except OSError:  # a daemon without stderr: nothing to keep clean
        return False
    return True


def _flush_python_stderr() -> None:
    import sys

    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - a closed or replaced stream must not break decoding
        pass


def _undo_redirect_in_child() -> None:
    # A fork taken while another thread was inside a redirection: the child starts with fd 2 on
    # the parent's capture file and a lock no thread of its own will release.
    global _redirect_lock, _redirect_depth, _saved_stderr_fd, _capture_file, _fork_generation
    _fork_generation += 1
    if _saved_stderr_fd is not None:
        os.dup2(_saved_stderr_fd, 2)
        os.close(_saved_stderr_fd)
    _redirect_lock = threading.Lock()
    _redirect_depth, _saved_stderr_fd, _capture_file = 0, None, None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_undo_redirect_in_child)


@contextlib.contextmanager
def _pyav_log_to_debug() -> Iterator[None]:
    """Keep libav messages of this thread's PyAV calls out of the ``libav`` Python logger.

    PyAV >= 13 drops them unless asked (``av.logging.set_level``); older PyAV, and code that
    asked, routes them to Python logging at WARNING, i.e. to stderr. Captured per thread, logged
    at DEBUG here.
    """
    import av.logging

    try:
        with av.logging.Capture(local=True) as logs:
            yield
    finally:  # also (above all) when the file could not be read
        for level, name, message in logs:
            logger.debug("libav %s (level %s): %s", name, level, message.strip())


# ---------------------------------------------------------------------------------------------
# Readers: one open file, its frame count, and a batch read of sorted unique indices
# ---------------------------------------------------------------------------------------------
def _source_name(source: str | VideoBytes) -> str:
    return source.name if isinstance(source, VideoBytes) else source


def _open_arg(source: str | VideoBytes):
    """What a decoder opens: the path, or a fresh in-memory file over the bytes (one per open, so a
    retry or a second handle starts at offset 0 whatever the first one read)."""
    return io.BytesIO(source.data) if isinstance(source, VideoBytes) else source


class _NotAVideo(RuntimeError):
    """The container opens but holds no video to read: its message is the whole reason."""


# FFmpeg's demuxers of still images: image2 and the *_pipe family (png_pipe, jpeg_pipe, ...).
# Through one of them PyAV reads a PNG renamed .mp4 as a one-frame "video", which would become a
# clip of one picture repeated; yuv4mpegpipe (raw video) does not end in "_pipe".
def _is_image_format(name: str) -> bool:
    return name == "image2" or name.endswith("_pipe")


def _open_video_container(source: str | VideoBytes):
    """``av.open`` of ``source`` (header only, no decoding), refused unless it holds a video stream
    and is not a still image."""
    import av

    container = av.open(_open_arg(source))
    problem = ("no video stream" if not container.streams.video
               else f"an image ({container.format.name}), not a video" if _is_image_format(container.format.name)
               else None)
    if problem:
        container.close()
        raise _NotAVideo(problem)
    return container


class _DecordReader:
    def __init__(self, source: str | VideoBytes):
        import decord

        # One decoding thread: parallelism comes from DataLoader workers, and decord's default
        # (all cores per reader) oversubscribes the CPU as soon as there are several workers.
        # A file object is read whole by decord (into its own buffer) and decoded from memory.
        self._vr = decord.VideoReader(_open_arg(source), ctx=decord.cpu(0), num_threads=1)

    def __len__(self) -> int:
        return len(self._vr)

    def read(self, unique_sorted: list[int]) -> list[np.ndarray]:
        last = len(self._vr) - 1
        if last < 0:
            raise RuntimeError("no frames")
        clamped = [min(i, last) for i in unique_sorted]
        # asnumpy() instead of decord's torch bridge: the bridge is a global switch that would
        # change what decord returns for every other user in the process; if some other code
        # (the original's dataset modules, at import) turned it on, a torch tensor comes back.
        batch = self._vr.get_batch(clamped)
        batch = batch.asnumpy() if hasattr(batch, "asnumpy") else np.asarray(batch)  # (K, H, W, 3) uint8 RGB
        if batch.ndim != 4 or batch.shape[-1] != 3:
            # decord 0.6.0 (PyPI) returns (K, W, H, 4) garbage for a stream with a 90-degree
            # rotation tag (phone videos): the PyAV retry in _with_reader reads it upright.
            raise RuntimeError(f"decord returned frames of shape {tuple(batch.shape[1:])}, not (H, W, 3) "
                               "(a rotation tag?)")
        return list(batch)

    def close(self) -> None:
        del self._vr


def span_plan(pts: Sequence[int | None], keyframes: Sequence[bool], indices: Sequence[int]
              ) -> tuple[int, list[int]] | None:
    """Where to start decoding packets (in decode order, with their timestamps ``pts`` and key-frame
    flags) to get frames ``indices`` (presentation order), and the timestamp of each of those
    frames: ``(first packet, [timestamp per index])``; None where the timestamps cannot number the
    frames (one missing, or two alike).

    Frame ``i`` is the packet with the ``i``-th smallest timestamp; an index past the end is the
    last frame. The start is the last key frame at or before every wanted frame in both decode
    and presentation order: a frame shown before its key frame belongs to the group before and
    may refer to it (open GOPs). Packet 0 where no key frame qualifies.
    """
    if not pts or None in pts or len(set(pts)) != len(pts):
        return None
    in_order = sorted(pts)  # frame i is shown at in_order[i]
    shown = [in_order[min(int(i), len(in_order) - 1)] for i in indices]
    wanted = set(shown)
    first_packet = min(k for k, t in enumerate(pts) if t in wanted)
    earliest = min(wanted)
    start = max((k for k in range(first_packet + 1) if keyframes[k] and pts[k] <= earliest), default=0)
    return start, shown


# Codecs whose frames the PyAV reader decodes from the key frame before the first wanted one
# (``_PyAVReader._read_span``), held equal to decoding from the start by tests/test_device_input.py
# (B-frames, open groups, variable frame rate); other codecs are decoded from the start. MPEG-4
# part 2 is left out: AVI files (LSMDC's) may pack two frames into one packet, which one timestamp
# cannot name.
_SPAN_CODECS = ("h264", "hevc")
# Of those, the ones whose decoder's "NONREF" skips only frames no other frame refers to: H.264's
# nal_ref_idc 0. Not HEVC: there it skips sub-layer non-reference pictures, which pictures of a
# higher temporal sub-layer may still refer to.
_SKIP_UNREFERENCED = ("h264",)


class _PyAVReader:
    """PyAV: the container's packets, read once, and the frames decoded from them.

    Frame ``i`` is the ``i``-th frame in presentation order, as decoding from the start and
    counting would number it. Where the packets allow it (:meth:`_read_span`) only what the
    wanted frames need is decoded: from the key frame before the first of them to the last of
    them, leaving out frames nothing refers to. Otherwise every frame up to the last wanted one.
    """

    def __init__(self, source: str | VideoBytes):
        import av

        self._source = source
        self._container = _open_video_container(source)
        self._stream = self._container.streams.video[0]
        self._stream.thread_count = 1  # see _DecordReader: workers give the parallelism
        self._reformatter = av.video.reformatter.VideoReformatter()  # one YUV -> RGB set-up per file
        self._len: int | None = None
        self._packets: list | None = None
        self._demux_error: Exception | None = None  # what ended the demuxing early (a damaged file)

    def _demuxed(self) -> list:
        """The stream's packets holding data, in decode order (demuxing decodes nothing); where the
        file is damaged, those before the damage (``_demux_error`` says why it ended)."""
        if self._packets is None:
            self._packets = []
            try:
                for packet in self._container.demux(self._stream):
                    if packet.size > 0:
                        self._packets.append(packet)
            except Exception as e:  # noqa: BLE001 - raised where a read needs what lies behind it
                self._demux_error = e
        return self._packets

    def _packets_from_start(self) -> Iterator:
        """The stream's packets in decode order, then None (the frames the decoder still holds): the
        list :meth:`_demuxed` kept where it ran, else demuxed as they are read, so that a read that
        stops early reads no more of the file. Raises the demuxing error where a read reaches it."""
        if self._packets is not None:
            yield from self._packets
            if self._demux_error is not None:
                raise self._demux_error
        else:
            for packet in self._container.demux(self._stream):
                if packet.size > 0:
                    yield packet
        yield None

    def __len__(self) -> int:
        if self._len is None:
            n = int(self._stream.frames or 0)
            if n <= 0:
                # Some containers (webm, raw streams) carry no frame count: count the packets instead.
                n = len(self._demuxed())
                if self._demux_error is not None:
                    raise self._demux_error
            self._len = n
        return self._len

    def read(self, unique_sorted: list[int]) -> list[np.ndarray]:
        span = self._read_span(unique_sorted)
        return span if span is not None else self._read_from_start(unique_sorted)

    def _read_span(self, unique_sorted: list[int]) -> list[np.ndarray] | None:
        """The frames decoded from the key frame before the first wanted one up to the last
        (:func:`span_plan`), or None where the packets cannot say which frame each is: a codec not
        in ``_SPAN_CODECS``, a damaged file, not as many packets as the frames the indices were
        drawn from, timestamps missing or repeated (then :meth:`_read_from_start`).

        Frames that nothing refers to are skipped unless wanted (``_SKIP_UNREFERENCED`` codecs;
        ``skip_frame`` "NONREF", set packet by packet): skipping them changes no other frame. Each
        frame is found by its timestamp; where a wanted one does not come out, the file is decoded
        again from the start.
        """
        if self._stream.codec_context.name not in _SPAN_CODECS:
            return None
        packets = self._demuxed()
        if self._demux_error is not None or len(packets) != len(self):
            return None
        plan = span_plan([p.pts for p in packets], [p.is_keyframe for p in packets], unique_sorted)
        if plan is None:
            return None
        start, shown = plan
        wanted = set(shown)
        context = self._stream.codec_context
        skip = context.name in _SKIP_UNREFERENCED
        got: dict[int, np.ndarray] = {}  # timestamp -> (H, W, 3) uint8
        try:
            for packet in packets[start:]:
                context.skip_frame = "NONREF" if skip and packet.pts not in wanted else "DEFAULT"
                self._keep(context.decode(packet), wanted, got)
                if len(got) == len(wanted):
                    break
            else:
                context.skip_frame = "DEFAULT"
                self._keep(context.decode(None), wanted, got)  # the frames the decoder still holds
        finally:
            context.skip_frame = "DEFAULT"
        if len(got) < len(wanted):
            logger.debug("%s: %d of %d wanted frames not found by timestamp; decoding from the start",
                         _source_name(self._source), len(wanted) - len(got), len(wanted))
            again = _PyAVReader(self._source)
            try:
                return again._read_from_start(unique_sorted)
            finally:
                again.close()
        return [got[t] for t in shown]

    def _keep(self, frames, wanted: set, got: dict) -> None:
        for frame in frames:
            if frame.pts in wanted and frame.pts not in got:
                got[frame.pts] = _upright(frame, self._reformatter)  # (H, W, 3)

    def _read_from_start(self, unique_sorted: list[int]) -> list[np.ndarray]:
        """Every frame decoded from the first packet on, counted, up to the last wanted one; a damaged
        file fails only where a wanted frame lies behind the damage."""
        wanted = set(unique_sorted)
        stop = unique_sorted[-1]
        got: dict[int, np.ndarray] = {}
        last_frame = None
        n_decoded = 0
        context = self._stream.codec_context
        for packet in self._packets_from_start():
            for frame in context.decode(packet):
                if n_decoded in wanted:
                    got[n_decoded] = _upright(frame, self._reformatter)  # (H, W, 3)
                last_frame = frame
                n_decoded += 1
                if n_decoded > stop:
                    break
            if n_decoded > stop:
                break
        if n_decoded == 0:
            raise RuntimeError("no frame could be decoded")
        out = []
        tail = None
        for i in unique_sorted:
            if i in got:
                out.append(got[i])
            else:  # past the real end of the stream: repeat the last decoded frame
                if tail is None:
                    tail = _upright(last_frame, self._reformatter)
                out.append(tail)
        return out

    def close(self) -> None:
        self._container.close()


class _TorchCodecReader:
    """torchcodec's ``VideoDecoder``: FFmpeg on the CPU, or NVDEC with ``device="cuda"``.

    ``seek_mode="exact"`` scans the packets once when the file opens (as decord indexes it), so
    ``len()`` is the real frame count and ``get_frames_at`` seeks to the key frame before each
    wanted frame instead of decoding from the start. Frames come out upright (torchcodec applies
    the rotation tag) in NHWC, the layout the other readers return.
    """

    def __init__(self, source: str | VideoBytes, device: str = "cpu"):
        from torchcodec.decoders import VideoDecoder

        # Bytes go in as bytes: torchcodec decodes them from memory through its own AVIO reader.
        what = bytes(source.data) if isinstance(source, VideoBytes) else source
        # One FFmpeg thread: parallelism comes from DataLoader workers (see _DecordReader).
        self._decoder = VideoDecoder(what, dimension_order="NHWC", num_ffmpeg_threads=1,
                                     device=device, seek_mode="exact")

    def __len__(self) -> int:
        return len(self._decoder)

    def read_tensor(self, unique_sorted: list[int]) -> torch.Tensor:
        """Frames ``unique_sorted`` (clamped to the last frame) as uint8 ``(K, H, W, 3)`` on the
        decoder's device."""
        last = len(self._decoder) - 1
        if last < 0:
            raise RuntimeError("no frames")
        clamped = [min(i, last) for i in unique_sorted]
        distinct = sorted(set(clamped))  # several indices past the end clamp to one frame
        batch = self._decoder.get_frames_at(distinct).data  # (K', H, W, 3) uint8
        if batch.ndim != 4 or batch.shape[-1] != 3:
            raise RuntimeError(f"torchcodec returned frames of shape {tuple(batch.shape[1:])}, not (H, W, 3)")
        position = {i: k for k, i in enumerate(distinct)}
        if len(distinct) == len(clamped):
            return batch
        return batch[torch.tensor([position[i] for i in clamped], device=batch.device)]

    def read(self, unique_sorted: list[int]) -> list[np.ndarray]:
        return list(self.read_tensor(unique_sorted).cpu().numpy())

    def close(self) -> None:
        del self._decoder


def _upright(frame, reformatter) -> np.ndarray:
    """An ``av.VideoFrame`` as uint8 RGB ``(H, W, 3)`` the way a player shows it: turned by the
    stream's display matrix (the rotation tag of phone videos), as ffmpeg's autorotate does.

    ``reformatter``: one ``av.video.reformatter.VideoReformatter`` per reader. PyAV 18's
    ``frame.to_ndarray(format="rgb24")`` sets up a new conversion for every frame: 7 ms for a
    64x64 frame against 0.18 ms through a kept reformatter, with the same bytes (measured here).
    """
    rgb = reformatter.reformat(frame, format="rgb24").to_ndarray()
    # PyAV >= 13: the display matrix's counter-clockwise angle (-90 for the usual portrait tag,
    # which players show turned 90 degrees clockwise); np.rot90 turns counter-clockwise for k > 0.
    quarter_turns = int(round(getattr(frame, "rotation", 0) or 0)) // 90
    if quarter_turns % 4:
        rgb = np.ascontiguousarray(np.rot90(rgb, k=quarter_turns))
    return rgb


_READERS = {"decord": _DecordReader, "pyav": _PyAVReader, "torchcodec": _TorchCodecReader}


def _check_source(source: str | VideoBytes) -> None:
    if isinstance(source, VideoBytes):
        # Empty bytes: a member the writer never filled (a failed download). Not bytes at all:
        # a caller bug (a str of the payload?), named as such rather than left to the decoder.
        if not isinstance(source.data, (bytes, bytearray, memoryview)):
            raise VideoDecodeError(source.name, f"video data is {type(source.data).__name__}, not bytes")
        if len(source.data) == 0:
            raise VideoDecodeError(source.name, "empty member")
        return
    _check_file(source)


def _check_file(path: str) -> None:
    # Decoders get only files that exist and hold bytes: some decord builds crash on
    # paths they cannot open instead of raising.
    if not os.path.exists(path):
        raise VideoDecodeError(path, "no such file")
    if not os.path.isfile(path):
        raise VideoDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(path, "empty file")


def _check_indices(frame_indices: Sequence[int]) -> list[int]:
    indices = [int(i) for i in frame_indices]
    if not indices:
        raise ValueError("frame_indices is empty")
    if min(indices) < 0:
        raise ValueError(f"negative frame index in {indices}")
    return indices


def _with_reader(source: VideoSource, backend: str | None, fn: Callable):
    """Run ``fn(reader)`` on an open reader of ``source`` (a path or :class:`VideoBytes`); any
    decoder failure becomes VideoDecodeError naming the file or the bytes' ``name``.

    When decord fails on a file that exists, PyAV gets one try before giving up: the two
    demuxers disagree on a few damaged or unusual files (decord indexes every packet when it
    opens a file and rejects the file if any read fails), and a clip PyAV can read is worth
    keeping. Bytes get the same retry, over a fresh in-memory file.
    """
    if not isinstance(source, VideoBytes):
        source = os.fspath(source)
    path = _source_name(source)
    _check_source(source)
    name = resolve_backend(backend)
    try:
        return _run_reader(name, source, fn)
    except VideoDecodeError:
        raise
    except Exception as first:  # noqa: BLE001 - decoders raise anything (RuntimeError, av.error.*)
        reason = f"{name}: {_describe(first)}"
        if name == "decord" and _is_importable("pyav"):
            try:
                result = _run_reader("pyav", source, fn)
            except Exception as second:  # noqa: BLE001
                reason += f"; pyav: {_describe(second)}"
            else:
                logger.warning("decord could not read %s (%s); read it with PyAV", path, _one_line(first))
                return result
        raise VideoDecodeError(path, reason) from first


def _one_line(exc: BaseException) -> str:
    # decord's errors are dmlc log lines ("[04:18:47] src/video/video_reader.cc:486: Error: ..."),
    # sometimes followed by a native stack trace: the first line, without the source position.
    text = str(exc).strip().split("\n", 1)[0]
    # PyAV names an in-memory file "'<none>'" at the end of its errors: the caller names the bytes.
    text = text[: -len(": '<none>'")] if text.endswith(": '<none>'") else text
    return readable_reason(text)


def _describe(exc: BaseException) -> str:
    """Why a decoder failed, in one line: the exception's type and first line (ours: the line)."""
    return _one_line(exc) if isinstance(exc, _NotAVideo) else f"{type(exc).__name__}: {_one_line(exc)}"


def _run_reader(name: str, source: str | VideoBytes, fn: Callable):
    # The whole life of the reader: decord indexes the file when it opens it and decodes on
    # its own thread, and both print (open errors, "frames corrupted and recovered").
    # torchcodec's FFmpeg logs through av_log to fd 2, as decord's bundled one does.
    quiet = _pyav_log_to_debug if name == "pyav" else _decord_stderr_to_debug
    with quiet():
        reader = _READERS[name](source)
        try:
            return fn(reader)
        finally:
            reader.close()


def _gather(reader, indices: list[int]) -> torch.Tensor:
    unique_sorted = sorted(set(indices))
    arrays = reader.read(unique_sorted)
    position = {i: k for k, i in enumerate(unique_sorted)}
    # Repeats and the caller's order are restored here, so each frame is decoded once.
    stacked = np.stack([arrays[position[i]] for i in indices])  # (N, H, W, 3) uint8
    return torch.from_numpy(stacked)


# ---------------------------------------------------------------------------------------------
# Public API: video files
# ---------------------------------------------------------------------------------------------
def probe_video(source: VideoSource) -> None:
    """Raise :class:`VideoDecodeError` unless ``source`` looks like a video a decoder can read.

    Cheap: the file checks, then the container's header (PyAV, no frame decoded), which
    must hold a video stream and not be a still image. For a command that takes a folder of files
    (``clipvip index``) to sort them out before it loads a model; a file that passes can still
    fail to decode later, and is then skipped as unreadable.
    """
    if not isinstance(source, VideoBytes):
        source = os.fspath(source)
    _check_source(source)
    if not _is_importable("pyav"):
        return  # nothing cheaper to ask: the decoder will say
    try:
        with _pyav_log_to_debug():
            _open_video_container(source).close()
    except Exception as e:  # noqa: BLE001 - av.error.* and anything else a broken header raises
        raise VideoDecodeError(_source_name(source), _describe(e)) from e


def count_frames(source: VideoSource, backend: str | None = None) -> int:
    """Number of frames of the video ``source`` (a path or :class:`VideoBytes`) as the backend
    reports it (> 0)."""
    def _count(reader) -> int:
        n = len(reader)
        if n <= 0:
            raise RuntimeError("the video holds no frames")
        return n

    return _with_reader(source, backend, _count)


def probe_duration(source: VideoSource) -> float | None:
    """Duration in seconds from the container's metadata (no decoding), or None if unknown."""
    try:
        import av

        with av.open(_open_arg(source if isinstance(source, VideoBytes) else os.fspath(source))) as container:
            if container.duration:
                return float(container.duration / av.time_base)
            stream = container.streams.video[0]
            if stream.duration and stream.time_base:
                return float(stream.duration * stream.time_base)
            if stream.frames and stream.average_rate:
                return float(stream.frames / stream.average_rate)
    except Exception:  # noqa: BLE001 - metadata is a nicety; the frames were readable
        return None
    return None


def load_frames(source: VideoSource, frame_indices: Sequence[int], backend: str | None = None) -> torch.Tensor:
    """Frames ``frame_indices`` (0-based, any order, repeats allowed) of ``source`` (a path or
    :class:`VideoBytes`) as uint8 RGB ``[N, H, W, 3]``."""
    indices = _check_indices(frame_indices)
    return _with_reader(source, backend, lambda reader: _gather(reader, indices))


def load_sampled_frames(source: VideoSource, index_fn: Callable[[int], Sequence[int]],
                        backend: str | None = None) -> tuple[torch.Tensor, int]:
    """Open ``source`` (a path or :class:`VideoBytes`) once, ask ``index_fn(num_frames)`` which
    frames to read, read them.

    Returns ``(frames uint8 [N, H, W, 3], num_frames)``. Datasets use this instead of
    :func:`count_frames` then :func:`load_frames`, which would open (and, for decord, index)
    the file twice.
    """
    def _read(reader):
        n = len(reader)
        if n <= 0:
            raise RuntimeError("the video holds no frames")
        indices = _check_indices(index_fn(n))
        return _gather(reader, indices), n

    return _with_reader(source, backend, _read)


def load_sampled_frames_on_device(source: VideoSource, index_fn: Callable[[int], Sequence[int]],
                                  device: str = "cuda") -> tuple[torch.Tensor, int]:
    """:func:`load_sampled_frames` decoded by torchcodec on ``device`` (``"cuda"``: NVDEC): the
    frames, uint8 RGB ``[N, H, W, 3]``, stay on that device; returns ``(frames, num_frames)``.

    For the benchmark and GPU checks: the data path decodes on the CPU in DataLoader workers
    (``video_backend: "torchcodec"``), because a CUDA context in every worker process and frames
    crossing processes in GPU memory cost more than they save for short clips. No PyAV retry here:
    a failure is a VideoDecodeError naming the source.
    """
    if not isinstance(source, VideoBytes):
        source = os.fspath(source)
    _check_source(source)
    resolve_backend("torchcodec")
    try:
        with _decord_stderr_to_debug():
            reader = _TorchCodecReader(source, device=device)
            n = len(reader)
            if n <= 0:
                raise RuntimeError("the video holds no frames")
            indices = _check_indices(index_fn(n))
            unique_sorted = sorted(set(indices))
            batch = reader.read_tensor(unique_sorted)  # (K, H, W, 3) uint8 on device
    except ValueError:  # bad indices from index_fn: the caller's bug, not the file's
        raise
    except Exception as e:  # noqa: BLE001 - torchcodec raises RuntimeError, IndexError...
        raise VideoDecodeError(_source_name(source), f"torchcodec ({device}): {type(e).__name__}: {_one_line(e)}") from e
    position = {i: k for k, i in enumerate(unique_sorted)}
    return batch[torch.tensor([position[i] for i in indices], device=batch.device)], n  # (N, H, W, 3)


# ---------------------------------------------------------------------------------------------
# Public API: frame folders (ActivityNet, vis_format "frame")
# ---------------------------------------------------------------------------------------------
# Layout read by the original code: {folder}/{clip}/{clip}_{i:03d}.jpg where the sampled index i
# itself is the number in the file name, from 0 to num_frame - 1 (not 1-based, not a position in
# a sorted listing). {clip} is the last path component of the clip id.
def _frame_prefix(folder, clip_id: str) -> tuple[str, str]:
    base = os.path.basename(os.path.normpath(clip_id))
    return os.path.join(os.fspath(folder), clip_id), base


def frame_path(folder, clip_id: str, index: int) -> str:
    """Path of frame ``index`` (0-based) of ``clip_id`` in a frame folder."""
    clip_dir, base = _frame_prefix(folder, clip_id)
    return os.path.join(clip_dir, f"{base}_{index:03d}.jpg")


def count_folder_frames(folder, clip_id: str) -> int:
    """Number of ``{clip}_NNN.jpg`` files in ``{folder}/{clip_id}`` (> 0)."""
    clip_dir, base = _frame_prefix(folder, clip_id)
    pattern = re.compile(re.escape(base) + r"_\d+\.jpg$")
    try:
        names = os.listdir(clip_dir)
    except OSError as e:
        raise VideoDecodeError(clip_dir, f"frame folder unreadable: {e.strerror or e}") from e
    n = sum(1 for name in names if pattern.match(name))
    if n == 0:
        raise VideoDecodeError(clip_dir, f"no {base}_NNN.jpg frames in the folder")
    return n


def load_frame_folder(folder, clip_id: str, frame_indices: Sequence[int]) -> torch.Tensor:
    """Frames ``frame_indices`` of a frame folder as uint8 RGB ``[N, H, W, 3]``.

    An index whose file is missing but lies past the last frame present is clamped to that
    frame (the annotation's ``num_frame`` was too large); a missing file inside the range, an
    unreadable JPEG, or frames of different sizes raise :class:`VideoDecodeError`.
    """
    from PIL import Image

    indices = _check_indices(frame_indices)
    cache: dict[int, np.ndarray] = {}
    n_present: int | None = None
    for i in sorted(set(indices)):
        path = frame_path(folder, clip_id, i)
        if not os.path.isfile(path):
            if n_present is None:
                n_present = count_folder_frames(folder, clip_id)
            if i < n_present:
                raise VideoDecodeError(path, "frame file missing")
            path = frame_path(folder, clip_id, n_present - 1)
        try:
            with Image.open(path) as img:
                cache[i] = np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
        except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError...
            raise VideoDecodeError(path, f"{type(e).__name__}: {e}") from e
    shapes = {a.shape for a in cache.values()}
    if len(shapes) > 1:
        raise VideoDecodeError(os.path.join(os.fspath(folder), clip_id),
                               f"frames differ in size: {sorted(shapes)}")
    return torch.from_numpy(np.stack([cache[i] for i in indices]))  # (N, H, W, 3)
