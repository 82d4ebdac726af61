"""The FastAPI application of ``patchsearch serve`` (:func:`create_app`).

Endpoints: ``POST /v1/categories/{category}/inspect``, ``GET /v1/categories``,
``GET /v1/categories/{category}/bank/{row}/patch.png``, ``GET|HEAD /healthz``,
``GET|HEAD /readyz``, ``GET /metrics``, ``GET /`` (the page) and the OpenAPI schema at
``/openapi.json`` (no ``/docs``: Swagger UI would load from a CDN). Every error is JSON
``{"error": code, "message": text}``. With a token, every endpoint but ``/healthz``
needs ``Authorization: Bearer <token>`` (``GET /`` also takes ``?token=``, which the
page then moves into that header). Request data is only ever decoded as an image of an
allowed format (PIL): nothing is unpickled or executed.

Health, readiness, metrics, the category list and the page are coroutines on the event
loop: they never wait for a thread, so image work cannot delay them. Image work (probe,
decode, maps, training-patch crops) runs in a bounded thread pool of its own
(:mod:`.inspect`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..data import DEFAULT_MAX_PIXELS
from . import bodies
from .guard import Guard
from .inspect import Inspector
from .registry import Registry
from .schemas import Category, Error, Inspection
from .telemetry import Telemetry

PAGE = Path(__file__).with_name("page.html")
log = logging.getLogger("patchsearch.serve")


@dataclass
class Settings:
    """How the service runs (the ``patchsearch serve`` options).

    Attributes:
        index_dir: the index directory (one sub-directory per category).
        data_root: the data root the training images live under (``<root>/<category>/...``),
            for the training-patch crops; None disables them (404).
        device: backbone device (``cpu``, ``cuda``, ``cuda:N``).
        token: bearer token required on every endpoint but /healthz, or None.
        max_body_mb: largest request body, MiB.
        max_batch, max_wait_ms: dynamic batching (frames, milliseconds).
        max_queue: inspect requests in the service at once (from their body to their
            answer); one more is refused with 503 before its body is read.
        poll_s: how often every category's CURRENT is checked for a new version, seconds.
        max_pixels: pixel budget of a frame (width x height, from its header); larger: 413.
        decode_memory_mb: memory all concurrent decodes may take together, MiB.
        workers: threads for image work (decode, maps); 0 = the CPU count, 2 to 8.
        queue_timeout_s: a frame must be in a backbone batch this many seconds after its
            body arrived, else 503.
        header_timeout_s, body_timeout_s: a request's headers, and then its body, must
            arrive within these many seconds (else 408 / closed).
        max_connections: open connections at most (one more evicts the longest idle).
        allowed_hosts: the Host names answered (None: any); ``serve`` sets the loopback
            names when bound to loopback.
    """

    index_dir: Path
    data_root: Optional[Path] = None
    device: str = "cpu"
    token: Optional[str] = None
    max_body_mb: float = 32.0
    max_batch: int = 8
    max_wait_ms: float = 5.0
    max_queue: int = 64
    poll_s: float = 1.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_memory_mb: float = 1024.0
    workers: int = 0
    queue_timeout_s: float = 10.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 256
    allowed_hosts: Optional[tuple] = None

    def image_workers(self) -> int:
        """Threads for image work: ``workers``, or the CPU count clamped to 2..8."""
        return self.workers if self.workers > 0 else max(2, min(8, os.cpu_count() or 2))


class ApiError(Exception):
    """An error answer: HTTP ``status``, ``code``, ``message`` (and optional headers)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status, headers=headers)


ERRORS = {s: {"model": Error} for s in (400, 401, 403, 404, 408, 413, 415, 421, 422, 503)}


