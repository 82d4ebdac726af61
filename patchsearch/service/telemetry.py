"""Prometheus metrics of the service (one registry per application, text format at /metrics)."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


class Telemetry:
    """The service's metrics.

    * ``patchsearch_request_seconds{route, method}``: request latency histogram, seconds.
    * ``patchsearch_requests_total{route, method, status}``: requests by HTTP status.
    * ``patchsearch_inspections_total{category, decision}``: judged frames by decision
      (OK, NG, ERROR, or "uncalibrated").
    * ``patchsearch_batch_size``: frames per backbone batch (histogram).
    * ``patchsearch_reloads_total{category, outcome}``: index versions loaded / failed to load.
    * ``patchsearch_rejected_total{reason}``: requests refused because the queue was full.
    * ``patchsearch_queue_depth``: frames waiting for a batch.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queue_depth=lambda: 0):
        self.queue_depth = queue_depth  # replaceable: read at each scrape
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
        Gauge("patchsearch_queue_depth", "frames waiting for a batch", registry=r).set_function(lambda: self.queue_depth())

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        self.latency.labels(route, method).observe(seconds)
        self.requests.labels(route, method, str(status)).inc()

    def render(self) -> bytes:
        """The metrics in Prometheus text format."""
        return generate_latest(self.registry)
