"""One task's work: claim a chunk's items, generate them micro-batch by micro-batch, store, check, record.

    take (mark the message claimed, settle) → claim (one UPDATE, lease) → screen prompts
    → per micro-batch: [cancel?] → generate (one forward pass, per-image seeds; the next pass's
      prompts encoded beside it on another thread)
        ⇢ on the finishing thread, while the device renders the next micro-batch:
          encode (the batch's format, provenance inside) → store (write-once key), with QC on
          its own thread beside them
          → record (items succeeded only while we hold the lease; image rows and every audit
          event of the micro-batch in one transaction, one chain-head update)
    → batch complete? (one guarded UPDATE) → dispatch more from the outbox

A heartbeat thread renews the lease beside the work. Every ledger and storage step is retried
with backoff while the database or the object store does not answer (core/retry.py): an outage
of up to INFRA_RETRY_SECONDS costs time, not items.

A Python exception in a micro-batch of several items re-runs its items one by one, so one bad
item fails alone. A chunk whose items ran before without finishing (the worker died) is claimed
and run one item at a time, so a prompt that kills the process takes only itself to ``dead``.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterator, Sequence

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import audit, webhooks
from core.db import ledger_now
from core.dispatch import dispatch_pending, mark_claimed
from core.ledger import pack_by_images
from core.logs import bind_ids
from core.params import image_seed
from core.retry import is_transient
from models import Batch, Item, ItemState
from worker import leases, metrics
from worker.completion import complete_if_done
from worker.context import WorkerContext, worker_identity
from worker.leases import ClaimedItem
from worker.pipeline import Overlap
from worker.steps import BatchView, GeneratedImage, ImageSteps, Job, RenderedImage, UploadedImage
from worker.version import code_version

log = logging.getLogger(__name__)
ERROR_CHARS = 2000
Generated = tuple[list[ClaimedItem], list[GeneratedImage], float]  # items, their images, when they began


@dataclass
class ChunkReport:
    """What one task did, with seconds spent per stage (the benchmark reads these)."""

    claimed: int = 0
    succeeded: int = 0
    failed: int = 0
    dead: int = 0
    cancelled: int = 0
    images: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def as_dict(self) -> dict[str, Any]:
        return {**{k: v for k, v in self.__dict__.items() if k != "seconds"},
                "seconds": {k: round(v, 4) for k, v in self.seconds.items()}}


def group_jobs(group: list[ClaimedItem]) -> list[Job]:
    """Every image of the group's items with its seed, in the order the passes render them."""
    return [(item, index, image_seed(item.seed, index)) for item in group for index in range(item.num_images)]


