"""Prometheus metrics of the API, in a registry of their own (one per process, not per app)."""
from __future__ import annotations

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
