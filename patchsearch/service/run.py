"""Run the service with uvicorn (what ``patchsearch serve`` calls)."""

from __future__ import annotations

import logging
import re

from .app import Settings, create_app

_TOKEN = re.compile(r"([?&]token=)[^&\s\"]*")


class RedactToken(logging.Filter):
    """Replace the value of a ``token`` query parameter in access-log lines by ``***``."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(_TOKEN.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


def serve(settings: Settings, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT / SIGTERM (uvicorn finishes in-flight requests, then the registry
    stops its threads and closes every index)."""
    import uvicorn

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.access").addFilter(RedactToken())
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=30)
