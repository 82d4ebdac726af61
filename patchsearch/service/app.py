"""The FastAPI application of ``patchsearch serve`` (:func:`create_app`).

Endpoints: ``POST /v1/categories/{category}/inspect``, ``GET /v1/categories``,
``GET /v1/categories/{category}/bank/{row}/patch.png``, ``GET /healthz``, ``GET /readyz``,
``GET /metrics``, ``GET /`` (the page) and the OpenAPI schema at ``/openapi.json``.
Every error is JSON ``{"error": code, "message": text}``. With a token, every endpoint
but ``/healthz`` needs ``Authorization: Bearer <token>`` (``GET /`` also takes
``?token=``, which the page then moves into that header). Request data is only ever
decoded as an image (PIL): nothing is unpickled or executed.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..batcher import Overloaded
from ..errors import InputError
from . import bodies
from .registry import Loaded, Registry, valid_category
from .schemas import Category, Error, Inspection
from .telemetry import Telemetry

PAGE = Path(__file__).with_name("page.html")


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
        max_batch, max_wait_ms, max_queue: dynamic batching (frames, milliseconds, frames).
        poll_s: how often every category's CURRENT is checked for a new version, seconds.
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


class ApiError(Exception):
    """An error answer: HTTP ``status``, ``code``, ``message`` (and optional headers)."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def _error(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status, headers=headers)


ERRORS = {s: {"model": Error} for s in (400, 401, 404, 413, 415, 503)}


