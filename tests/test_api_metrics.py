"""The API's /metrics beyond HTTP series, on PostgreSQL + Redis.

Queue depth is Redis's LLEN of each Celery queue; the ledger's gauges are read at most every
METRICS_LEDGER_SECONDS however often Prometheus scrapes.
"""
from __future__ import annotations

import re

import pytest
import redis

from api.metrics import Throttle
from api.routes import health
from tests.apikit import ApiHarness, sample_batch
from tests.workerkit import quiet_outbox
from core.db import get_engine, session_factory


@pytest.fixture
def api(configure, pg_url, redis_url, monkeypatch) -> ApiHarness:
    redis.Redis.from_url(redis_url).flushdb()
    configure(DATABASE_URL=pg_url, BROKER_URL=redis_url, INSTABATCH_CHUNK_IMAGES="2", DISPATCH_IN_FLIGHT="2",
              METRICS_LEDGER_SECONDS="3600", QUOTA_SUBMISSIONS_PER_MINUTE="0")
    quiet_outbox(session_factory(get_engine()))
    monkeypatch.setattr(health, "ledger_throttle", Throttle(lambda: 3600))  # a fresh clock for this test
    yield ApiHarness.start()
    redis.Redis.from_url(redis_url).flushdb()


def gauge(text: str, name: str, **labels: str) -> float:
    selector = ",".join(f'{key}="{value}"' for key, value in labels.items())
    match = re.search(rf"^{name}\{{{re.escape(selector)}\}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{{{selector}}} not in /metrics"
    return float(match.group(1))


def test_queue_depth_is_the_brokers_and_ledger_gauges_are_read_at_most_once_per_period(api: ApiHarness, redis_url):
    api.submit(body=sample_batch(10))  # 5 chunks, 2 sent (DISPATCH_IN_FLIGHT)
    first = api.client.get("/metrics").text
    assert gauge(first, "instabatch_queue_depth", queue="generate") == 2 == redis.Redis.from_url(redis_url).llen("generate")
    assert gauge(first, "instabatch_queue_depth", queue="generate.high") == 0
    assert gauge(first, "instabatch_outbox_chunks", queue="generate", state="pending") == 3
    assert gauge(first, "instabatch_outbox_chunks", queue="generate", state="in_flight") == 2
    queued = gauge(first, "instabatch_items", state="queued")
    assert queued >= 10
    api.submit(body=sample_batch(4, priority="high"))
    second = api.client.get("/metrics").text
    assert gauge(second, "instabatch_queue_depth", queue="generate.high") == 2  # read on every scrape
    assert gauge(second, "instabatch_items", state="queued") == queued  # not re-counted within the period
