"""Reading an image out of a request: a raw body or a multipart field, within a size
limit and a deadline.

Only image types on the allow-list (:data:`IMAGE_TYPES`), ``application/octet-stream``
and ``multipart/form-data`` are read; the declared type is a first filter only - the
format is judged from the bytes themselves (:mod:`.frames`) before anything decodes them.
"""

from __future__ import annotations

import anyio
from starlette.requests import ClientDisconnect, Request

RAW_TYPES = ("application/octet-stream",)
# the content types of the formats patchsearch.data.ALLOWED_FORMATS holds (Pillow's names)
FORMAT_TYPES = {"PNG": ("image/png",), "JPEG": ("image/jpeg", "image/pjpeg"),
                "BMP": ("image/bmp", "image/x-ms-bmp", "image/x-bmp"), "TIFF": ("image/tiff", "image/tiff-fx"),
                "WEBP": ("image/webp",), "PPM": ("image/x-portable-anymap", "image/x-portable-pixmap",
                                                 "image/x-portable-graymap", "image/x-portable-bitmap")}
IMAGE_TYPES = tuple(t for types in FORMAT_TYPES.values() for t in types)
FIELDS = ("file", "image")


class Disconnected(Exception):
    """The client went away before its body arrived (nobody to answer)."""


OPENAPI_BODY = {"requestBody": {"required": True, "description": "the frame: raw image bytes, or multipart field 'file'",
                                "content": {**{t: {"schema": {"type": "string", "format": "binary"}}
                                               for t in IMAGE_TYPES + RAW_TYPES},
                                            "multipart/form-data": {"schema": {
                                                "type": "object", "required": ["file"],
                                                "properties": {"file": {"type": "string", "format": "binary"}}}}}}}


def check_type(request: Request, limit: int, error) -> None:
    """Refuse, before reading anything, a content type off the allow-list (415) or a
    declared Content-Length over ``limit`` bytes (413); ``error(status, code, message)``
    makes the exception raised."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if not (ctype == "multipart/form-data" or ctype in RAW_TYPES or ctype in IMAGE_TYPES):
        raise error(415, "unsupported_media_type",
                    f"content type {ctype or '(none)'!r} is not accepted: send PNG, JPEG, BMP, TIFF, WebP or Netpbm "
                    f"bytes as image/png, image/jpeg, ... or application/octet-stream, or multipart/form-data with a "
                    f"'file' field (curl -H 'Content-Type: image/png' --data-binary @frame.png, or curl -F "
                    f"file=@frame.png)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise error(413, "body_too_large", f"the body is {int(declared)} bytes, over the limit of {limit} bytes "
                                           f"(--max-body-mb)")


async def read_image(request: Request, limit: int, error, timeout: float | None = None) -> tuple[bytes, str]:
    """(image bytes, file name or "") of an inspect request, reading at most ``limit`` bytes
    within ``timeout`` seconds (None: no deadline).

    ``error(status, code, message, headers=None)`` makes the exception raised: 415 for a
    content type off the allow-list, 413 beyond ``limit`` (judged from Content-Length
    before reading, and while reading), 408 when the body has not arrived in ``timeout``,
    400 for an empty body or a multipart body without a file field.

    Raises:
        Disconnected: the client closed the connection before the body was complete.
    """
    check_type(request, limit, error)
    body = bytearray()
    try:
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise error(413, "body_too_large", f"the body is over the limit of {limit} bytes (--max-body-mb)",
                                {"Connection": "close"})
    except TimeoutError:
        raise error(408, "body_timeout", f"the body did not arrive within {timeout:g} s (--body-timeout); "
                                         f"{len(body)} bytes came", {"Connection": "close"}) from None
    except ClientDisconnect:
        raise Disconnected(f"the client closed the connection after {len(body)} bytes of its body") from None
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "multipart/form-data":
        if not body:
            raise error(400, "empty_body", "the request body is empty: send the image bytes")
        return bytes(body), ""
    return await _multipart(request, bytes(body), error)


async def _multipart(request: Request, body: bytes, error) -> tuple[bytes, str]:
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception as exc:  # noqa: BLE001 - python-multipart raises several kinds
        raise error(400, "bad_multipart", f"cannot parse the multipart body ({exc})") from None
    try:
        for field in FIELDS:
            item = form.get(field)
            if item is not None and hasattr(item, "read"):
                data = await item.read()
                if not data:
                    raise error(400, "empty_body", f"the multipart field {field!r} is empty")
                return data, str(item.filename or "")[:200]
        raise error(400, "no_file", "the multipart body has no file field 'file' (or 'image')")
    finally:
        await form.close()
