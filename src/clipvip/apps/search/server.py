"""``clipvip serve IDX``: a small HTTP service and web page over one search index (stdlib only).

Routes (all GET; HEAD too for files):

    /                         the search page (``static/index.html``, package data)
    /api/search?q=TEXT&k=K    {"query", "k", "results": [{"id", "path", "score", "duration",
                              "thumbnail", "video"}]}, best first; 400 {"error"} on bad input
    /api/like?id=ID&k=K       the same for the videos closest to indexed video ID
    /api/info                 {"videos", "dim", "index_type", "created", "updated", "weights"}
    /thumb/ID.jpg             the middle frame, as a JPEG (cached)
    /video/ID                 the video file, with its content type and byte ranges (seeking)

Each request runs in its own thread (``ThreadingHTTPServer``); the model runs one query at a
time behind the engine's lock, FAISS and the sidecar have their own. Only ids of the index
reach the file system: a path is never taken from a request.

``clipvip serve`` binds its socket (:func:`listen`) before it loads the index and the model, so a
busy or impossible port is reported at once instead of after the model load (seconds for B/32);
connections that arrive while the model loads wait in the socket's backlog.
"""
from __future__ import annotations

import errno
import json
import mimetypes
import os
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import parse_qs, quote, unquote, urlsplit

from clipvip.errors import ClipvipError
from clipvip.logging_utils import get_logger
from clipvip.apps.search.engine import SearchEngine
from clipvip.apps.search.errors import SearchError

LOGGER = get_logger("search.server")
DEFAULT_K = 12
MAX_K = 200
CHUNK = 1 << 16
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
# Container types browsers know; mimetypes' tables differ between systems.
VIDEO_TYPES = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm",
               ".mkv": "video/x-matroska", ".avi": "video/x-msvideo", ".ogv": "video/ogg",
               ".mpg": "video/mpeg", ".mpeg": "video/mpeg", ".ts": "video/mp2t", ".3gp": "video/3gpp",
               ".flv": "video/x-flv", ".wmv": "video/x-ms-wmv"}


def page() -> bytes:
    return resources.files("clipvip.apps.search").joinpath("static", "index.html").read_bytes()


