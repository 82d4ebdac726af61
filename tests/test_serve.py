"""patchsearch serve: the HTTP service (TestClient for most, a real uvicorn process for
end to end: readiness, concurrency and batching, a rebuild under load, SIGTERM, the page in
Chromium). Everything binds 127.0.0.1 only; load is bounded in count and time."""

from __future__ import annotations

import base64
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from conftest import make_mvtec
from patchsearch import PatchIndex
from patchsearch.batcher import Batcher, Overloaded
from patchsearch.data import decode_image, load_image, train_images
from patchsearch.pipeline import build
from patchsearch.query import add_maps, embedder_for, geometry_of, judge, query
from patchsearch.report import patch_box
from patchsearch.service import registry as registry_module
from patchsearch.service.app import Settings, create_app

REPO = Path(__file__).resolve().parents[1]
PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A data root with category 'widget' and an index directory holding it as 'widget'
    and, copied, as 'gadget' (the same backbone: one embedder for both)."""
    base = tmp_path_factory.mktemp("serve")
    root = make_mvtec(base / "mvtec", "widget", n_train=6, n_good=2, n_bad=2)
    build(train_images(root, "widget"), base / "idx" / "widget", category="widget", data_root=root / "widget",
          resize=64, coreset_ratio=0.25, batch_size=4)
    shutil.copytree(base / "idx" / "widget", base / "idx" / "gadget", ignore=shutil.ignore_patterns("leases", "LOCK"))
    return root, base / "idx"


def _ready(get, timeout=60.0, headers=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if get("/readyz", headers=headers).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the service did not become ready")


def _client(settings):
    client = TestClient(create_app(settings))
    client.__enter__()
    _ready(client.get, headers={"Authorization": f"Bearer {settings.token}"} if settings.token else None)
    return client


@pytest.fixture(scope="module")
def client(site):
    root, idx = site
    c = _client(Settings(index_dir=idx, data_root=root, max_body_mb=0.05))
    yield c
    c.__exit__(None, None, None)


def test_inspect_answers_what_the_library_answers(site, client):
    root, idx = site
    paths = [root / "widget/test/good/000.png", root / "widget/test/blob/000.png"]
    index = PatchIndex.load(idx / "widget")
    lib = query(index, paths)
    got = [client.post("/v1/categories/widget/inspect", content=paths[0].read_bytes(), headers=PNG),
           client.post("/v1/categories/widget/inspect?heatmap=png",
                       files={"file": ("blob.png", paths[1].read_bytes(), "image/png")})]
    for i, r in enumerate(got):
        assert r.status_code == 200, r.text
        body = r.json()
        top = int(lib.top_patches[i])
        assert body["image_score"] == pytest.approx(float(lib.image_scores[i]), rel=1e-5)
        assert body["decision"] == str(lib.decisions[i]) and body["threshold"] == pytest.approx(lib.threshold)
        assert body["normalized_score"] == pytest.approx(lib.image_scores[i] / lib.threshold, rel=1e-5)
        assert body["locations"] == [int(x) for x in lib.locations[i, top]]
        np.testing.assert_allclose(body["distances"], lib.distances[i, top], rtol=1e-5)
        assert body["neighbours"] == index.describe_locations(lib.locations[i, top])
        assert [g["bbox"] for g in body["regions"]] == [g["bbox"] for g in lib.regions[i]]
        assert body["version"] == index.version and body["frame"] == {"width": 64, "height": 64}
    assert [r.json()["decision"] for r in got] == ["OK", "NG"] and got[1].json()["name"] == "blob.png"
    heat = Image.open(io.BytesIO(base64.b64decode(got[1].json()["heatmap_png"])))
    assert heat.size == (64, 64) and "heatmap_png" not in got[0].json()
    index.close()


def test_maps_drawn_per_frame_after_a_batched_search_equal_judge(site):
    """The service searches a batch without maps, then each request draws its own frame's
    map and regions (query.add_maps on SearchResult.frame): the same as judge with maps."""
    root, idx = site
    index = PatchIndex.load(idx / "widget")
    frames = [load_image(root / "widget/test/good/000.png"), load_image(root / "widget/test/blob/000.png")]
    geometry = geometry_of(index)
    emb = embedder_for(index)(torch.cat([geometry.frame_tensor(f) for f in frames])).numpy()
    sizes = [f.size for f in frames]
    whole = judge(index, emb, sizes)
    searched = judge(index, emb, sizes, maps=False, regions=False)  # what a service batch does
    assert searched.anomaly_maps is None and searched.regions is None
    for i in range(len(frames)):
        one = add_maps(index, searched.frame(i), [sizes[i]])
        assert np.array_equal(one.anomaly_maps[0], whole.anomaly_maps[i])
        assert one.regions[0] == whole.regions[i] and one.decisions[0] == whole.decisions[i]
        assert np.array_equal(one.distances[0], whole.distances[i])
    assert whole.regions[1] and not whole.regions[0]  # the blob frame has a region, the good one none
    index.close()


def test_decode_image_equals_load_image(site):
    root, _ = site
    path = root / "widget/test/blob/000.png"
    assert np.array_equal(np.asarray(decode_image(path.read_bytes())), np.asarray(load_image(path)))


def test_categories_health_metrics_schema(site, client):
    cats = client.get("/v1/categories").json()
    assert [c["name"] for c in cats] == ["gadget", "widget"]
    w = cats[1]
    assert w["backbone"] == "efficientnet_lite1" and w["bank_size"] == 48 and w["index_type"] == "flat"
    assert w["threshold"] > 0 and w["created"] and w["version"] == "v000001"
    assert len(client.app.state.registry._embedders) == 1  # one backbone for both categories
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["categories"] == {"gadget": "v000001", "widget": "v000001"}
    data = (site[0] / "widget/test/blob/001.png").read_bytes()
    assert client.post("/v1/categories/gadget/inspect", content=data, headers=PNG).json()["decision"] == "NG"
    text = client.get("/metrics").text
    assert 'patchsearch_inspections_total{category="gadget",decision="NG"}' in text
    assert 'patchsearch_request_seconds_bucket{le="0.005",method="POST",route="/v1/categories/{category}/inspect"}' in text
    assert "patchsearch_batch_size_count" in text and 'patchsearch_reloads_total{category="widget",outcome="loaded"} 1.0' in text
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/categories/{category}/inspect"]["post"]["requestBody"]["content"]
    assert {"image/png", "application/octet-stream", "multipart/form-data"} <= set(body)


def test_bad_requests_get_a_json_4xx_and_the_service_keeps_serving(site, client):
    root, _ = site
    png = (root / "widget/test/good/000.png").read_bytes()
    inspect = "/v1/categories/widget/inspect"
    cases = [
        (client.post(inspect, content=b"these are not image bytes", headers=PNG), 415, "unsupported_format"),
        (client.post(inspect, content=png[: len(png) // 2], headers=PNG), 400, "not_an_image"),  # truncated
        (client.post(inspect, content=b"", headers=PNG), 400, "empty_body"),
        (client.post(inspect, content=os.urandom(60_000), headers=PNG), 413, "body_too_large"),  # limit 0.05 MiB
        (client.post(inspect, content=png, headers={"content-type": "text/plain"}), 415, "unsupported_media_type"),
        (client.post(inspect, content=png, headers={"content-type": "application/x-www-form-urlencoded"}), 415,
         "unsupported_media_type"),
        (client.post(inspect, files={"other": ("a.png", png, "image/png")}), 400, "no_file"),
        (client.post("/v1/categories/nosuch/inspect", content=png, headers=PNG), 404, "unknown_category"),
        (client.post("/v1/categories/..%2F..%2Fetc/inspect", content=png, headers=PNG), 404, "not_found"),  # no route
        (client.post("/v1/categories/%2E%2E/inspect", content=png, headers=PNG), 400, "bad_category"),
        (client.post("/v1/categories/.hidden/inspect", content=png, headers=PNG), 400, "bad_category"),
        (client.post(inspect + "?heatmap=jpeg", content=png, headers=PNG), 400, "bad_request"),
        (client.get("/v1/categories/widget/bank/100000/patch.png"), 404, "no_such_row"),
        (client.get("/nowhere"), 404, "not_found"),
    ]
    tiny = io.BytesIO()
    Image.new("RGB", (8, 8)).save(tiny, format="PNG")
    cases.append((client.post(inspect, content=tiny.getvalue(), headers=PNG), 400, "not_an_image"))
    for r, status, code in cases:
        assert (r.status_code, r.json()["error"]) == (status, code), r.text
        assert r.json()["message"]
    assert "truncated" in cases[1][0].json()["message"] or "decode" in cases[1][0].json()["message"]
    assert client.post(inspect, content=png, headers=PNG).json()["decision"] == "OK"


def test_bank_patch_is_cut_from_the_training_image(site, client, tmp_path):
    root, idx = site
    body = client.post("/v1/categories/widget/inspect", content=(root / "widget/test/blob/000.png").read_bytes(),
                       headers=PNG).json()
    nb = body["neighbours"][0]
    r = client.get(f"/v1/categories/widget/bank/{nb['bank_row']}/patch.png?context=0")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    frame = load_image(root / "widget" / nb["image"])
    index = PatchIndex.load(idx / "widget")
    box = patch_box(geometry_of(index), index.manifest.grid, frame.size, nb["tile"], nb["row"], nb["col"], 0)
    index.close()
    assert r.headers["x-patch-box"] == ",".join(map(str, box)) and box[2] - box[0] == 8  # one 8-px cell of 64 px
    shown = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    np.testing.assert_array_equal(shown[::12, ::12], np.asarray(frame.crop(box)))  # scaled up 12x, nearest
    other = _client(Settings(index_dir=idx, data_root=tmp_path))  # training images not there
    try:
        r = other.get(f"/v1/categories/widget/bank/{nb['bank_row']}/patch.png")
        assert r.status_code == 404 and r.json()["error"] == "image_missing"
    finally:
        other.__exit__(None, None, None)


def test_token_guards_every_endpoint_but_healthz(site):
    root, idx = site
    c = _client(Settings(index_dir=idx, data_root=root, token="s3cret"))
    try:
        assert c.get("/healthz").status_code == 200
        for path in ("/readyz", "/metrics", "/v1/categories", "/", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized" and r.headers["www-authenticate"] == "Bearer"
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200
        png = (root / "widget/test/good/000.png").read_bytes()
        assert c.post("/v1/categories/widget/inspect", content=png, headers=PNG).status_code == 401
        assert c.post("/v1/categories/widget/inspect", content=png,
                      headers={**PNG, "Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/?token=s3cret").status_code == 200  # the page only; the API needs the header
        assert c.get("/v1/categories?token=s3cret").status_code == 401
    finally:
        c.__exit__(None, None, None)


def test_batcher_gathers_concurrent_jobs_and_refuses_beyond_its_queue():
    sizes, gate = [], threading.Event()

    def run(jobs):
        gate.wait(5)
        sizes.append(len(jobs))
        for j in jobs:
            j.future.set_result(j.payload * 2)

    b = Batcher(run, max_batch=4, max_wait_s=0.05, max_queue=6)
    futures = [b.submit(i) for i in range(6)]  # first batch taken, its run blocked; the rest queue
    time.sleep(0.2)
    more = [b.submit(i) for i in range(6, 6 + (6 - b.depth))]
    with pytest.raises(Overloaded):
        b.submit(99)
    gate.set()
    assert [f.result(5) for f in futures + more] == [2 * i for i in range(len(futures + more))]
    assert max(sizes) == 4 and sum(sizes) == len(futures + more)
    b.close()


def test_overloaded_service_answers_503_with_retry_after(site, monkeypatch):
    root, idx = site
    entered, gate = threading.Event(), threading.Event()
    real = registry_module._run_batch

    def slow(jobs):
        entered.set()
        gate.wait(10)
        real(jobs)

    monkeypatch.setattr(registry_module, "_run_batch", slow)
    c = _client(Settings(index_dir=idx, data_root=root, max_batch=1, max_queue=2))
    try:
        png = (root / "widget/test/good/000.png").read_bytes()
        post = lambda: c.post("/v1/categories/widget/inspect", content=png, headers=PNG)  # noqa: E731
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post)
            assert entered.wait(10)  # taken by the worker, blocked
            second = pool.submit(post)  # waits in the queue: the second of 2 places in the service
            deadline = time.time() + 10
            while c.app.state.registry.queue_depth() < 1 and time.time() < deadline:
                time.sleep(0.01)
            third = post()
            gate.set()
            assert third.status_code == 503 and third.headers["retry-after"] == "1"
            assert third.json()["error"] == "queue_full" and "--max-queue" in third.json()["message"]
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert 'patchsearch_rejected_total{reason="queue_full"} 1.0' in c.get("/metrics").text
    finally:
        gate.set()
        c.__exit__(None, None, None)


def test_import_patchsearch_imports_no_web_stack():
    code = ("import sys, patchsearch, patchsearch.cli, patchsearch.query\n"
            "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'prometheus_client', 'ray') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# -- a real server process ---------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(site, tmp_path_factory):
    """``patchsearch serve`` in a subprocess on a loopback port; yields (base URL, process)."""
    root, idx = site
    idx2 = tmp_path_factory.mktemp("served") / "idx"  # its own copy: the tests rebuild it
    shutil.copytree(idx / "widget", idx2 / "widget", ignore=shutil.ignore_patterns("leases", "LOCK"))
    port = _free_port()
    log = open(idx2.parent / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", "from patchsearch.cli import main; main()", "serve",
                             "--index-dir", str(idx2), "--data-root", str(root), "--port", str(port),
                             "--poll", "0.2", "--max-batch", "8", "--max-wait-ms", "10", "--log-level", "info"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=base, timeout=10) as c:
            _ready(c.get, 90)
        yield base, proc, idx2, idx2.parent / "server.log"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def test_server_concurrency_batching_and_hot_reload_under_load(site, server):
    from patchsearch.calibrate import calibrate
    from patchsearch.pipeline import rebuild
    from patchsearch.versions import list_versions, tidy

    root, _ = site
    base, proc, idx, _ = server
    paths = sorted((root / "widget/test").glob("*/*.png"))
    index = PatchIndex.load(idx / "widget")
    frames = list(zip([p.read_bytes() for p in paths], query(index, paths).decisions))  # the library's verdicts
    index.close()
    with httpx.Client(base_url=base, timeout=60) as c:
        def one(i):
            data, expected = frames[i % len(frames)]
            r = c.post("/v1/categories/widget/inspect", content=data, headers=PNG)
            return r.status_code, r.json().get("decision"), expected, r.json().get("version")

        with ThreadPoolExecutor(16) as pool:  # 16 clients at once
            results = list(pool.map(one, range(48)))
        assert all(s == 200 and d == e for s, d, e, _ in results), results
        metrics = c.get("/metrics").text
        batches = float(metrics.split("patchsearch_batch_size_count ")[1].split()[0])
        assert batches < 48  # some backbone batches held several frames

        stop, seen = threading.Event(), []

        def hammer():
            i = 0
            while not stop.is_set() and i < 400:
                seen.append(one(i))
                i += 1

        threads = [threading.Thread(target=hammer) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            rebuild(idx / "widget")  # v000002, same memory bank and thresholds
            calibrate(idx / "widget", sorted((root / "widget/test/good").glob("*.png"))).close()  # v000003
            deadline = time.time() + 30
            while c.get("/readyz").json()["categories"]["widget"] != "v000003" and time.time() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # requests keep coming on the new version
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert c.get("/v1/categories").json()[0]["version"] == "v000003"
        assert seen and all(s == 200 and d in ("OK", "NG") for s, d, _, _ in seen), [x for x in seen if x[0] != 200]
        assert {v for *_, v in seen} >= {"v000001", "v000003"}
        assert 'patchsearch_reloads_total{category="widget",outcome="loaded"} 3.0' in c.get("/metrics").text
        tidy(idx / "widget")  # the service released the old versions' leases: they can go
        assert list_versions(idx / "widget") == ["v000003"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_page_in_headless_chromium_shows_verdict_and_nearest_patches(site, server, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the page was not tested in a browser")
    root, _ = site
    base, *_ = server
    frame = base64.b64encode((root / "widget/test/blob/000.png").read_bytes()).decode()
    url = f"{base}/?category=widget&frame=" + urllib.parse.quote(f"data:image/png;base64,{frame}", safe="")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=30000", "--window-size=1280,900"]
    dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'id="verdict" data-decision="NG" class="NG">NG<' in dom, dom[dom.find('<body'):dom.find('<script')]
    assert 'data-state="done"' in dom and dom.count('data-loaded="1"') == 9  # the 9 nearest training patches
    assert "vs threshold" in dom and 'id="heatmap" alt="" src="data:image/png;base64,' in dom
    shot = tmp_path / "serve_page.png"
    subprocess.run(flags + [f"--screenshot={shot}", url], capture_output=True, timeout=120)
    assert shot.is_file() and Image.open(shot).size == (1280, 900)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert (np.abs(pixels.astype(int) - (185, 28, 28)).sum(axis=2) < 30).sum() > 200  # the red NG verdict is drawn
    if os.environ.get("PATCHSEARCH_ARTIFACTS"):
        out = Path(os.environ["PATCHSEARCH_ARTIFACTS"])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, out / shot.name)


def test_server_shuts_down_cleanly_on_sigterm(server):
    base, proc, idx, log = server
    with httpx.Client(base_url=base, timeout=10) as c:
        assert c.get("/healthz").status_code == 200
    proc.send_signal(signal.SIGTERM)
    # uvicorn shuts down gracefully, then re-raises the signal so the parent sees how it ended
    assert proc.wait(30) in (0, -signal.SIGTERM)
    text = log.read_text()
    assert "Application shutdown complete" in text and "Traceback" not in text
    assert "closed widget v000003" in text  # the registry closed the index, releasing its lease
