"""Prometheus metrics of the API, in a registry of their own (one per process, not per app).

Ledger gauges (items by state, outbox chunks) are read at most every METRICS_LEDGER_SECONDS
whatever the scrape rate: a GROUP BY over every item on each scrape of every replica would be a
load of its own. Queue depth is read on every scrape: LLEN is O(1).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

HTTP_REQUESTS = Counter(
    "instabatch_http_requests_total", "HTTP requests by method, route template and status",
    ["method", "route", "status"], registry=REGISTRY,
)
HTTP_LATENCY = Histogram(
    "instabatch_http_request_duration_seconds", "HTTP request duration by method and route template",
    ["method", "route"], registry=REGISTRY,
)
BATCHES_SUBMITTED = Counter(
    "instabatch_batches_submitted_total", "Batches accepted (idempotent replays not counted)",
    ["priority"], registry=REGISTRY,
)
ITEMS_SUBMITTED = Counter(
    "instabatch_items_submitted_total", "Items in accepted batches", registry=REGISTRY,
)
OUTBOX_PUBLISH_FAILURES = Counter(
    "instabatch_outbox_publish_failures_total",
    "Post-submit publishes that failed (the chunks stay pending for the sweeper)", registry=REGISTRY,
)
ITEMS_BY_STATE = Gauge(
    "instabatch_items", "Items in the ledger by state, read at scrape time", ["state"], registry=REGISTRY,
)
QUEUE_DEPTH = Gauge(
    "instabatch_queue_depth",
    "Messages waiting in each broker queue (Redis LLEN; other brokers: outbox chunks sent and not yet taken)",
    ["queue"], registry=REGISTRY,
)
OUTBOX_CHUNKS = Gauge(
    "instabatch_outbox_chunks", "Outbox chunks per queue: pending (not yet sent) or in_flight (sent, not taken)",
    ["queue", "state"], registry=REGISTRY,
)


class Throttle:
    """Runs a refresh at most once per ``seconds``; concurrent scrapes within it skip it."""

    def __init__(self, seconds: Callable[[], float]):
        self._seconds = seconds
        self._lock = threading.Lock()
        self._last = float("-inf")

    def run(self, refresh: Callable[[], None]) -> bool:
        if time.monotonic() - self._last < self._seconds() or not self._lock.acquire(blocking=False):
            return False
        try:
            refresh()
            self._last = time.monotonic()
            return True
        finally:
            self._lock.release()