class ChunkRunner:
    def __init__(self, ctx: WorkerContext, task_id: str):
        self.ctx = ctx
        self.settings = ctx.settings
        self.task_id = task_id
        self.worker = worker_identity()
        self.owner = leases.lease_owner(self.worker, task_id)
        self.actor = f"worker:{self.worker}"
        self.steps = ImageSteps(ctx, actor=self.actor)
        self.report = ChunkReport(seconds=self.steps.seconds)
        self.held: set[str] = set()
        self.counted: set[str] = set()  # items whose attempt this run counted
        self.reclaim: list[str] = []  # dead earlier runs of this task whose items we may take
        self.touched_batches: set[str] = set()
        self._lock = threading.Lock()  # held/report: the finishing thread updates them too

    # -- the task ----------------------------------------------------------------------

    def run(self, item_ids: Sequence[str], outbox_id: int | None = None) -> ChunkReport:
        """take → claim → generate by micro-batches → complete batches → dispatch more, with the
        lease heartbeat beside it all."""
        heartbeat = leases.Heartbeat(self.ctx.sessions, self.owner, lease_seconds=self.settings.lease_seconds,
                                     every=self.settings.heartbeat_seconds)
        with heartbeat:
            try:
                self._take(item_ids, outbox_id)
                self._claim_and_generate(item_ids, isolate=self._ran_before(item_ids))
            except BaseException as error:
                self._give_back_held(error)
                raise
        for batch_id in sorted(self.touched_batches):
            self.ctx.retry(lambda: complete_if_done(self.ctx.sessions, batch_id, actor=self.actor,
                                                    settings=self.settings), what="batch completion")
        self._dispatch_more()
        return self.report

    def _take(self, item_ids: Sequence[str], outbox_id: int | None) -> None:
        """Mark the message taken, find dead earlier runs of this task, and end the items that
        must not run (cancelled batches, out of attempts)."""
        def work(session: Session) -> leases.Settled:
            if outbox_id is not None:
                mark_claimed(session, outbox_id)
            self.reclaim = leases.reclaimable_owners(
                session, item_ids, task_id=self.task_id, owner=self.owner, now=ledger_now(session),
                lease_seconds=self.settings.lease_seconds, heartbeat_seconds=self.settings.heartbeat_seconds)
            settled = leases.settle_unclaimable(session, item_ids, self.reclaim, self.settings.max_attempts, ledger_now(session))
            for item_id, batch_id in settled.dead:
                audit.record(session, "item.dead", actor=self.actor, batch_id=batch_id, item_id=item_id,
                             payload={"error": leases.dead_error(self.settings.max_attempts),
                                      "max_attempts": self.settings.max_attempts})
            webhooks.enqueue_items_dead(session, [item_id for item_id, _ in settled.dead])
            return settled

        settled = self.ctx.in_ledger(work, what="taking the chunk")
        self.report.dead += len(settled.dead)
        for _ in settled.dead:
            metrics.item_failure("dead")
        self.report.cancelled += len(settled.cancelled)
        self.touched_batches.update(batch_id for _, batch_id in settled.dead + settled.cancelled)

    def _ran_before(self, item_ids: Sequence[str]) -> bool:
        return self.ctx.in_ledger(lambda session: session.scalar(
            select(Item.id).where(Item.id.in_(list(item_ids)), Item.attempts > 0,
                                  Item.state.in_(ItemState.active())).limit(1)
        ) is not None, what="reading the chunk's attempts")

    def _claim_and_generate(self, item_ids: Sequence[str], isolate: bool) -> None:
        """Claim the chunk in one UPDATE; generate it by micro-batches, or item by item when isolating.

        Isolating (some item ran before and never finished: the worker died), every item is held
        from the start, so a crash leaves them all under this lease for the sweeper to requeue;
        but an item's attempt is counted only when its own turn comes, so only the item that
        kills the process runs out of attempts.
        """
        began = time.perf_counter()
        items = self.ctx.in_ledger(lambda session: leases.claim(
            session, item_ids, owner=self.owner, reclaim=self.reclaim, lease_seconds=self.settings.lease_seconds,
            max_attempts=self.settings.max_attempts, now=ledger_now(session), count_attempt=not isolate), what="the claim")
        metrics.observe_stage("claim", time.perf_counter() - began)
        self.held.update(item.id for item in items)
        if not isolate:
            self.counted.update(item.id for item in items)
        self.report.claimed += len(items)
        for batch_id in dict.fromkeys(item.batch_id for item in items):
            bind_ids(batch_id=batch_id)  # the logs of this batch's part of the chunk (core/logs.py)
            self.touched_batches.add(batch_id)
            allowed = self._screen(self.steps.batch(batch_id), [item for item in items if item.batch_id == batch_id])
            # One model per micro-batch: a canary's items run apart, with their model's params (core/canary.py).
            for model in dict.fromkeys(item.model for item in allowed):
                batch, same_model = self.steps.batch(batch_id, model), [i for i in allowed if i.model == model]
                # The model, before any item runs: one that cannot load is the worker's fault (raise, give
                # back), not the items'.
                self.ctx.model.load(batch.generation_params.model)
                if not isolate:
                    self._generate_items(batch, same_model)
                    continue
                for item in same_model:
                    counted = self._count_attempt(item)
                    if counted is not None:
                        self._generate_items(batch, [counted])

    def _count_attempt(self, item: ClaimedItem) -> ClaimedItem | None:
        attempts = self.ctx.in_ledger(lambda session: leases.count_attempt(session, item.id, owner=self.owner),
                                      what="counting an attempt")
        if attempts is None:
            return None
        self.counted.add(item.id)
        return dataclasses.replace(item, attempts=attempts)

    # -- per batch ---------------------------------------------------------------------

    def _screen(self, batch: BatchView, items: list[ClaimedItem]) -> list[ClaimedItem]:
        allowed = []
        for item in items:
            reason = self.ctx.screen(item.prompt)
            if reason is None:
                allowed.append(item)
            else:
                metrics.item_failure("blocked")
                self._end_item(batch, item, ItemState.FAILED, reason, action="item.blocked")
        return allowed

    def _generate_items(self, batch: BatchView, items: list[ClaimedItem]) -> None:
        """Micro-batch by micro-batch: the device renders one while the finishing thread encodes,
        stores, checks and records the ones before it (worker/pipeline.py)."""
        groups = list(pack_by_images(items, self.settings.micro_batch, lambda item: item.num_images))
        ahead: Future[None] | None = None
        with Overlap(self.ctx.finisher, self.settings.pipeline_depth) as overlap:
            for position, group in enumerate(groups):
                if ahead is not None:
                    ahead.result()  # this pass's prompts are encoded: generate must not encode them again
                if self._cancel_requested(batch.id):
                    self._cancel_held(batch, [item for rest in groups[position:] for item in rest])
                    return
                if self.settings.pipeline_depth and position + 1 < len(groups):
                    next_pass = self._first_pass(groups[position + 1])
                    ahead = self.ctx.ahead_thread.submit(self.steps.encode_ahead, batch, next_pass)
                for made, generated, started in self._generate(batch, group):
                    overlap.submit(partial(self._finish, batch, made, generated, started))

    def _first_pass(self, group: list[ClaimedItem]) -> list[Job]:
        """The jobs of a group's first forward pass, as ``_generate`` will make them."""
        return group_jobs(group)[:self.settings.micro_batch]

    def _cancel_requested(self, batch_id: str) -> bool:
        return self.ctx.in_ledger(lambda session: session.scalar(
            select(Batch.cancel_requested_at).where(Batch.id == batch_id)) is not None, what="the cancel flag")

    # -- per micro-batch ---------------------------------------------------------------

    def _generate(self, batch: BatchView, group: list[ClaimedItem]) -> Iterator[Generated]:
        """The group's images off the device. An engine error is an item's problem, not the worker's:
        a group of several items is re-run one by one, so one bad item fails alone."""
        started = time.perf_counter()
        jobs = group_jobs(group)
        try:
            generated = [image for first in range(0, len(jobs), self.settings.micro_batch)
                         for image in self.steps.generate(batch, jobs[first:first + self.settings.micro_batch])]
        except SoftTimeLimitExceeded:  # the task's deadline, not the items' fault: give them back
            raise
        except Exception as error:
            if len(group) > 1:
                log.warning("micro-batch of %d items failed (%s); retrying them one by one", len(group), error)
                for item in group:
                    yield from self._generate(batch, [item])
            else:
                self._item_error(batch, group[0], error, reason="engine")
            return
        yield group, generated, started

    def _finish(self, batch: BatchView, group: list[ClaimedItem], generated: list[GeneratedImage],
                started: float) -> None:
        """QC on the checker thread beside encode → store on this one, then record. Errors past
        encoding are the infrastructure's (storage, database): they fail the task, which gives
        its items back, rather than failing items that did nothing wrong."""
        outcomes = self.ctx.qc_thread.submit(self.steps.qc, batch, generated)
        rendered = self._encode(batch, group, generated)
        stored = self.steps.store(batch, rendered)
        by_image = {(image.item.id, image.index): outcome for image, outcome in zip(generated, outcomes.result())}
        self.steps.attach_qc(stored, [by_image[(image.item.id, image.rendered.index)] for image in stored])
        made = {image.item.id for image in rendered}
        self._record(batch, [item for item in group if item.id in made], stored, time.perf_counter() - started)

    def _encode(self, batch: BatchView, group: list[ClaimedItem],
                generated: list[GeneratedImage]) -> list[RenderedImage]:
        try:
            return self.steps.encode(batch, generated)
        except Exception as error:  # the encoder's: find the item(s) it fails for
            if len(group) == 1:
                self._item_error(batch, group[0], error, reason="encode")
                return []
            return [image for item in group
                    for image in self._encode(batch, [item], [g for g in generated if g.item.id == item.id])]

    def _item_error(self, batch: BatchView, item: ClaimedItem, error: Exception, *, reason: str) -> None:
        log.warning("item %s failed: %s", item.id, error)
        metrics.item_failure(reason)
        self._end_item(batch, item, ItemState.FAILED, f"{type(error).__name__}: {error}"[:ERROR_CHARS])

    def _record(self, batch: BatchView, group: list[ClaimedItem], stored: list[UploadedImage], duration: float) -> None:
        """Every row and audit event of the micro-batch in one transaction, with one chain-head update."""
        if not group:
            return
        began = time.perf_counter()

        def work(session: Session) -> set[str]:
            owned = leases.finish(session, [item.id for item in group], owner=self.owner,
                                  state=ItemState.SUCCEEDED, now=ledger_now(session))
            kept = [image for image in stored if image.item.id in owned]
            events = self.steps.record(session, batch, kept)
            events += [{"action": "item.generated", "actor": self.actor, "batch_id": batch.id, "item_id": item.id,
                        "payload": self._generated_payload(batch, item, [i for i in kept if i.item.id == item.id],
                                                           duration)}
                       for item in group if item.id in owned]
            audit.record_many(session, events)
            return owned

        # A retry after a commit whose answer was lost finds the items finished: it records nothing twice.
        owned = self.ctx.in_ledger(work, what="recording a micro-batch")
        lost = [item.id for item in group if item.id not in owned]
        if lost:
            log.warning("lease lost on %d items (another worker holds them now): %s", len(lost), lost)
        recorded = [image for image in stored if image.item.id in owned]
        with self._lock:
            self.held.difference_update(item.id for item in group)
            self.report.succeeded += len(owned)
            self.report.images += len(recorded)
        elapsed = time.perf_counter() - began
        self.report.seconds["ledger"] += elapsed
        metrics.observe_stage("ledger", elapsed)
        for image in recorded:
            verdict = image.qc.verdict if image.qc is not None else "review"
            metrics.image_recorded(image.rendered.record["model"], verdict)
        self.steps.remember_hashes(batch, recorded)

    def _generated_payload(self, batch: BatchView, item: ClaimedItem, images: list[UploadedImage],
                           duration: float) -> dict[str, Any]:
        # The model that made the item's images (their provenance), else the one the batch names.
        model = ({key: images[0].rendered.record[key] for key in ("model", "weights_sha256")} if images
                 else self.steps.identity(batch))
        payload = {
            **model, "code_version": code_version(),
            "prompt": item.prompt, "external_id": item.external_id, "seed": item.seed, "params": batch.params,
            "worker": self.worker, "task_id": self.task_id, "attempt": item.attempts,
            "duration_s": round(duration, 4), "sha256": [image.sha256 for image in images],
            "images": [{"image_id": image.id, "index": image.rendered.index, "seed": image.rendered.seed,
                        "storage_key": image.key, "sha256": image.sha256,
                        "credentials": image.rendered.credentials} for image in images],
        }
        refine = self.steps.refine_record(batch)
        if refine:
            payload["refine"] = refine
        return payload

    # -- ending items without images ---------------------------------------------------

    def _end_item(self, batch: BatchView, item: ClaimedItem, state: ItemState, error: str,
                  action: str = "item.failed") -> None:
        def work(session: Session) -> set[str]:
            owned = leases.finish(session, [item.id], owner=self.owner, state=state, now=ledger_now(session), error=error)
            if owned:
                audit.record(session, action, actor=self.actor, batch_id=batch.id, item_id=item.id,
                             payload={"error": error, "attempt": item.attempts, "task_id": self.task_id})
            return owned

        owned = self.ctx.in_ledger(work, what="ending an item")
        with self._lock:
            self.held.discard(item.id)
            self.report.failed += len(owned)

    def _cancel_held(self, batch: BatchView, items: list[ClaimedItem]) -> None:
        def work(session: Session) -> set[str]:
            owned = leases.finish(session, [item.id for item in items], owner=self.owner,
                                  state=ItemState.CANCELLED, now=ledger_now(session))
            if owned:
                audit.record(session, "items.cancelled", actor=self.actor, batch_id=batch.id,
                             payload={"items": sorted(owned), "task_id": self.task_id})
            return owned

        owned = self.ctx.in_ledger(work, what="cancelling items")
        with self._lock:
            self.held.difference_update(item.id for item in items)
            self.report.cancelled += len(owned)

    def _give_back_held(self, error: BaseException) -> None:
        """The task is failing (time limit, model, storage or database trouble): requeue what it holds.

        When a dependency stayed down past INFRA_RETRY_SECONDS, the attempts this run counted are
        given back too: an outage is not the items' fault and must not make them dead."""
        if not self.held:
            return
        reason = f"given back by {self.worker}: {type(error).__name__}: {error}"[:ERROR_CHARS]
        refund = sorted(self.held & self.counted) if is_transient(error) else []
        try:
            requeued = self.ctx.in_ledger(lambda session: leases.release(
                session, list(self.held), owner=self.owner, chunk_images=self.settings.chunk_images, reason=reason,
                refund=refund), what="giving items back")
            log.warning("gave back %d items to the queue (%d attempts refunded)", len(requeued), len(refund))
        except Exception:  # the database may be what failed: the lease expires and the sweeper requeues
            log.exception("could not give back %d items; the sweeper will requeue them", len(self.held))
            return
        self._dispatch_more()

    def _dispatch_more(self) -> None:
        """Refill the broker from the outbox: dispatch keeps only a bounded number of chunks in flight."""
        try:
            dispatch_pending(self.ctx.sessions, self.ctx.celery, self.settings)
        except Exception as error:  # the sweeper dispatches too
            log.warning("dispatch after the chunk failed (the sweeper will dispatch): %s", error)
