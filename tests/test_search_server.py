"""clipvip serve: the JSON API, thumbnails, byte ranges, concurrent queries, and the page in Chromium."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import pytest

from search_helpers import ENV, make_bench

pytest.importorskip("faiss")

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An index of the synthetic test clips, its engine, and a server on a free port in a thread."""
    from clipvip.apps.search import SearchEngine, index_videos, list_videos
    from clipvip.apps.search.server import SearchServer

    bench = make_bench(tmp_path_factory.mktemp("serve"))
    idx = os.path.join(bench["root"], "idx")
    index_videos(idx, list_videos(bench["videos"]), config=bench["config"])
    engine = SearchEngine.open(idx)
    server = SearchServer(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {**bench, "idx": idx, "engine": engine, "url": server.url}
    server.shutdown()
    server.server_close()
    engine.close()


def get(url, headers=None):
    """``(status, headers, body)`` of a GET, error statuses included."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def api(served, path):
    status, headers, body = get(served["url"] + path)
    assert headers["Content-Type"] == "application/json"
    return status, json.loads(body)


def test_search_api_returns_ranked_results_with_media_links(served):
    query = served["test"][0]["text"]
    status, body = api(served, f"api/search?q={quote(query)}&k=4")
    assert status == 200 and body["query"] == query and body["k"] == 4
    results = body["results"]
    assert len(results) == 4
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    expected = served["engine"].search_text(query, 4)
    assert [(r["id"], r["path"], r["score"]) for r in results] == [(h["id"], h["path"], h["score"]) for h in expected]
    first = results[0]
    assert first["thumbnail"] == f"/thumb/{first['id']}.jpg" and first["video"] == f"/video/{first['id']}"
    assert first["duration"] > 0
    status, like = api(served, f"api/like?id={first['id']}&k=2")
    assert status == 200 and like["results"][0]["id"] == first["id"]
    status, info = api(served, "api/info")
    assert status == 200 and info["videos"] == 6 and info["dim"] == 24 and info["index_type"] == "flat"


def test_bad_requests_are_json_errors(served):
    status, body = api(served, "api/search?q=%20&k=3")
    assert status == 400 and "empty query" in body["error"]
    for k in ("0", "abc", "100000"):
        status, body = api(served, f"api/search?q=circle&k={k}")
        assert status == 400 and "k must" in body["error"]
    assert api(served, "api/like?id=nope")[0] == 404
    assert get(served["url"] + "thumb/nope.jpg")[0] == 404
    assert get(served["url"] + "video/nope")[0] == 404
    assert get(served["url"] + "video/..%2F..%2Fetc%2Fpasswd")[0] == 404  # ids only, never paths
    assert get(served["url"] + "elsewhere")[0] == 404


def test_page_and_thumbnail(served):
    from PIL import Image

    status, headers, body = get(served["url"])
    assert status == 200 and headers["Content-Type"].startswith("text/html") and b'id="q"' in body
    video_id = served["test"][1]["clip_id"]
    status, headers, body = get(served["url"] + f"thumb/{video_id}.jpg")
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    with Image.open(io.BytesIO(body)) as image:
        assert image.format == "JPEG" and image.size == (64, 64)


def test_video_is_served_with_its_type_and_byte_ranges(served):
    video_id = served["test"][2]["clip_id"]
    with open(os.path.join(served["videos"], video_id + ".mp4"), "rb") as f:
        data = f.read()
    url = served["url"] + f"video/{video_id}"
    status, headers, body = get(url)
    assert status == 200 and headers["Content-Type"] == "video/mp4" and headers["Accept-Ranges"] == "bytes"
    assert body == data
    status, headers, body = get(url, {"Range": "bytes=10-99"})
    assert status == 206 and body == data[10:100] and headers["Content-Range"] == f"bytes 10-99/{len(data)}"
    status, _, body = get(url, {"Range": "bytes=-16"})
    assert status == 206 and body == data[-16:]
    status, _, body = get(url, {"Range": f"bytes={len(data) - 5}-"})
    assert status == 206 and body == data[-5:]
    status, headers, _ = get(url, {"Range": f"bytes={len(data)}-"})
    assert status == 416 and headers["Content-Range"] == f"bytes */{len(data)}"


def test_concurrent_queries_get_the_answers_of_sequential_ones(served):
    queries = [r["text"] for r in served["test"]] + ["a red circle", "a large square moving quickly"]
    engine = served["engine"]
    expected = {q: [(h["id"], h["score"]) for h in engine.search_text(q, 3)] for q in queries}

    def ask(query):
        status, body = api(served, f"api/search?q={quote(query)}&k=3")
        assert status == 200
        return query, [(r["id"], r["score"]) for r in body["results"]]

    def thumb(record):
        return get(served["url"] + f"thumb/{record['clip_id']}.jpg")[0]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(ask, queries * 3))
        thumbs = list(pool.map(thumb, served["test"] * 2))
    assert all(status == 200 for status in thumbs)
    for query, hits in answers:
        assert hits == expected[query], query


def test_serve_command_answers_on_the_port_it_bound(served):
    """`clipvip serve` binds before it loads the model, then serves on that socket: the first
    stdout line names the port (0: a free one) and the API answers there."""
    proc = subprocess.Popen([sys.executable, "-m", "clipvip", "serve", served["idx"], "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving 6 videos on http://127.0.0.1:"), line
        status, _, body = get(line.split(" on ")[1].strip() + "api/info")
        assert status == 200 and json.loads(body)["videos"] == 6
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _browser():
    """Playwright and Debian's Chromium, or a skip (a failure under CI=true, where both must be there)."""
    problem = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = "playwright is not installed (pip install -r requirements-dev.txt)"
    if problem is None and not os.path.exists(CHROMIUM):
        problem = f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    if problem:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser test cannot run in CI: {problem}")
        pytest.skip(problem)
    return sync_playwright


def test_search_page_in_chromium(served):
    sync_playwright = _browser()
    # The real command, as a user starts it; port 0 picks a free port and the first line says which.
    proc = subprocess.Popen([sys.executable, "-m", "clipvip", "serve", served["idx"], "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving 6 videos on http://127.0.0.1:"), (line, proc.stderr.read()[-2000:]
                                                                          if proc.poll() is not None else "")
        url = line.split(" on ")[1].strip()
        query = served["test"][0]["text"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(url)
                page.fill("#q", query)
                page.press("#q", "Enter")
                page.wait_for_selector(".result", timeout=30000)
                cards = page.locator(".result")
                assert cards.count() == 6  # k defaults to 12; the index holds 6
                expected = [h["id"] for h in served["engine"].search_text(query, 6)]
                assert [cards.nth(i).get_attribute("data-id") for i in range(6)] == expected
                assert "6 results" in page.inner_text("#status")
                page.wait_for_function("() => [...document.querySelectorAll('.result img')]"
                                       ".every(img => img.complete && img.naturalWidth > 0)", timeout=30000)
                cards.nth(1).click()
                page.wait_for_selector("#player.open")
                src = page.eval_on_selector("#video", "v => v.src")
                assert src == url + f"video/{expected[1]}"
                # The browser fetched and decoded the clip's metadata (H.264 in mp4, via byte ranges).
                page.wait_for_function("() => document.getElementById('video').readyState >= 1", timeout=30000)
                assert page.eval_on_selector("#video", "v => v.duration") > 0
                page.click("#close")
                assert not page.is_visible("#player")
            finally:
                browser.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
