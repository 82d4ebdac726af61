"""The service's bounds on one frame and on all of them: pixel budget, decode memory budget,
image thread pool, queue deadline, format allow-list, bounded metric labels, token
redaction in the access log, whole-name category matching, text-only page."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from patchsearch.data import decode_cost_bytes, probe_frame
from patchsearch.service import inspect as inspect_module
from patchsearch.service import registry as registry_module
from patchsearch.service.app import PAGE, Settings, create_app
from patchsearch.service.limits import MIB, MemoryBudget
from patchsearch.service.registry import valid_category
from patchsearch.service.run import RedactToken, redact_query
from serve_support import PNG, make_site, zeros_png

INSPECT = "/v1/categories/widget/inspect"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("limits"))


@pytest.fixture
def make_client(site):
    made = []

    def make(**kw):
        c = TestClient(create_app(Settings(index_dir=site[1], data_root=site[0], **kw)))
        c.__enter__()
        deadline = time.time() + 60
        while c.get("/readyz").status_code != 200 and time.time() < deadline:
            time.sleep(0.05)
        made.append(c)
        return c

    yield make
    for c in made:
        c.__exit__(None, None, None)


@pytest.fixture
def decodes(monkeypatch):
    """Counts the frames decoded (and the most decoded at once), each decode held 0.2 s."""
    real, lock, state = inspect_module._prepare, threading.Lock(), {"calls": 0, "now": 0, "max": 0}

    def counting(*a, **k):
        with lock:
            state["calls"] += 1
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        try:
            time.sleep(state.get("hold", 0.0))
            return real(*a, **k)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(inspect_module, "_prepare", counting)
    return state


def test_a_frame_over_the_pixel_budget_is_refused_before_decoding(make_client, decodes):
    c = make_client()
    bomb = zeros_png(9900, 9900)  # 95 KB, 98 megapixels
    t0 = time.monotonic()
    r = c.post(INSPECT, content=bomb, headers=PNG)
    assert time.monotonic() - t0 < 2 and decodes["calls"] == 0
    assert r.status_code == 413 and r.json()["error"] == "frame_too_large"
    assert "9900x9900" in r.json()["message"] and "--max-pixels" in r.json()["message"]
    small = make_client(max_pixels=60 * 60)  # a budget below the 64 x 64 test frames
    assert small.post(INSPECT, content=zeros_png(64, 64), headers=PNG).status_code == 413
    assert 'patchsearch_rejected_total{reason="frame_too_large"} 1.0' in c.get("/metrics").text


def test_a_frame_whose_decode_exceeds_the_memory_budget_is_refused(make_client, decodes):
    c = make_client(decode_memory_mb=16)
    frame = zeros_png(2500, 2500, "RGB")
    assert decode_cost_bytes(probe_frame(frame)) > 16 * MIB
    r = c.post(INSPECT, content=frame, headers=PNG)
    assert r.status_code == 413 and "--decode-memory-mb" in r.json()["message"] and decodes["calls"] == 0


def test_the_decode_budget_and_the_image_pool_bound_concurrent_decodes(site, make_client, decodes):
    data = (site[0] / "widget/test/good/000.png").read_bytes()
    one = decode_cost_bytes(probe_frame(data))
    decodes["hold"] = 0.3
    tight = make_client(decode_memory_mb=1.5 * one / MIB, workers=8)  # room for one decode at a time
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(lambda _: tight.post(INSPECT, content=data, headers=PNG).status_code, range(4)))
    assert codes == [200] * 4 and decodes["max"] == 1
    decodes["max"] = 0
    pooled = make_client(decode_memory_mb=1024, workers=2)  # memory for all: the pool of 2 threads bounds
    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: pooled.post(INSPECT, content=data, headers=PNG).status_code, range(6)))
    assert codes == [200] * 6 and decodes["max"] == 2


def test_memory_budget_is_first_come_first_served():
    import asyncio

    async def run():
        budget, order = MemoryBudget(10), []
        assert await budget.acquire(8)

        async def want(name, n):
            assert await budget.acquire(n)
            order.append(name)

        big = asyncio.ensure_future(want("big", 10))
        await asyncio.sleep(0.01)
        small = asyncio.ensure_future(want("small", 1))  # would fit now, but waits behind "big"
        await asyncio.sleep(0.01)
        assert order == [] and budget.waiting == 2
        budget.release(8)
        await big
        assert order == ["big"] and not small.done()
        budget.release(10)
        await small
        assert order == ["big", "small"]
        assert not await budget.acquire(10, timeout=0.05) and budget.waiting == 0  # times out, leaves the queue

    asyncio.run(run())


def test_a_frame_still_queued_at_its_deadline_gets_503(site, make_client, monkeypatch):
    entered, gate, ran = threading.Event(), threading.Event(), []
    real = registry_module._run_batch

    def slow(jobs):
        ran.append(len(jobs))
        entered.set()
        gate.wait(20)
        real(jobs)

    monkeypatch.setattr(registry_module, "_run_batch", slow)
    c = make_client(max_batch=1, queue_timeout_s=0.5)
    data = (site[0] / "widget/test/good/000.png").read_bytes()
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(c.post, INSPECT, content=data, headers=PNG)
            assert entered.wait(20)
            t0 = time.monotonic()
            second = c.post(INSPECT, content=data, headers=PNG)  # waits behind the blocked batch
            waited = time.monotonic() - t0
            gate.set()
            assert first.result().status_code == 200
        assert second.status_code == 503 and second.json()["error"] == "queue_timeout"
        assert second.headers["retry-after"] == "1" and "--queue-timeout" in second.json()["message"]
        assert 0.4 < waited < 3 and ran == [1]  # the expired frame was never run
    finally:
        gate.set()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n"


def test_formats_off_the_allow_list_never_reach_their_decoder(site, make_client, monkeypatch):
    from PIL import EpsImagePlugin, GifImagePlugin, Image

    opened = []
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: opened.append("eps") or 1 / 0)
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_open", lambda self: opened.append("gif") or 1 / 0)
    c = make_client()
    import io

    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, format="GIF")
    for body, ctype, code in [(EPS, "image/png", "unsupported_format"),
                              (EPS, "application/octet-stream", "unsupported_format"),
                              (EPS, "image/x-eps", "unsupported_media_type"),
                              (EPS, "application/postscript", "unsupported_media_type"),
                              (gif.getvalue(), "image/png", "unsupported_format"),
                              (gif.getvalue(), "image/gif", "unsupported_media_type")]:
        r = c.post(INSPECT, content=body, headers={"content-type": ctype})
        assert (r.status_code, r.json()["error"]) == (415, code), (ctype, r.text)
    r = c.post(INSPECT, files={"file": ("frame.eps", EPS, "image/png")})
    assert r.status_code == 415 and "EPS" in r.json()["message"]
    assert opened == []
    from patchsearch.data import ALLOWED_FORMATS
    from patchsearch.service.bodies import FORMAT_TYPES

    assert set(FORMAT_TYPES) == set(ALLOWED_FORMATS)  # a content type for every allowed format, no other
    tiff = io.BytesIO()
    Image.open(site[0] / "widget/test/good/000.png").save(tiff, format="TIFF")
    assert c.post(INSPECT, content=tiff.getvalue(), headers={"content-type": "image/tiff"}).json()["decision"] == "OK"


def test_metric_labels_stay_bounded(make_client):
    c = make_client()
    size = len(c.get("/metrics").text)
    for i in range(200):
        c.request(f"M{i:04d}X", f"/nowhere/{i}")
        c.post(f"/v1/categories/cat{i}/inspect", content=b"x", headers=PNG)
    text = c.get("/metrics").text
    assert "M0000X" not in text and "cat1" not in text and "/nowhere" not in text
    assert len(text) < size + 6000


def test_token_redaction_decodes_parameter_names():
    for target in ("/?token=s3cret", "/?tok%65n=s3cret", "/?TOKEN=s3cret", "/?a=1&%74oken=s3cret&b=2",
                   "/?to+ken=x&token=s3cret", "/v1/categories?tok%2565n=s3cret&token=s3cret"):
        assert "s3cret" not in redact_query(target), target
    assert redact_query("/a?b=1&tokens=2") == "/a?b=1&tokens=2"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:1", "GET", "/?tok%65n=s3cret", "1.1", 200), None)
    RedactToken().filter(record)
    assert "s3cret" not in record.getMessage() and "tok%65n=***" in record.getMessage()


def test_category_names_match_whole(make_client):
    assert valid_category("widget") and not valid_category("widget\n") and not valid_category("a/b")
    c = make_client()
    r = c.post("/v1/categories/widget%0A/inspect", content=b"x", headers=PNG)
    assert r.status_code == 400 and r.json()["error"] == "bad_category"


def test_the_page_inserts_text_never_markup():
    page = PAGE.read_text(encoding="utf-8")
    assert "innerHTML" not in page and "insertAdjacentHTML" not in page and "outerHTML" not in page
    assert "document.write" not in page


def test_an_idle_batcher_keeps_nothing_of_its_last_batch():
    import gc
    import weakref

    from patchsearch.batcher import Batcher

    class Payload:
        pass

    def run(jobs):
        for j in jobs:
            j.future.set_result(Payload())

    b = Batcher(run, max_batch=2, max_wait_s=0.0, max_queue=4)
    try:
        payload = Payload()
        future = b.submit(payload)
        result = weakref.ref(future.result(5))
        sent = weakref.ref(payload)
        del payload, future
        time.sleep(0.3)  # the worker is back to waiting for jobs
        gc.collect()
        assert sent() is None and result() is None  # a frame's tensor and result are freed once answered
    finally:
        b.close()


def test_freed_memory_is_handed_back_once_the_service_is_idle(site, make_client, monkeypatch):
    import sys

    from patchsearch.service.limits import return_free_memory

    assert return_free_memory() is sys.platform.startswith("linux")
    trims = []
    monkeypatch.setattr(inspect_module, "return_free_memory", lambda: trims.append(1))
    c = make_client()
    assert c.post(INSPECT, content=(site[0] / "widget/test/good/000.png").read_bytes(), headers=PNG).status_code == 200
    deadline = time.time() + 5
    while not trims and time.time() < deadline:
        time.sleep(0.05)
    assert trims


def test_a_frame_with_unreadable_pixel_values_is_answered_error(make_client):
    import io

    import numpy as np
    from PIL import Image

    values = np.full((64, 64), 0.5, np.float32)
    values[10:20, 10:20] = np.nan
    buf = io.BytesIO()
    Image.fromarray(values, mode="F").save(buf, format="TIFF")
    r = make_client().post(INSPECT, content=buf.getvalue(), headers={"content-type": "image/tiff"})
    body = r.json()
    assert r.status_code == 200 and body["decision"] == "ERROR" and body["reason"] == "non_finite_pixels", body
    assert body["frame"] == {"width": 64, "height": 64} and body["error"]