def video_type(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    return VIDEO_TYPES.get(ext) or mimetypes.guess_type(path)[0] or "application/octet-stream"


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``(start, end)`` inclusive for a single ``bytes=`` range, None for no/ignored header.

    Raises ValueError for a range that cannot be satisfied (answered 416).
    """
    if not header:
        return None
    m = _RANGE.match(header.strip())
    if not m or (not m.group(1) and not m.group(2)):
        return None  # several ranges or another unit: send the whole file, as RFC 9110 allows
    if not m.group(1):  # bytes=-N: the last N bytes
        n = int(m.group(2))
        if n == 0 or size == 0:
            raise ValueError("empty suffix range")
        return max(0, size - n), size - 1
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        raise ValueError("range outside the file")
    return start, min(end, size - 1)


def _result(hit: dict, engine: SearchEngine) -> dict:
    record = engine.index.record(hit["id"])
    quoted = quote(hit["id"], safe="")
    return {**hit, "duration": record.duration if record else None,
            "thumbnail": f"/thumb/{quoted}.jpg", "video": f"/video/{quoted}"}


def make_handler(engine: SearchEngine):
    class Handler(BaseHTTPRequestHandler):
        server_version = "clipvip-search"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the stdlib's name
            LOGGER.debug("%s %s", self.address_string(), format % args)

        # -- responses ------------------------------------------------------------------
        def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (extra or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, value) -> None:
            self._send(status, json.dumps(value).encode("utf-8"), "application/json",
                       {"Cache-Control": "no-store"})

        def _error(self, status: int, message: str) -> None:
            self._json(status, {"error": message})

        # -- routing --------------------------------------------------------------------
        def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
            self.do_GET()

        def do_GET(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
            try:
                if url.path in ("/", "/index.html"):
                    self._send(200, page(), "text/html; charset=utf-8")
                elif url.path == "/api/search":
                    k = _k(query.get("k"))
                    hits = engine.search_text(query.get("q", ""), k)
                    self._json(200, {"query": query.get("q", ""), "k": k,
                                     "results": [_result(h, engine) for h in hits]})
                elif url.path == "/api/like":
                    k = _k(query.get("k"))
                    video_id = query.get("id", "")
                    if engine.index.record(video_id) is None:
                        return self._error(404, f"no video with id '{video_id}' in the index")
                    hits = engine.search_like(video_id, k)
                    self._json(200, {"like": video_id, "k": k, "results": [_result(h, engine) for h in hits]})
                elif url.path == "/api/info":
                    meta = engine.index.meta
                    self._json(200, {"videos": len(engine.index), "dim": engine.index.dim,
                                     "index_type": engine.spec.kind, "created": meta.get("created"),
                                     "updated": meta.get("updated"), "weights": meta.get("weights_path")})
                elif url.path.startswith("/thumb/") and url.path.endswith(".jpg"):
                    data = engine.thumbnail(unquote(url.path[len("/thumb/"):-len(".jpg")]))
                    if data is None:
                        return self._error(404, "no such video")
                    self._send(200, data, "image/jpeg", {"Cache-Control": "max-age=3600"})
                elif url.path.startswith("/video/"):
                    self._video(unquote(url.path[len("/video/"):]))
                else:
                    self._error(404, f"no such page: {url.path}")
            except (BrokenPipeError, ConnectionResetError):
                pass  # the browser went away (it often aborts video requests while seeking)
            except ClipvipError as e:
                self._error(400, str(e))
            except Exception as e:  # noqa: BLE001 - one bad request must not stop the server
                LOGGER.exception("error serving %s", self.path)
                self._error(500, f"{type(e).__name__}: {e}")

        def _video(self, video_id: str) -> None:
            record = engine.index.record(video_id)
            if record is None or not os.path.isfile(record.path):
                return self._error(404, "no such video")
            size = os.path.getsize(record.path)
            try:
                byte_range = parse_range(self.headers.get("Range"), size)
            except ValueError:
                return self._send(416, b"", "text/plain", {"Content-Range": f"bytes */{size}"})
            start, end = byte_range if byte_range else (0, size - 1)
            length = max(0, end - start + 1)
            self.send_response(206 if byte_range else 200)
            self.send_header("Content-Type", video_type(record.path))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Length", str(length))
            if byte_range:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if self.command == "HEAD":
                return
            with open(record.path, "rb") as f:
                f.seek(start)
                left = length
                while left > 0:
                    block = f.read(min(CHUNK, left))
                    if not block:
                        break
                    self.wfile.write(block)
                    left -= len(block)

    return Handler


def _k(value: str | None) -> int:
    if value in (None, ""):
        return DEFAULT_K
    try:
        k = int(value)
    except ValueError:
        raise SearchError(f"k must be a whole number, got '{value}'") from None
    if not 1 <= k <= MAX_K:
        raise SearchError(f"k must be between 1 and {MAX_K}, got {k}")
    return k


class SearchServer(ThreadingHTTPServer):
    """The HTTP server of one engine. ``engine=None`` binds and listens only: :meth:`attach` the
    engine before :meth:`serve_forever` (what :func:`listen` + :func:`serve` do)."""

    daemon_threads = True  # a hanging browser connection must not keep the process alive

    def __init__(self, engine: SearchEngine | None, host: str = "127.0.0.1", port: int = 8000):
        self.engine = None
        super().__init__((host, check_port(port)), BaseHTTPRequestHandler)
        if engine is not None:
            self.attach(engine)

    def attach(self, engine: SearchEngine) -> None:
        self.engine = engine
        self.RequestHandlerClass = make_handler(engine)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        if self.engine is None:
            raise RuntimeError("SearchServer.attach(engine) must come before serve_forever()")
        super().serve_forever(poll_interval)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def check_port(port) -> int:
    """``port`` as an int in 0..65535 (0: the system picks a free one), else a one-line error.

    Without this check the socket module raises ``OverflowError`` for 99999.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise SearchError(f"port {port} is out of range: a port is a number from 0 to 65535 "
                          "(--port 0 picks a free one)")
    return port


def listen(host: str = "127.0.0.1", port: int = 8000) -> SearchServer:
    """A :class:`SearchServer` bound to ``host:port`` and listening, with no engine yet.

    A busy port, a port out of range, an address this machine does not have or a privileged
    port is a one-line :class:`SearchError` that names the port.
    """
    try:
        return SearchServer(None, host, port)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise SearchError(f"port {port} on {host} is already in use (another clipvip serve?): choose another "
                              "with --port N, or --port 0 for a free one") from None
        if e.errno == errno.EACCES and 0 < port < 1024:
            raise SearchError(f"cannot listen on {host}:{port}: ports below 1024 need administrator rights; "
                              "choose another with --port N") from None
        raise SearchError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(engine: SearchEngine, host: str = "127.0.0.1", port: int = 8000,
          server: SearchServer | None = None) -> None:
    """Serve until Ctrl-C; prints the address (port 0 picks a free port) on stdout first.

    ``server``: a socket already bound by :func:`listen` (then ``host``/``port`` are not used);
    it is closed on return either way.
    """
    if server is None:
        server = listen(host, port)
    try:
        server.attach(engine)
        print(f"serving {len(engine.index)} videos on {server.url}", flush=True)
        server.serve_forever()
    finally:
        server.server_close()
