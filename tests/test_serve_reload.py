"""Hot reload that never switches to a version the service cannot judge with: uncalibrated
versions are refused (the old one keeps answering), failed loads are retried with back-off,
and both are reported in /readyz, /v1/categories and /metrics."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from patchsearch.service import registry as registry_module
from patchsearch.service.app import Settings, create_app
from patchsearch.service.pending import backoff_s
from serve_support import PNG, copy_index, install_copy, make_site


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    return make_site(tmp_path_factory.mktemp("reload"))


@pytest.fixture
def idx(site, tmp_path):
    return copy_index(site[1] / "widget", tmp_path / "idx" / "widget").parent


def _wait(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def _client(idx, root):
    c = TestClient(create_app(Settings(index_dir=idx, data_root=root, poll_s=0.1)))
    c.__enter__()
    _wait(lambda: c.get("/readyz").status_code in (200, 503) and c.app.state.registry.ready.is_set())
    return c


def _inspect(c, root, name="blob/000.png"):
    return c.post("/v1/categories/widget/inspect", content=(root / "widget/test" / name).read_bytes(), headers=PNG)


def test_an_uncalibrated_version_is_not_switched_to(site, idx):
    root = site[0]
    c = _client(idx, root)
    try:
        assert c.get("/readyz").status_code == 200
        v1 = c.get("/readyz").json()["categories"]["widget"]
        v2 = install_copy(idx / "widget", calibrated=False)  # e.g. a rebuild that lost its thresholds
        _wait(lambda: c.get("/readyz").status_code == 503)
        ready = c.get("/readyz").json()
        assert ready["categories"] == {"widget": v1}  # still answering with v1
        problem = ready["not_ready"]["widget"]
        assert problem["reason"] == "uncalibrated" and problem["pending_version"] == v2 and v1 in problem["message"]
        cat = c.get("/v1/categories").json()[0]
        assert (cat["ready"], cat["version"], cat["pending_version"], cat["reason"]) == (False, v1, v2, "uncalibrated")
        assert cat["calibrated"] and cat["threshold"] > 0
        r = _inspect(c, root)
        assert r.status_code == 200 and r.json()["decision"] == "NG" and r.json()["version"] == v1
        metrics = c.get("/metrics").text
        assert 'patchsearch_reloads_total{category="widget",outcome="refused"} 1.0' in metrics
        assert 'patchsearch_category_ready{category="widget"} 0.0' in metrics
        v3 = install_copy(idx / "widget", calibration_of=v1)  # calibrated again: switched to
        _wait(lambda: c.get("/readyz").status_code == 200)
        assert c.get("/readyz").json()["categories"] == {"widget": v3}
        assert _inspect(c, root).json()["version"] == v3
    finally:
        c.__exit__(None, None, None)


def test_a_service_on_an_uncalibrated_index_answers_error_never_null(site, idx):
    root = site[0]
    install_copy(idx / "widget", calibrated=False)
    c = _client(idx, root)
    try:
        r = _inspect(c, root)
        body = r.json()
        assert r.status_code == 200 and body["decision"] == "ERROR" and body["reason"] == "uncalibrated"
        assert body["image_score"] > 0 and "calibrate" in body["error"]
        time.sleep(0.5)  # several reload passes later, still reported
        assert c.get("/readyz").status_code == 503
        assert c.get("/readyz").json()["not_ready"]["widget"]["reason"] == "uncalibrated"
        cat = c.get("/v1/categories").json()[0]
        assert cat["ready"] is False and cat["calibrated"] is False and cat["threshold"] is None
        assert 'decision="ERROR"' in c.get("/metrics").text
    finally:
        c.__exit__(None, None, None)


def test_a_failed_load_is_retried_with_back_off_and_reported(site, idx, monkeypatch):
    root = site[0]
    c = _client(idx, root)
    real, calls = registry_module.PatchIndex.load, []

    def flaky(path, *a, **k):
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise OSError(24, "Too many open files")
        return real(path, *a, **k)

    try:
        v1 = c.get("/readyz").json()["categories"]["widget"]
        monkeypatch.setattr(registry_module.PatchIndex, "load", flaky)
        v2 = install_copy(idx / "widget")
        _wait(lambda: calls)
        _wait(lambda: c.get("/readyz").status_code == 503)
        ready = c.get("/readyz").json()
        problem = ready["not_ready"]["widget"]
        assert ready["categories"] == {"widget": v1} and problem["reason"] == "load_failed"
        assert "Too many open files" in problem["message"] and problem["pending_version"] == v2
        assert problem["attempts"] >= 1 and problem["retry_in_s"] is not None
        assert 'patchsearch_reloads_total{category="widget",outcome="failed"}' in c.get("/metrics").text
        assert _inspect(c, root).json()["version"] == v1  # the old version keeps answering
        _wait(lambda: c.get("/readyz").status_code == 200, timeout=backoff_s(1) + backoff_s(2) + 10)
        assert c.get("/readyz").json()["categories"] == {"widget": v2} and len(calls) == 3
        assert calls[1] - calls[0] >= backoff_s(1) - 0.05 and calls[2] - calls[1] >= backoff_s(2) - 0.05
        assert _inspect(c, root).json()["version"] == v2
        assert 'patchsearch_category_ready{category="widget"} 1.0' in c.get("/metrics").text
    finally:
        c.__exit__(None, None, None)
