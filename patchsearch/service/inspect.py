"""One inspect request, from admission to its JSON answer, within the service's bounds.

In order: the category must be known; the content type on the allow-list and the
declared length within ``--max-body-mb`` (else 415 / 413, nothing read); the request
must be admitted (at most ``--max-queue`` in the service, else 503 + Retry-After, body
unread); its body must arrive within ``--body-timeout`` (else 408); only then is the
category's version leased. The frame's header is probed (format allow-list, pixel
budget ``--max-pixels``: 415 / 413 before any pixel is decoded); its decode cost must
fit the decode memory budget (``--decode-memory-mb``: 413 if it never can, 503 if the
budget is not free by the frame's deadline); it is decoded in the image thread pool
(``--workers``), queued for a backbone batch, and must leave the queue by its deadline
(``--queue-timeout`` from when its body arrived: 503). The answer (map, regions) is
drawn in the image thread pool too; nothing of this runs on the event loop, which
keeps health checks prompt.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import anyio
from starlette.responses import JSONResponse, Response

from ..batcher import Expired, Overloaded
from ..errors import FrameTooLargeError, InputError, UnsupportedFormatError
from ..frames import PixelValueError, error_reason
from . import bodies
from .limits import MIB, Admission, MemoryBudget, answer_cost, background_thread, return_free_memory
from .registry import valid_category

log = logging.getLogger("patchsearch.serve")
RETRY = {"Retry-After": "1"}
TRIM_EVERY_S = 2.0
CLIENT_CLOSED = 499  # nginx's "client closed request": logged and counted, never sent


class Inspector:
    """The inspect pipeline of one application (``settings``: :class:`~.app.Settings`)."""

    def __init__(self, settings, registry, telemetry, error):
        self.settings, self.registry, self.telemetry, self.error = settings, registry, telemetry, error
        self.limit = int(settings.max_body_mb * MIB)
        self.admission = Admission(settings.max_queue)
        self.budget = MemoryBudget(int(settings.decode_memory_mb * MIB))
        self.work = anyio.CapacityLimiter(settings.image_workers())
        self.probes = anyio.CapacityLimiter(2)  # header probes never wait behind decodes
        self._trimmed = 0.0

    def check_category(self, category: str) -> None:
        if not valid_category(category):
            raise self.error(400, "bad_category", "category names are 1-64 of A-Z a-z 0-9 _ . - starting with a "
                                                  "letter or digit")
        if not self.registry.ready.is_set():
            raise self.error(503, "not_ready", "the service is still loading its indexes", RETRY)
        if category not in self.registry.categories():
            known = ", ".join(sorted(self.registry.categories())) or "none"
            raise self.error(404, "unknown_category", f"no index for category {category!r} (loaded: {known})")

    def refuse(self, reason: str, status: int, message: str, headers=None):
        self.telemetry.reject(reason)
        return self.error(status, reason, message, headers)

    async def __call__(self, category: str, request, heatmap: bool) -> Response:
        self.check_category(category)
        bodies.check_type(request, self.limit, self.error)
        if not self.admission.try_enter():
            raise self.refuse("queue_full", 503, f"{self.admission.limit} frames are already in the service "
                                                 f"(--max-queue); retry shortly", RETRY)
        try:
            try:
                data, name = await bodies.read_image(request, self.limit, self.error, self.settings.body_timeout_s)
            except bodies.Disconnected as exc:
                log.info("inspect %s: %s", category, exc)  # one line: nobody is left to answer
                return Response(status_code=CLIENT_CLOSED)
            deadline = time.monotonic() + self.settings.queue_timeout_s
            loaded = self.registry.acquire(category)  # leased only now that the body is here
            if loaded is None:
                raise self.error(404, "unknown_category", f"no index for category {category!r}")
            try:
                body = await self._judge(loaded, data, name, heatmap, deadline)
            finally:
                loaded.release()
        finally:
            self.admission.leave()
            self._trim_when_idle()
        self.telemetry.judged(category, body["decision"])
        return JSONResponse(body)

    def _trim_when_idle(self) -> None:
        """Once the last frame in the service is done (at most every TRIM_EVERY_S), return the
        memory its decodes freed to the operating system, in a thread."""
        now = time.monotonic()
        if self.admission.active == 0 and now - self._trimmed > TRIM_EVERY_S:
            self._trimmed = now
            threading.Thread(target=return_free_memory, name="patchsearch-trim", daemon=True).start()

    async def _judge(self, loaded, data: bytes, name: str, heatmap: bool, deadline: float) -> dict:
        from ..data import decode_cost_bytes, probe_frame

        shown = name or "uploaded frame"
        try:
            info = await anyio.to_thread.run_sync(probe_frame, data, self.settings.max_pixels, shown,
                                                  limiter=self.probes)
        except FrameTooLargeError as exc:
            size = f"is {exc.width}x{exc.height} = {exc.width * exc.height} pixels" if exc.width else "has more pixels"
            raise self.refuse("frame_too_large", 413, f"{shown}: the frame {size}, over the limit of "
                                                      f"{self.settings.max_pixels} pixels (--max-pixels)") from None
        except UnsupportedFormatError as exc:
            raise self.refuse("unsupported_format", 415, str(exc)) from None
        except InputError as exc:
            raise self.error(400, "not_an_image", str(exc)) from None
        # the heatmap needs the whole frame decoded again, and a map at its size; the verdict
        # needs only the frame reduced for the backbone (patchsearch.frames.prepare_frame)
        cost = decode_cost_bytes(info, None if heatmap else loaded.geometry)
        if heatmap:
            cost += answer_cost(info.width, info.height)
        if cost > self.budget.total:
            raise self.refuse("frame_too_large", 413, f"{shown}: decoding this {info.width}x{info.height} {info.mode} "
                                                      f"{info.format} frame{' with its heatmap' if heatmap else ''} "
                                                      f"needs about {cost / MIB:.0f} MiB, over the decode memory "
                                                      f"budget of {self.budget.total / MIB:.0f} MiB "
                                                      f"(--decode-memory-mb)")
        if not await self.budget.acquire(cost, max(0.0, deadline - time.monotonic())):
            raise self.refuse("memory_timeout", 503, "the decode memory budget stayed in use until this frame's "
                                                     "deadline (--queue-timeout); retry shortly", RETRY)
        held = cost
        try:
            try:
                tensor, size = await anyio.to_thread.run_sync(_prepare, loaded, data, shown,
                                                              self.settings.max_pixels, limiter=self.work)
            except PixelValueError as exc:  # decodable, but its values cannot be judged: ERROR, never OK
                return _unjudged(loaded, name, info, error_reason(exc), str(exc))
            except InputError as exc:
                raise self.error(400, "not_an_image", str(exc)) from None
            if not heatmap:  # the rest works at the backbone input's resolution
                self.budget.release(held)
                held = 0
            part = await self._search(loaded, tensor, size, deadline)
            del tensor
            return await anyio.to_thread.run_sync(_answer, loaded, part, data, size, name, heatmap,
                                                  self.settings.max_pixels, limiter=self.work)
        finally:
            if held:
                self.budget.release(held)

    async def _search(self, loaded, tensor, size, deadline: float):
        """The frame's SearchResult from a backbone batch; 503 past the deadline in the queue."""
        try:
            future = self.registry.submit(loaded, tensor, size, deadline)
        except Overloaded as exc:
            raise self.refuse("overloaded", 503, f"overloaded: {exc}; retry shortly", RETRY) from None
        loaded.acquire()  # the batch holds the version until it is done, even if the client leaves
        future.add_done_callback(lambda _: loaded.release())
        waiting = asyncio.wrap_future(future)
        try:
            try:
                return await asyncio.wait_for(asyncio.shield(waiting), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                if future.cancel():  # still queued: dropped, never run
                    raise Expired("not taken into a batch by its deadline") from None
                return await waiting  # its batch is running: the answer is moments away
        except Expired as exc:
            raise self.refuse("queue_timeout", 503, f"the frame {exc} ({self.settings.queue_timeout_s:g} s, "
                                                    f"--queue-timeout); retry shortly", RETRY) from None
        except Overloaded as exc:
            raise self.refuse("overloaded", 503, f"overloaded: {exc}; retry shortly", RETRY) from None
        except InputError as exc:
            raise self.error(422, "cannot_judge", str(exc)) from None


def _prepare(loaded, data: bytes, name: str, max_pixels: int):
    """The backbone input of a frame, decoded as the CLI decodes files, in bounded memory:
    ((T, 3, th, tw) float32 tensor, (width, height) of the frame)."""
    from ..frames import prepare_frame

    background_thread()
    return prepare_frame(data, loaded.geometry, loaded.bit_depth, max_pixels, name)


def _unjudged(loaded, name: str, info, reason: str, message: str) -> dict:
    """The answer for a frame that decodes but cannot be judged (e.g. NaN pixel values)."""
    calibration = loaded.index.manifest.calibration or {}
    return {"category": loaded.category, "version": loaded.version, "name": name or None,
            "frame": {"width": info.width, "height": info.height}, "decision": "ERROR", "reason": reason,
            "error": message, "threshold": (calibration.get("image") or {}).get("threshold")}


def _answer(loaded, part, data: bytes, size, name: str, heatmap: bool, max_pixels: int) -> dict:
    """The JSON answer for one searched frame: its regions (and with ``heatmap`` its map at
    frame size, over the frame decoded again) are drawn here, in an image thread
    (:func:`patchsearch.query.add_maps`). Fails closed: the decision is OK or NG only from a
    calibrated version and a finite score, else ERROR with a reason."""
    import base64
    import io

    import numpy as np

    from ..data import decode_image
    from ..query import add_maps
    from ..report import heatmap as render_heatmap, record

    background_thread()
    add_maps(loaded.index, part, [size], maps=heatmap)
    body = record(loaded.index, part, 0)  # part holds this one frame
    body.pop("path", None)
    body.update(category=loaded.category, version=loaded.version, name=name or None,
                frame={"width": size[0], "height": size[1]}, pixel_threshold=part.pixel_threshold)
    if not loaded.judgeable:
        body.update(decision="ERROR", reason="uncalibrated",
                    error=f"{loaded.category} {loaded.version} has no image threshold (run patchsearch calibrate): "
                          f"the score is given, but no verdict")
    elif body.get("image_score") is None and body["decision"] != "ERROR":
        body.update(decision="ERROR", reason="non_finite_score", error="the frame's score is not finite")
    elif body["decision"] not in ("OK", "NG", "ERROR") or (body["decision"] == "ERROR" and not body.get("reason")):
        body.update(decision="ERROR", reason=body.get("reason") or "unjudged")
    if heatmap and body["decision"] != "ERROR":
        from PIL import Image

        frame = np.asarray(decode_image(data, loaded.bit_depth, name or "uploaded frame", max_pixels))
        buf = io.BytesIO()
        Image.fromarray(render_heatmap(loaded.index, part, 0, frame)).save(buf, format="PNG")
        body["heatmap_png"] = base64.b64encode(buf.getvalue()).decode("ascii")
    return {k: v for k, v in body.items() if v is not None or k in ("decision", "threshold", "version")}
