"""Reading an image out of a request: a raw body or a multipart field, within a size limit."""

from __future__ import annotations

from starlette.requests import Request

RAW_TYPES = ("application/octet-stream",)
IMAGE_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff", "image/x-ms-bmp", "image/webp")
FIELDS = ("file", "image")

OPENAPI_BODY = {"requestBody": {"required": True, "description": "the frame: raw image bytes, or multipart field 'file'",
                                "content": {**{t: {"schema": {"type": "string", "format": "binary"}}
                                               for t in IMAGE_TYPES + RAW_TYPES},
                                            "multipart/form-data": {"schema": {
                                                "type": "object", "required": ["file"],
                                                "properties": {"file": {"type": "string", "format": "binary"}}}}}}}


async def read_image(request: Request, limit: int, error) -> tuple[bytes, str]:
    """(image bytes, file name or "") of an inspect request, reading at most ``limit`` bytes.

    ``error(status, code, message)`` makes the exception raised: 415 for another content
    type, 413 beyond ``limit`` (judged from Content-Length before reading, and while
    reading), 400 for an empty body or a multipart body without a file field.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    multipart = ctype == "multipart/form-data"
    if not (multipart or ctype in RAW_TYPES or ctype.startswith("image/")):
        raise error(415, "unsupported_media_type",
                    f"content type {ctype or '(none)'!r} is not accepted: send the image bytes as image/png, "
                    f"image/jpeg, ... or application/octet-stream, or multipart/form-data with a 'file' field "
                    f"(curl -H 'Content-Type: image/png' --data-binary @frame.png, or curl -F file=@frame.png)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise error(413, "body_too_large", f"the body is {int(declared)} bytes, over the limit of {limit} bytes "
                                           f"(--max-body-mb)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise error(413, "body_too_large", f"the body is over the limit of {limit} bytes (--max-body-mb)")
    if not multipart:
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
