"""Prometheus metrics of the service (one registry per application, text format at /metrics).

Every label takes values from a bounded set: routes of the application (``unmatched``
for any other path), the standard HTTP methods (``other`` for any other), HTTP status
codes, categories found in the index directory, decisions OK / NG / ERROR and the fixed
reasons below. No request can add a series of its own.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
DECISIONS = frozenset({"OK", "NG", "ERROR"})
REJECTIONS = frozenset({"queue_full", "overloaded", "queue_timeout", "memory_timeout", "frame_too_large",
                        "unsupported_format", "body_timeout"})


def method_label(method: str) -> str:
    """``method`` if it is a standard HTTP method, else ``other``."""
    return method if method in METHODS else "other"


def status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else "other"


class _Readiness:
    """``patchsearch_category_ready{category}``: 1 while a category answers with a
    calibrated version, the one its CURRENT names; read from the registry at each scrape."""

    def __init__(self, status):
        self.status = status

    def collect(self):
        family = GaugeMetricFamily("patchsearch_category_ready", "category answers with its current calibrated "
                                   "version (1) or not (0)", labels=["category"])
        for category, entry in self.status().items():
            family.add_metric([category], 1.0 if entry["ready"] else 0.0)
        yield family


class Telemetry:
    """The service's metrics.

    * ``patchsearch_request_seconds{route, method}``: request latency histogram, seconds.
    * ``patchsearch_requests_total{route, method, status}``: requests by HTTP status.
    * ``patchsearch_inspections_total{category, decision}``: judged frames by decision
      (OK, NG, ERROR).
    * ``patchsearch_batch_size``: frames per backbone batch (histogram).
    * ``patchsearch_reloads_total{category, outcome}``: index versions loaded / failed to
      load / refused (uncalibrated).
    * ``patchsearch_category_ready{category}``: 1 ready, 0 not (see ``/readyz``).
    * ``patchsearch_rejected_total{reason}``: requests refused for a bound (queue full,
      batcher overloaded, queue or memory wait past the deadline, frame too large,
      unsupported format, body too slow).
    * ``patchsearch_queue_depth``: frames waiting for a batch.
    * ``patchsearch_inflight``: inspect requests admitted; ``patchsearch_decode_bytes``:
      the decode memory budget in use, bytes.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth=lambda: 0, status=dict, inflight=lambda: 0, decode_bytes=lambda: 0):
        self.queue_depth, self.inflight, self.decode_bytes = queue_depth, inflight, decode_bytes  # read at scrape
        r = self.registry = CollectorRegistry()
        self.latency = Histogram("patchsearch_request_seconds", "request latency", ["route", "method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("patchsearch_requests", "requests by status", ["route", "method", "status"],
                                registry=r)
        self.inspections = Counter("patchsearch_inspections", "judged frames", ["category", "decision"], registry=r)
        self.batch_size = Histogram("patchsearch_batch_size", "frames per backbone batch", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.reloads = Counter("patchsearch_reloads", "index versions loaded", ["category", "outcome"], registry=r)
        self.rejected = Counter("patchsearch_rejected", "requests refused", ["reason"], registry=r)
        Gauge("patchsearch_queue_depth", "frames waiting for a batch",
              registry=r).set_function(lambda: self.queue_depth())
        Gauge("patchsearch_inflight", "inspect requests admitted", registry=r).set_function(lambda: self.inflight())
        Gauge("patchsearch_decode_bytes", "decode memory budget in use, bytes",
              registry=r).set_function(lambda: self.decode_bytes())
        self.readiness = _Readiness(status)
        r.register(self.readiness)

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """One answered request (``route``: the matched route's path, ``unmatched`` else)."""
        method = method_label(method)
        self.latency.labels(route, method).observe(seconds)
        self.requests.labels(route, method, status_label(status)).inc()

    def reject(self, reason: str) -> None:
        self.rejected.labels(reason if reason in REJECTIONS else "other").inc()

    def judged(self, category: str, decision: str) -> None:
        self.inspections.labels(category, decision if decision in DECISIONS else "ERROR").inc()

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