def create_app(settings: Settings, registry: Registry | None = None) -> FastAPI:
    """The application; starts loading the categories (in the background) when it starts
    and stops the registry's threads when it shuts down."""
    telemetry = Telemetry()
    registry = registry or Registry(settings.index_dir, settings.device, settings.max_batch,
                                    settings.max_wait_ms / 1000.0, settings.max_queue,
                                    on_batch=telemetry.batch_size.observe,
                                    on_reload=lambda c, o: telemetry.reloads.labels(c, o).inc())
    inspector = Inspector(settings, registry, telemetry, ApiError)
    telemetry.queue_depth, telemetry.readiness.status = registry.queue_depth, registry.status
    telemetry.inflight, telemetry.decode_bytes = (lambda: inspector.admission.active), (lambda: inspector.budget.used)
    page_html = PAGE.read_text(encoding="utf-8")

    async def lifespan(app):
        registry.start(settings.poll_s)
        yield
        await run_in_threadpool(registry.close)

    app = FastAPI(title="patchsearch", version=__import__("patchsearch").__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="PatchCore anomaly detection over FAISS memory banks: inspect frames, see why.")
    app.state.registry, app.state.telemetry, app.state.settings = registry, telemetry, settings
    app.state.inspector = inspector
    app.add_middleware(Guard, telemetry=telemetry, token=settings.token, allowed_hosts=settings.allowed_hosts)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(400, "bad_request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        return _error(500, "internal", f"{type(exc).__name__}: the frame could not be judged ({exc})")

    @app.post("/v1/categories/{category}/inspect", response_model=Inspection, response_model_exclude_none=True,
              responses=ERRORS, openapi_extra=bodies.OPENAPI_BODY)
    async def inspect(category: str, request: Request,
                      heatmap: Optional[Literal["png"]] = Query(None, description="png: add the heatmap")):
        """Judge one frame (raw image body, or multipart field ``file``)."""
        return await inspector(category, request, heatmap == "png")

    @app.get("/v1/categories", response_model=list[Category], responses=ERRORS)
    async def categories():
        """Every category: the version answering (backbone, bank size, index type, build
        time, thresholds), whether it is ready and, if not, why."""
        status = registry.status()
        loaded = registry.categories()
        return [_describe(name, loaded.get(name), status[name]) for name in sorted(status)]

    @app.get("/v1/categories/{category}/bank/{row}/patch.png", response_class=Response,
             responses={**ERRORS, 200: {"content": {"image/png": {}}}})
    async def bank_patch(category: str, row: int, context: int = Query(1, ge=0, le=4)):
        """The training patch behind memory-bank ``row``, cut out of its training image
        (with ``context`` patch cells around it), as PNG."""
        from .patches import crop_training_patch

        inspector.check_category(category)
        loaded = registry.acquire(category)
        if loaded is None:
            raise ApiError(404, "unknown_category", f"no index for category {category!r}")
        try:
            png, box = await anyio.to_thread.run_sync(crop_training_patch, loaded, row, context, settings.data_root,
                                                      ApiError, limiter=inspector.work)
        finally:
            loaded.release()
        return Response(png, media_type="image/png", headers={"X-Patch-Box": ",".join(map(str, box)),
                                                              "Cache-Control": "private, max-age=60"})

    @app.get("/healthz")
    async def healthz():
        """The process is up (no token needed; HEAD too)."""
        return {"status": "ok"}

    @app.get("/readyz", responses=ERRORS)
    async def readyz(category: Optional[str] = Query(None, description="ask about this category only")):
        """200 once every category (or ``category``) answers with its current, calibrated
        version; 503 with the reasons otherwise (``not_ready``)."""
        if not registry.ready.is_set():
            return _error(503, "not_ready", "loading indexes", {"Retry-After": "1"})
        status = registry.status()
        if category is not None:
            if category not in status:
                return _error(404, "unknown_category", f"no category {category!r} in {settings.index_dir}")
            status = {category: status[category]}
        serving = {c: s["version"] for c, s in status.items() if s["version"] is not None}
        problems = {c: {k: v for k, v in s.items() if k != "ready"} for c, s in status.items() if not s["ready"]}
        if not serving or problems:
            message = (f"no index loaded from {settings.index_dir}" if not status else
                       "; ".join(f"{c}: {p.get('reason')}: {p.get('message')}" for c, p in problems.items())
                       or "no category answers")
            return JSONResponse({"error": "not_ready", "message": message, "status": "not_ready",
                                 "categories": serving, "not_ready": problems}, 503)
        return {"status": "ready", "categories": serving}

    app.head("/healthz", include_in_schema=False)(healthz)  # probes that only look at the status
    app.head("/readyz", include_in_schema=False)(readyz)

    @app.get("/metrics", response_class=Response)
    async def metrics():
        """Prometheus text format."""
        return Response(telemetry.render(), media_type=telemetry.content_type)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        """The inspection page."""
        return HTMLResponse(page_html)

    return app


def _describe(name: str, loaded, status: dict) -> dict:
    out = {"name": name, "ready": status["ready"], "reason": status.get("reason"), "message": status.get("message"),
           "pending_version": status.get("pending_version"), "version": None, "calibrated": False}
    if loaded is None:
        return out
    man, cal = loaded.index.manifest, loaded.index.manifest.calibration or {}
    out.update({"version": loaded.version, "calibrated": loaded.judgeable, "backbone": (man.backbone or {}).get("name"),
                "layers": (man.backbone or {}).get("layers"), "embedding_dim": loaded.index.dim,
                "bank_size": loaded.index.size, "index_type": loaded.index.index_type, "geometry": man.geometry,
                "created": man.created, "threshold": (cal.get("image") or {}).get("threshold"),
                "pixel_threshold": (cal.get("pixel") or {}).get("threshold")})
    return out
