"""Liveness, readiness (database, broker, storage) and Prometheus metrics; no key needed."""
from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from functools import lru_cache

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from api import queries
from api.errors import error_response, error_responses
from api.metrics import ITEMS_BY_STATE, OUTBOX_CHUNKS, QUEUE_DEPTH, REGISTRY, Throttle
from core.broker import MAINTENANCE_QUEUE, QUEUE_FOR_PRIORITY, get_celery
from core.db import get_engine, session_factory
from core.settings import get_settings
from core.storage import get_store
from models import ItemState

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 5.0
BROKER_QUEUES = (*QUEUE_FOR_PRIORITY.values(), MAINTENANCE_QUEUE)
# Checks run in threads of their own: a hung dependency (boto3 retrying a dead endpoint) must not
# hang the probe past its timeout, and a thread left behind is reused rather than piling up.
_checks_pool = ThreadPoolExecutor(max_workers=6, thread_name_prefix="readyz")


@router.get("/healthz", summary="Liveness: the process answers")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def check_database() -> None:
    with get_engine().connect() as connection:
        connection.execute(text("SELECT 1"))


def check_broker() -> None:
    with get_celery().connection_for_write() as connection:
        connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.2, interval_max=0.2,
                                     timeout=CHECK_TIMEOUT_S)


def check_storage() -> None:
    get_store().check()


READINESS_CHECKS: dict[str, Callable[[], None]] = {
    "database": check_database, "broker": check_broker, "storage": check_storage,
}


def run_checks(checks: dict[str, Callable[[], None]], timeout: float = CHECK_TIMEOUT_S) -> dict[str, dict]:
    futures = {name: _checks_pool.submit(check) for name, check in checks.items()}
    wait(futures.values(), timeout=timeout)
    results: dict[str, dict] = {}
    for name, future in futures.items():
        if not future.done():
            results[name] = {"ok": False, "error": f"no answer within {timeout:g}s"}
        elif future.exception() is not None:
            error = future.exception()
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
        else:
            results[name] = {"ok": True}
    return results


@router.get("/readyz", responses=error_responses(503, meanings={503: "not ready: details name the failed checks"}),
            summary="Readiness: database, broker and storage each answer; 503 names the failed ones")
def readyz() -> JSONResponse:
    results = run_checks(READINESS_CHECKS)
    failed = [name for name, result in results.items() if not result["ok"]]
    if failed:
        log.warning("not ready: %s", results)
        return error_response(503, "not_ready", f"not ready: {', '.join(failed)}",
                              {"failed": failed, "checks": results})
    return JSONResponse({"status": "ok", "checks": results})


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
def metrics() -> Response:
    for name, refresh in (("ledger gauges", lambda: ledger_throttle.run(refresh_ledger_gauges)),
                          ("queue depth", refresh_queue_depth)):
        try:
            refresh()
        except Exception as exc:  # noqa: BLE001 - the request metrics still serve when a part is down
            log.warning("%s not refreshed: %s", name, exc)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


ledger_throttle = Throttle(lambda: get_settings().metrics_ledger_seconds)


def refresh_ledger_gauges() -> None:
    with session_factory(get_engine())() as session:
        states = queries.item_state_counts(session)
        chunks = queries.outbox_counts(session)
    for state in ItemState:
        ITEMS_BY_STATE.labels(state.value).set(states.get(state.value, 0))
    for queue in BROKER_QUEUES:
        for state in ("pending", "in_flight"):
            OUTBOX_CHUNKS.labels(queue, state).set(chunks.get((queue, state), 0))
    if not is_redis(get_settings().broker_url):  # no LLEN: what was sent and not yet taken
        for queue in BROKER_QUEUES:
            QUEUE_DEPTH.labels(queue).set(chunks.get((queue, "in_flight"), 0))


def refresh_queue_depth() -> None:
    broker_url = get_settings().broker_url
    if not is_redis(broker_url):
        return
    client = redis_client(broker_url)
    with client.pipeline(transaction=False) as pipe:
        for queue in BROKER_QUEUES:
            pipe.llen(queue)
        depths = pipe.execute()
    for queue, depth in zip(BROKER_QUEUES, depths):
        QUEUE_DEPTH.labels(queue).set(depth)


def is_redis(broker_url: str) -> bool:
    return broker_url.startswith(("redis://", "rediss://"))


@lru_cache(maxsize=4)
def redis_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=CHECK_TIMEOUT_S, socket_connect_timeout=CHECK_TIMEOUT_S)
