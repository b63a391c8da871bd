"""A reviewer's "regenerate": a new image for the same item, with a new seed, through QC again.

The request is in the ledger before the task runs (``core.review.decide``): the parent's Review
row names the new image's id, and the seed follows from the parent's id and its place in the
regeneration chain. The task renders, stores, checks and records that one image with the
chunk runner's own steps (``worker/steps.py``), and links it with ``parent_image_id``.

Idempotent under at-least-once delivery: the new image's id and storage key are fixed by the
request, the store is write-once (a second run adopts the object), and an image row that
already exists ends the task. Register it in the worker's Celery app with
:func:`register_regenerate_task`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from core import audit
from core import review as ledger_review
from models import Image, Item
from worker.context import WorkerContext, worker_identity
from worker.leases import ClaimedItem
from worker.steps import BatchView, ImageSteps, UploadedImage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    request: ledger_review.RegenerationRequest
    parent: Image
    item: ClaimedItem


def regenerate_image(ctx: WorkerContext, parent_image_id: str, seed: int, task_id: str = "local") -> dict[str, Any]:
    """Make the image a reviewer asked for; returns what happened (``status``: created, exists,
    no_request, seed_mismatch or dead)."""
    job, status = _job(ctx, parent_image_id, seed)
    if job is None:
        return {"status": status, "parent_image_id": parent_image_id}
    steps = ImageSteps(ctx, actor=f"worker:{worker_identity()}")
    batch = steps.batch(job.parent.batch_id, job.item.model)  # a canary item's image: its own model
    rendered = steps.render(batch, [(job.item, job.parent.index, job.request.seed)])[0]
    key = regenerated_key(job.parent.storage_key, job.request.new_image_id, batch.encoding.extension)
    stored = steps.upload(rendered, key, image_id=job.request.new_image_id,
                          metadata={"parent_image_id": job.parent.id})
    steps.check(batch, [stored])
    created = _record(ctx, steps, batch, job, stored)
    return {"status": "created" if created else "exists", "parent_image_id": parent_image_id,
            "image_id": job.request.new_image_id, "seed": job.request.seed,
            "verdict": stored.qc.verdict if stored.qc is not None else None}


def _job(ctx: WorkerContext, parent_image_id: str, seed: int) -> tuple[Job | None, str]:
    with ctx.sessions() as session:
        request = ledger_review.find_regeneration(session, parent_image_id)
        if request is None:
            log.warning("regenerate %s: no regenerate decision recorded for it; nothing to do", parent_image_id)
            return None, "no_request"
        if request.seed != seed:
            # The ledger decides the seed; a message that disagrees was not written by decide().
            log.error("regenerate %s: message seed %s differs from the recorded %s; refused",
                      parent_image_id, seed, request.seed)
            return None, "seed_mismatch"
        if session.get(Image, request.new_image_id) is not None:
            return None, "exists"
        if not _count_attempt(ctx, session, request):
            return None, "dead"
        parent = session.get(Image, parent_image_id)
        row = session.get(Item, parent.item_id)
        item = ClaimedItem(id=row.id, batch_id=row.batch_id, seq=row.seq, external_id=row.external_id,
                           prompt=row.prompt, seed=row.seed, num_images=1, attempts=row.attempts,
                           model=row.model)
        session.expunge(parent)
    return Job(request, parent, item), "ready"


def _count_attempt(ctx: WorkerContext, session: Any, request: ledger_review.RegenerationRequest) -> bool:
    """Count this run; past MAX_ATTEMPTS (the prompt keeps killing the worker) end the request,
    visibly on the parent's review, instead of running it again."""
    max_attempts = ctx.settings.max_attempts
    attempts = ledger_review.count_regeneration_attempt(session, request.parent_image_id, max_attempts)
    if attempts is not None:
        session.commit()
        return True
    error = (f"dead after {max_attempts} attempts: every run of the regenerate task ended without an image "
             "(the worker process died, was killed or timed out)")
    if ledger_review.end_regeneration(session, request.parent_image_id, error):
        batch_id = session.scalar(select(Image.batch_id).where(Image.id == request.parent_image_id))
        audit.record(session, "image.regeneration_dead", actor=f"worker:{worker_identity()}", batch_id=batch_id,
                     image_id=request.parent_image_id,
                     payload={"new_image_id": request.new_image_id, "error": error, "max_attempts": max_attempts})
        log.warning("regenerate %s: %s", request.parent_image_id, error)
    session.commit()
    return False


def regenerated_key(parent_key: str, new_image_id: str, extension: str = "png") -> str:
    """Next to the parent's object, named by the new image's id: fixed by the request, so a
    redelivered task writes the same key (and the write-once store keeps the first object)."""
    folder, _, _ = parent_key.rpartition("/")
    return f"{folder}/regenerated-{new_image_id}.{extension}"


def _record(ctx: WorkerContext, steps: ImageSteps, batch: BatchView, job: Job, stored: UploadedImage) -> bool:
    """The image row (with QC rows and the qc.verdict event), its parent link and an
    ``image.regenerated`` event, in one transaction. False when a twin delivery recorded it first."""
    with ctx.sessions() as session:
        try:
            if session.scalar(select(Image.id).where(Image.id == stored.id)) is not None:
                return False
            events = steps.record(session, batch, [stored], parent_image_id=job.parent.id)
            image = session.get(Image, stored.id)
            events.append({"action": "image.regenerated", "actor": steps.actor, "batch_id": job.parent.batch_id,
                           "item_id": job.item.id, "image_id": stored.id, "payload": {
                               "parent_image_id": job.parent.id, "seed": job.request.seed,
                               "generation": job.request.generation, "storage_key": stored.key,
                               "sha256": stored.sha256, "model": image.model_id,
                               "weights_sha256": image.weights_sha256, "verdict": image.qc_verdict,
                               "reasons": image.qc_reasons,
                           }})
            audit.record_many(session, events)
            session.commit()
        except IntegrityError:  # the same request, delivered twice and run at once: the other won
            session.rollback()
            return False
    return True


def register_regenerate_task(app: Celery, ctx: WorkerContext) -> Any:
    """Add ``instabatch.regenerate_image`` to the worker's app (call it in ``worker.app.create_app``)."""

    @app.task(name=ledger_review.REGENERATE_TASK, bind=True, ignore_result=True, shared=False)
    def regenerate(task: Any, parent_image_id: str, seed: int) -> dict[str, Any]:
        report = regenerate_image(ctx, parent_image_id, seed, task_id=task.request.id or "local")
        log.info("regenerate done: %s", report)
        return report

    return regenerate
