"""The worker's Celery app: core.broker's configuration plus the tasks, queues and beat schedule.

Run one worker process per GPU with the solo pool (the default of ``instabatch worker``):

    celery -A worker.celery_app worker --pool solo -Q generate.high,generate,generate.low,maintenance

The model is never loaded in a prefork parent (a forked child cannot use CUDA initialised
before the fork): solo loads it on the first task, a prefork child as it starts. Solo has no
time limits and no child recycling; the task renews its lease between micro-batches. With
``--pool prefork`` the time limits apply: at the soft limit the task gives its unfinished items
back to the queue; a child that dies is replaced and its chunk is redelivered
(``task_reject_on_worker_lost``) and run one item at a time.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals
from kombu import Queue

from core.audit.anchors import anchor_chain
from core.broker import (
    ANCHOR_TASK,
    GENERATE_TASK,
    MAINTENANCE_QUEUE,
    QUEUE_FOR_PRIORITY,
    SWEEP_TASK,
    WEBHOOK_TASK,
    make_celery,
)
from core.logs import bind_ids, clear_ids
from core.settings import Settings, get_settings
from worker import metrics
from worker.chunk import ChunkRunner
from worker.context import WorkerContext
from worker.regenerate import register_regenerate_task
from worker.sweeper import sweep
from worker.webhooks import deliver_due

log = logging.getLogger(__name__)
# Consumed in this order: Celery polls the queues round-robin per fetch, so "high" is not strict.
WORKER_QUEUES = (QUEUE_FOR_PRIORITY["high"], QUEUE_FOR_PRIORITY["normal"], QUEUE_FOR_PRIORITY["low"], MAINTENANCE_QUEUE)


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = make_celery(settings)
    app.conf.update(
        task_queues=[Queue(name) for name in WORKER_QUEUES],
        task_routes={name: {"queue": MAINTENANCE_QUEUE} for name in (SWEEP_TASK, ANCHOR_TASK, WEBHOOK_TASK)},
        # A lazy model load in a prefork child happens in its first task; give children time to boot.
        worker_proc_alive_timeout=120,
        beat_schedule={
            "sweep-expired-leases": {"task": SWEEP_TASK, "schedule": settings.sweep_every_seconds,
                                     "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.sweep_every_seconds}},
            "anchor-audit-chain": {"task": ANCHOR_TASK, "schedule": settings.anchor_every_seconds,
                                   "options": {"queue": MAINTENANCE_QUEUE, "expires": settings.anchor_every_seconds}},
            "deliver-webhooks": {"task": WEBHOOK_TASK, "schedule": settings.webhook_deliver_every_seconds,
                                 "options": {"queue": MAINTENANCE_QUEUE,
                                             "expires": settings.webhook_deliver_every_seconds}},
        },
        beat_schedule_filename=str(settings.var_dir.resolve() / "celerybeat-schedule"),
    )
    ctx = WorkerContext(settings, celery=app)
    ctx.sealer  # noqa: B018 - loads the signing key now: a missing one stops the worker at start, not per item
    app.instabatch = ctx  # type: ignore[attr-defined]

    @app.task(name=GENERATE_TASK, bind=True, ignore_result=True, shared=False)
    def generate_chunk(task: Any, item_ids: list[str], outbox_id: int | None = None) -> dict[str, Any]:
        """Claim, generate, store, check and record a chunk of items; idempotent under redelivery."""
        bind_ids(outbox_id=outbox_id, item_ids=item_ids)
        report = ChunkRunner(ctx, task.request.id or "local").run(item_ids, outbox_id)
        log.info("chunk done: %s", report.as_dict())
        return report.as_dict()

    register_regenerate_task(app, ctx)  # a reviewer's "regenerate" (worker/regenerate.py)

    @app.task(name=SWEEP_TASK, ignore_result=True, shared=False)
    def sweep_expired() -> dict[str, int]:
        report = sweep(ctx.sessions, app, settings)
        return {"requeued": len(report.requeued), "dead": len(report.dead), "dispatched": report.dispatched}

    @app.task(name=WEBHOOK_TASK, ignore_result=True, shared=False)
    def deliver_webhooks() -> dict[str, int]:
        """Send due webhook deliveries (docs/webhooks.md): here, never inside a GPU task."""
        report = deliver_due(ctx.sessions, settings)
        return {"delivered": len(report.delivered), "retrying": len(report.retrying), "failed": len(report.failed)}

    @app.task(name=ANCHOR_TASK, ignore_result=True, shared=False)
    def anchor_audit_chain() -> dict[str, Any] | None:
        """Write the audit chain's head to write-once storage; a broken chain raises, loudly."""
        with ctx.sessions() as session:
            result = anchor_chain(session, ctx.store)
            session.commit()
        return result and {"seq": result.anchor.seq, "created": result.created}

    @signals.task_prerun.connect(weak=False)
    def bind_task_ids(task_id: str | None = None, task: Any = None, **_: Any) -> None:
        """Every log line of a task carries its id and name (core/logs.py); the chunk adds its batch."""
        clear_ids()
        bind_ids(task_id=task_id, task=getattr(task, "name", None))

    @signals.task_postrun.connect(weak=False)
    def unbind_task_ids(**_: Any) -> None:
        clear_ids()

    @signals.worker_process_init.connect(weak=False)
    def serve_metrics(**_: Any) -> None:
        """Each process that runs tasks serves its own /metrics (worker/metrics.py): the solo worker
        on WORKER_METRICS_PORT, prefork child i (0-based) on WORKER_METRICS_PORT + 1 + i."""
        metrics.serve(settings.worker_metrics_port, offset=_child_offset())

    @signals.worker_process_init.connect(weak=False)
    def load_model_in_child(**_: Any) -> None:
        """A prefork child loads the model as it starts, so the load never eats into a task's time
        limits. Only children get this signal: the parent never touches the model (nor CUDA)."""
        try:
            ctx.model.load()
        except Exception:  # the first task will fail to load it too, and give its items back
            log.exception("could not load the model in worker process %s", os.getpid())

    @signals.worker_ready.connect(weak=False)
    def sweep_at_start(sender: Any = None, **_: Any) -> None:
        if sender is None or getattr(sender, "app", None) is not app:
            return
        try:  # embedded: one host, so a lease held by a pid that is gone is free to take now
            sweep(ctx.sessions, app, settings, reclaim_dead_local=settings.broker_url.startswith("sqla+"))
        except Exception:  # a worker that cannot sweep can still work; beat will sweep later
            log.exception("sweep at worker start failed")

    return app


def _child_offset() -> int:
    from billiard.process import current_process

    process = current_process()
    return process.index + 1 if process.daemon and getattr(process, "index", None) is not None else 0
