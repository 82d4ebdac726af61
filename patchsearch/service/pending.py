"""Why a category does not answer with the version its ``CURRENT`` names (and when to try again)."""

from __future__ import annotations

import time
from dataclasses import dataclass

BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0

# reason -> what it means (the `reason` of /readyz and /v1/categories)
REASONS = {
    "load_failed": "the version could not be loaded; tried again with back-off",
    "uncalibrated": "the version has no image threshold, so it cannot judge a frame",
    "unreadable_current": "the category's CURRENT file cannot be read",
    "loading": "not loaded yet",
}


def backoff_s(attempts: int) -> float:
    """Seconds before retry number ``attempts`` + 1 of a failed load: 1, 2, 4, ... at most 60."""
    return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2 ** max(0, attempts - 1))


@dataclass
class Pending:
    """A version of a category not answering.

    Attributes:
        version: the version ``CURRENT`` names (None if unknown).
        reason: a key of :data:`REASONS`.
        message: what happened, one line.
        attempts: failed loads of this version so far.
        retry_at: ``time.monotonic()`` of the next try; None = not until ``CURRENT`` changes.
    """

    version: str | None
    reason: str
    message: str
    attempts: int = 0
    retry_at: float | None = None

    @classmethod
    def failed(cls, version: str | None, exc: BaseException, attempts: int) -> "Pending":
        message = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
        return cls(version, "load_failed", message, attempts, time.monotonic() + backoff_s(attempts))

    @classmethod
    def uncalibrated(cls, version: str | None, serving: str | None) -> "Pending":
        still = f"still answering with {serving}" if serving else "every frame is answered ERROR (reason uncalibrated)"
        return cls(version, "uncalibrated", f"version {version} has no image threshold (run patchsearch calibrate); "
                                            f"{still}")

    def due(self) -> bool:
        """Whether to try loading this version again now."""
        return self.retry_at is not None and time.monotonic() >= self.retry_at

    def retry_in(self) -> float | None:
        """Seconds until the next try (None: not retried)."""
        return None if self.retry_at is None else max(0.0, self.retry_at - time.monotonic())

    def describe(self) -> dict:
        retry = self.retry_in()
        return {"reason": self.reason, "message": self.message, "pending_version": self.version,
                "attempts": self.attempts, "retry_in_s": None if retry is None else round(retry, 1)}
