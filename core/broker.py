"""The Celery app's configuration, shared by the API (which only publishes) and the worker.

The API publishes by task *name* (``send_task``) so it never imports torch or the engine.
"""
from __future__ import annotations

from functools import lru_cache

from celery import Celery

from core.settings import Settings, get_settings

GENERATE_TASK = "instabatch.generate_chunk"
SWEEP_TASK = "instabatch.sweep"
ANCHOR_TASK = "instabatch.anchor_audit_chain"
WEBHOOK_TASK = "instabatch.deliver_webhooks"
# Separate queues rather than Redis priorities, which are approximate (docs/architecture.md).
QUEUE_FOR_PRIORITY = {"high": "generate.high", "normal": "generate", "low": "generate.low"}
MAINTENANCE_QUEUE = "maintenance"


def make_celery(settings: Settings) -> Celery:
    app = Celery("instabatch", broker=settings.broker_url)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_default_queue=QUEUE_FOR_PRIORITY["normal"],
        # At-least-once: ack after the task returns, requeue when the worker process dies.
        # The ledger's attempt cap stops a poison chunk from being requeued forever.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit,
        task_time_limit=settings.task_time_limit,
        broker_transport_options=transport_options(settings.broker_url, settings.visibility_timeout),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app


def transport_options(broker_url: str, visibility_timeout: int) -> dict[str, object]:
    if broker_url.startswith("sqla+"):
        # kombu's SQLAlchemy transport hands every option to create_engine(), which refuses
        # Redis's; it has no visibility timeout either: a message taken by a worker that dies
        # stays taken, and the ledger's lease plus the sweeper bring its items back.
        return {}
    return {"visibility_timeout": visibility_timeout}


@lru_cache(maxsize=4)
def _celery_for(broker_url: str) -> Celery:
    return make_celery(get_settings())


def get_celery() -> Celery:
    return _celery_for(get_settings().broker_url)