def create_app(settings: Settings, registry: Registry | None = None) -> FastAPI:
    """The application; starts loading the categories (in the background) when it starts
    and stops the registry's threads when it shuts down."""
    telemetry = Telemetry()
    registry = registry or Registry(settings.index_dir, settings.device, settings.max_batch,
                                    settings.max_wait_ms / 1000.0, settings.max_queue,
                                    on_batch=telemetry.batch_size.observe,
                                    on_reload=lambda c, o: telemetry.reloads.labels(c, o).inc())
    limit = int(settings.max_body_mb * 1024 * 1024)

    async def lifespan(app):
        registry.start(settings.poll_s)
        yield
        await run_in_threadpool(registry.close)

    app = FastAPI(title="patchsearch", version=__import__("patchsearch").__version__, lifespan=lifespan,
                  description="PatchCore anomaly detection over FAISS memory banks: inspect frames, see why.")
    app.state.registry, app.state.telemetry, app.state.settings = registry, telemetry, settings
    telemetry.queue_depth = registry.queue_depth

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return _error(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return _error(400, "bad_request", f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):
        return _error(500, "internal", f"{type(exc).__name__}: the frame could not be judged ({exc})")

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        if settings.token and request.url.path != "/healthz" and not _authorized(request, settings.token):
            response = _error(401, "unauthorized", "this service needs 'Authorization: Bearer <token>'",
                              {"WWW-Authenticate": "Bearer"})
        else:
            response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        telemetry.observe(route, request.method, response.status_code, time.perf_counter() - start)
        return response

    def _acquire(category: str) -> Loaded:
        if not valid_category(category):
            raise ApiError(400, "bad_category", "category names are 1-64 of A-Z a-z 0-9 _ . - starting with a "
                                                "letter or digit")
        if not registry.ready.is_set():
            raise ApiError(503, "not_ready", "the service is still loading its indexes", {"Retry-After": "1"})
        loaded = registry.acquire(category)
        if loaded is None:
            known = ", ".join(sorted(registry.categories())) or "none"
            raise ApiError(404, "unknown_category", f"no index for category {category!r} (loaded: {known})")
        return loaded

    @app.post("/v1/categories/{category}/inspect", response_model=Inspection, response_model_exclude_none=True,
              responses=ERRORS, openapi_extra=bodies.OPENAPI_BODY)
    async def inspect(category: str, request: Request,
                      heatmap: Optional[Literal["png"]] = Query(None, description="png: add the heatmap")):
        """Judge one frame (raw image body, or multipart field ``file``)."""
        loaded = _acquire(category)
        try:
            data, name = await bodies.read_image(request, limit, ApiError)
            try:
                frame, tensor = await run_in_threadpool(_prepare, loaded, data, name)
            except InputError as exc:
                raise ApiError(400, "not_an_image", str(exc)) from None
            try:
                future = registry.submit(loaded, tensor, frame.size)
            except Overloaded as exc:
                telemetry.rejected.labels("overloaded").inc()
                raise ApiError(503, "overloaded", f"overloaded: {exc}; retry shortly", {"Retry-After": "1"}) from None
            loaded.acquire()  # the batch holds the version until it is done, even if the client leaves
            future.add_done_callback(lambda _: loaded.release())
            part = await asyncio.wrap_future(future)
            body = await run_in_threadpool(_answer, loaded, part, frame, name, heatmap == "png")
            telemetry.inspections.labels(category, body["decision"] or "uncalibrated").inc()
            return JSONResponse(body)
        finally:
            loaded.release()

    @app.get("/v1/categories", response_model=list[Category], responses=ERRORS)
    def categories():
        """Every loaded index: backbone, bank size, index type, build time, thresholds."""
        return [_describe(name, loaded) for name, loaded in sorted(registry.categories().items())]

    @app.get("/v1/categories/{category}/bank/{row}/patch.png", responses={**ERRORS, 200: {"content": {"image/png": {}}}},
             response_class=Response)
    def bank_patch(category: str, row: int, context: int = Query(1, ge=0, le=4)):
        """The training patch behind memory-bank ``row``, cut out of its training image
        (with ``context`` patch cells around it), as PNG."""
        from .patches import crop_training_patch

        loaded = _acquire(category)
        try:
            png, box = crop_training_patch(loaded, row, context, settings.data_root, ApiError)
        finally:
            loaded.release()
        return Response(png, media_type="image/png", headers={"X-Patch-Box": ",".join(map(str, box)),
                                                              "Cache-Control": "private, max-age=60"})

    @app.get("/healthz")
    def healthz():
        """The process is up (no token needed)."""
        return {"status": "ok"}

    @app.get("/readyz", responses=ERRORS)
    def readyz():
        """200 once the indexes found at start are loaded and at least one category answers."""
        loaded = registry.categories()
        if not registry.ready.is_set() or not loaded:
            return _error(503, "not_ready", "loading indexes" if not registry.ready.is_set() else
                          f"no index loaded from {settings.index_dir}")
        return {"status": "ready", "categories": {c: v.version for c, v in sorted(loaded.items())}}

    @app.get("/metrics", response_class=Response)
    def metrics():
        """Prometheus text format."""
        return Response(telemetry.render(), media_type=telemetry.content_type)

    @app.get("/", response_class=HTMLResponse)
    def page():
        """The inspection page."""
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    return app


def _authorized(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode(), token.encode()):
        return True
    if request.url.path == "/" and request.method == "GET":
        return hmac.compare_digest(request.query_params.get("token", "").encode(), token.encode())
    return False


def _prepare(loaded: Loaded, data: bytes, name: str):
    """Decode (as the CLI decodes files) and make the backbone input: (PIL RGB frame, (T, 3, th, tw))."""
    from ..data import decode_image

    frame = decode_image(data, loaded.bit_depth, name or "uploaded frame")
    return frame, loaded.geometry.frame_tensor(frame)


def _answer(loaded: Loaded, part, frame, name: str, heatmap: bool) -> dict:
    """The JSON answer for one searched frame: its anomaly map and regions are drawn here,
    in the request's thread (:func:`patchsearch.query.add_maps`)."""
    from ..query import add_maps
    from ..report import heatmap as render_heatmap, record

    add_maps(loaded.index, part, [frame.size])
    body = record(loaded.index, part, 0)  # part holds this one frame
    body.pop("path", None)
    body.update(category=loaded.category, version=loaded.version, name=name or None,
                frame={"width": frame.size[0], "height": frame.size[1]}, pixel_threshold=part.pixel_threshold)
    if body.get("image_score") is None and body["decision"] != "ERROR":
        body["decision"] = "ERROR"  # fail closed: a NaN score is never a verdict
        body["error"] = "the frame's score is not finite"
    if heatmap and body["decision"] != "ERROR":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(render_heatmap(loaded.index, part, 0, np.asarray(frame))).save(buf, format="PNG")
        body["heatmap_png"] = base64.b64encode(buf.getvalue()).decode("ascii")
    return {k: v for k, v in body.items() if v is not None or k in ("decision", "threshold", "version")}


def _describe(name: str, loaded: Loaded) -> dict:
    man, cal = loaded.index.manifest, loaded.index.manifest.calibration or {}
    return {"name": name, "version": loaded.version, "backbone": (man.backbone or {}).get("name"),
            "layers": (man.backbone or {}).get("layers"), "embedding_dim": loaded.index.dim,
            "bank_size": loaded.index.size, "index_type": loaded.index.index_type, "geometry": man.geometry,
            "created": man.created, "threshold": (cal.get("image") or {}).get("threshold"),
            "pixel_threshold": (cal.get("pixel") or {}).get("threshold")}
