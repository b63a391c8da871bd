"""One task's work: claim a chunk's items, generate them micro-batch by micro-batch, store, check, record.

    claim (one UPDATE, lease) → screen prompts → per micro-batch: [cancel?] → generate (one
    forward pass, per-image seeds) → encode PNG with provenance → store (write-once key) →
    QC → items succeeded (only while we hold the lease) + image rows + audit events
    → batch complete? (one guarded UPDATE) → webhook

A Python exception in a micro-batch of several items re-runs its items one by one, so one bad
item fails alone. A chunk whose items ran before without finishing (the worker died) is claimed
and run one item at a time, so a prompt that kills the process takes only itself to ``dead``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from core import audit
from core.dispatch import dispatch_pending
from core.ledger import image_seed
from core.provenance import encode_png
from models import Batch, Image, Item, ItemState, QcResult, utcnow
from models.base import new_id
from worker import leases
from worker.completion import complete_if_done
from worker.context import WorkerContext, worker_identity
from worker.engine import GenerationParams
from worker.leases import ClaimedItem
from worker.records import object_metadata, provenance, storage_key
from worker.version import code_version

log = logging.getLogger(__name__)
ERROR_CHARS = 2000


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


@dataclass
class BatchView:
    id: str
    params: dict[str, Any]
    generation: GenerationParams


@dataclass
class RenderedImage:
    """A generated image, encoded as PNG with its provenance."""

    item: ClaimedItem
    index: int
    seed: int
    picture: Any  # PIL image, for QC
    nsfw: bool
    png: bytes
    record: dict[str, Any]
    timings: dict[str, float]


@dataclass
class StoredImage:
    """A rendered image stored under its key, not yet recorded in the ledger."""

    id: str
    rendered: RenderedImage
    key: str
    sha256: str
    qc: Any = None  # qc.results.QcOutcome, or None without QC

    @property
    def item(self) -> ClaimedItem:
        return self.rendered.item


class ChunkRunner:
    def __init__(self, ctx: WorkerContext, task_id: str):
        self.ctx = ctx
        self.settings = ctx.settings
        self.task_id = task_id
        self.worker = worker_identity()
        self.owner = leases.lease_owner(self.worker, task_id)
        self.actor = f"worker:{self.worker}"
        self.report = ChunkReport()
        self.held: set[str] = set()
        self.touched_batches: set[str] = set()
        self._batches: dict[str, BatchView] = {}
        self._known_hashes: dict[str, dict[int, str]] = {}

    # -- the task ----------------------------------------------------------------------

    def run(self, item_ids: Sequence[str]) -> ChunkReport:
        try:
            self._settle(item_ids)
            self._claim_and_generate(item_ids, isolate=self._ran_before(item_ids))
        except BaseException as error:
            self._give_back_held(error)
            raise
        for batch_id in sorted(self.touched_batches):
            complete_if_done(self.ctx.sessions, batch_id, actor=self.actor, settings=self.settings)
        return self.report

    def _settle(self, item_ids: Sequence[str]) -> None:
        with self.ctx.sessions() as session:
            settled = leases.settle_unclaimable(session, item_ids, self.task_id, self.settings.max_attempts, utcnow())
            for item_id, batch_id in settled.dead:
                audit.record(session, "item.dead", actor=self.actor, batch_id=batch_id, item_id=item_id,
                             payload={"error": leases.dead_error(self.settings.max_attempts),
                                      "max_attempts": self.settings.max_attempts})
            session.commit()
        self.report.dead += len(settled.dead)
        self.report.cancelled += len(settled.cancelled)
        self.touched_batches.update(batch_id for _, batch_id in settled.dead + settled.cancelled)

    def _ran_before(self, item_ids: Sequence[str]) -> bool:
        with self.ctx.sessions() as session:
            return session.scalar(
                select(Item.id).where(Item.id.in_(list(item_ids)), Item.attempts > 0,
                                      Item.state.in_([ItemState.QUEUED.value, ItemState.RUNNING.value])).limit(1)
            ) is not None

    def _claim_and_generate(self, item_ids: Sequence[str], isolate: bool) -> None:
        """Claim the chunk in one UPDATE; generate it by micro-batches, or item by item when isolating.

        Isolating (some item ran before and never finished: the worker died), every item is held
        from the start, so a crash leaves them all under this lease for the sweeper to requeue;
        but an item's attempt is counted only when its own turn comes, so only the item that
        kills the process runs out of attempts.
        """
        with self.ctx.sessions() as session:
            items = leases.claim(session, item_ids, owner=self.owner, task_id=self.task_id,
                                 lease_seconds=self.settings.lease_seconds, max_attempts=self.settings.max_attempts,
                                 now=utcnow(), count_attempt=not isolate)
            session.commit()
        self.held.update(item.id for item in items)
        self.report.claimed += len(items)
        if items:
            self.ctx.engine.load()  # a model that cannot load is the worker's fault: raise, give back
        for batch_id in dict.fromkeys(item.batch_id for item in items):
            self.touched_batches.add(batch_id)
            batch = self._batch(batch_id)
            allowed = self._screen(batch, [item for item in items if item.batch_id == batch_id])
            if not isolate:
                self._generate_items(batch, allowed)
                continue
            for item in allowed:
                counted = self._count_attempt(item)
                if counted is not None:
                    self._generate_items(batch, [counted])

    def _count_attempt(self, item: ClaimedItem) -> ClaimedItem | None:
        with self.ctx.sessions() as session:
            attempts = leases.count_attempt(session, item.id, owner=self.owner)
            session.commit()
        return None if attempts is None else dataclasses.replace(item, attempts=attempts)

    # -- per batch ---------------------------------------------------------------------

    def _batch(self, batch_id: str) -> BatchView:
        if batch_id not in self._batches:
            with self.ctx.sessions() as session:
                params = session.scalar(select(Batch.params).where(Batch.id == batch_id)) or {}
                hashes = session.execute(
                    select(Image.phash, Image.id).where(Image.batch_id == batch_id, Image.phash.is_not(None))
                ).all()
            self._batches[batch_id] = BatchView(batch_id, params, GenerationParams.from_batch(params))
            self._known_hashes[batch_id] = {int(phash, 16): image_id for phash, image_id in hashes}
        return self._batches[batch_id]

    def _screen(self, batch: BatchView, items: list[ClaimedItem]) -> list[ClaimedItem]:
        allowed = []
        for item in items:
            reason = self.ctx.screen(item.prompt)
            if reason is None:
                allowed.append(item)
            else:
                self._end_item(batch, item, ItemState.FAILED, reason, action="item.blocked")
        return allowed

    def _generate_items(self, batch: BatchView, items: list[ClaimedItem]) -> None:
        groups = list(pack(items, self.settings.micro_batch))
        for position, group in enumerate(groups):
            if self._cancel_requested(batch.id):
                self._cancel_held(batch, [item for rest in groups[position:] for item in rest])
                return
            self._renew_lease()
            self._process(batch, group)

    def _cancel_requested(self, batch_id: str) -> bool:
        with self.ctx.sessions() as session:
            return session.scalar(select(Batch.cancel_requested_at).where(Batch.id == batch_id)) is not None

    def _renew_lease(self) -> None:
        with self.ctx.sessions() as session:
            leases.renew(session, list(self.held), owner=self.owner,
                         lease_seconds=self.settings.lease_seconds, now=utcnow())
            session.commit()

    # -- per micro-batch ---------------------------------------------------------------

    def _process(self, batch: BatchView, group: list[ClaimedItem]) -> None:
        started = time.perf_counter()
        try:
            rendered = self._render(batch, group)
        except SoftTimeLimitExceeded:  # the task's deadline, not the items' fault: give them back
            raise
        except Exception as error:  # the engine's or the encoder's: an item's problem, not the worker's
            if len(group) > 1:
                log.warning("micro-batch of %d items failed (%s); retrying them one by one", len(group), error)
                for item in group:
                    self._process(batch, [item])
            else:
                log.warning("item %s failed: %s", group[0].id, error)
                self._end_item(batch, group[0], ItemState.FAILED, f"{type(error).__name__}: {error}"[:ERROR_CHARS])
            return
        # From here on, errors are the infrastructure's (storage, database): the task fails and
        # gives its items back, rather than failing items that did nothing wrong.
        stored = self._store(rendered)
        self._check_quality(batch, stored)
        self._record(batch, group, stored, time.perf_counter() - started)

    def _render(self, batch: BatchView, group: list[ClaimedItem]) -> list[RenderedImage]:
        """Generate every image of the group (micro_batch images per forward pass) and encode it."""
        jobs = [(item, index, image_seed(item.seed, index)) for item in group for index in range(item.num_images)]
        rendered: list[RenderedImage] = []
        for start in range(0, len(jobs), self.settings.micro_batch):
            rendered.extend(self._render_pass(batch, jobs[start:start + self.settings.micro_batch]))
        return rendered

    def _render_pass(self, batch: BatchView, jobs: list[tuple[ClaimedItem, int, int]]) -> list[RenderedImage]:
        engine = self.ctx.engine
        result = engine.generate([item.prompt for item, _, _ in jobs], [seed for _, _, seed in jobs], batch.generation)
        began = time.perf_counter()
        identity = {"model": engine.model_id, "weights_sha256": engine.weights_sha256}
        extra = engine.refiner_identity() if batch.generation.refine else None
        records = [
            provenance(item_id=item.id, batch_id=item.batch_id, external_id=item.external_id, prompt=item.prompt,
                       seed=seed, index=index, params=batch.generation.canonical(), extra=extra, **identity)
            for item, index, seed in jobs
        ]
        pngs = [encode_png(picture, record) for picture, record in zip(result.images, records)]
        stages = {**result.seconds, "encode": time.perf_counter() - began}
        for name, seconds in stages.items():
            self.report.seconds[name] += seconds
        return [
            RenderedImage(item, index, seed, picture, flag, png, record,
                          {name: seconds / len(jobs) for name, seconds in stages.items()})
            for (item, index, seed), picture, flag, png, record
            in zip(jobs, result.images, result.nsfw_flags, pngs, records)
        ]

    def _store(self, rendered: list[RenderedImage]) -> list[StoredImage]:
        began = time.perf_counter()

        def put(image: RenderedImage) -> StoredImage:
            key = storage_key(image.item.batch_id, image.item.seq, image.item.id, image.index)
            result = self.ctx.store.put(key, image.png, object_metadata(image.record))
            return StoredImage(new_id(), image, key, result.sha256)

        # Uploads are network-bound: several at once (boto3 clients are thread-safe).
        stored = list(self.ctx.uploads.map(put, rendered)) if len(rendered) > 1 else [put(i) for i in rendered]
        elapsed = time.perf_counter() - began
        self.report.seconds["store"] += elapsed
        for image in stored:
            image.rendered.timings["store"] = elapsed / len(stored)
        return stored

    def _check_quality(self, batch: BatchView, stored: list[StoredImage]) -> None:
        checker = self.ctx.quality_checker
        if checker is None or not stored:
            return
        began = time.perf_counter()
        try:
            outcomes = checker.check([image.rendered.picture for image in stored],
                                     [image.item.prompt for image in stored],
                                     nsfw_flags=[image.rendered.nsfw for image in stored],
                                     known_hashes=self._known_hashes[batch.id])
        except SoftTimeLimitExceeded:
            raise
        except Exception:  # QC never fails generation: the images go to a human instead
            log.exception("QC failed for %d images of batch %s", len(stored), batch.id)
            outcomes = [None] * len(stored)
        elapsed = time.perf_counter() - began
        self.report.seconds["qc"] += elapsed
        for image, outcome in zip(stored, outcomes):
            image.qc = outcome
            image.rendered.timings["qc"] = elapsed / len(stored)

    def _record(self, batch: BatchView, group: list[ClaimedItem], stored: list[StoredImage], duration: float) -> None:
        began = time.perf_counter()
        engine = self.ctx.engine
        with self.ctx.sessions() as session:
            owned = leases.finish(session, [item.id for item in group], owner=self.owner,
                                  state=ItemState.SUCCEEDED, now=utcnow())
            for image in stored:
                if image.item.id in owned:
                    self._add_image(session, batch, image)
            for item in group:
                if item.id in owned:
                    images = [image for image in stored if image.item.id == item.id]
                    audit.record(session, "item.generated", actor=self.actor, batch_id=batch.id, item_id=item.id,
                                 payload=self._generated_payload(batch, item, images, duration, engine))
            session.commit()
        lost = [item.id for item in group if item.id not in owned]
        if lost:
            log.warning("lease lost on %d items (another worker holds them now): %s", len(lost), lost)
        self.held.difference_update(item.id for item in group)
        self.report.succeeded += len(owned)
        self.report.images += sum(1 for image in stored if image.item.id in owned)
        self.report.seconds["ledger"] += time.perf_counter() - began
        for image in stored:
            if image.qc is not None and image.qc.phash is not None:
                self._known_hashes[batch.id][image.qc.phash] = image.id

    def _add_image(self, session: Any, batch: BatchView, image: StoredImage) -> None:
        engine = self.ctx.engine
        outcome = image.qc
        verdict = outcome.verdict if outcome is not None else ("review" if self.ctx.quality_checker else None)
        reasons = list(outcome.reasons) if outcome is not None else (["qc_error"] if verdict else None)
        phash = outcome.to_dict()["phash"] if outcome is not None else None
        rendered = image.rendered
        session.add(Image(
            id=image.id, item_id=image.item.id, batch_id=batch.id, index=rendered.index, seed=rendered.seed,
            storage_key=image.key, sha256=image.sha256, width=rendered.picture.width, height=rendered.picture.height,
            model_id=engine.model_id, weights_sha256=engine.weights_sha256,
            refine={**batch.generation.refine, **engine.refiner_identity()} if batch.generation.refine else None,
            timings={name: round(value, 6) for name, value in rendered.timings.items()},
            phash=phash, qc_verdict=verdict, qc_reasons=reasons, created_at=utcnow(),
        ))
        if outcome is None:
            return
        session.flush()  # the image row first: qc_results point at it
        for result in outcome.results:
            row = result.to_dict()
            session.add(QcResult(image_id=image.id, scorer=row["scorer"], scorer_version=row["version"],
                                 metrics=row["metrics"], thresholds=row["thresholds"], verdict=row["verdict"],
                                 reasons=row["reasons"], created_at=utcnow()))
        audit.record(session, "qc.verdict", actor=self.actor, batch_id=batch.id, item_id=image.item.id,
                     image_id=image.id, payload={
                         "verdict": verdict, "reasons": reasons, "advisories": list(outcome.advisories),
                         "phash": phash,
                         "scorers": [{"scorer": r.scorer, "version": r.version, "verdict": r.verdict}
                                     for r in outcome.results],
                         "notes": list(getattr(outcome, "notes", []) or []),
                     })

    def _generated_payload(self, batch: BatchView, item: ClaimedItem, images: list[StoredImage], duration: float,
                           engine: Any) -> dict[str, Any]:
        payload = {
            "model": engine.model_id, "weights_sha256": engine.weights_sha256, "code_version": code_version(),
            "prompt": item.prompt, "external_id": item.external_id, "seed": item.seed, "params": batch.params, "worker": self.worker, "task_id": self.task_id,
            "attempt": item.attempts, "duration_s": round(duration, 4),
            "sha256": [image.sha256 for image in images],
            "images": [{"image_id": image.id, "index": image.rendered.index, "seed": image.rendered.seed,
                        "storage_key": image.key, "sha256": image.sha256} for image in images],
        }
        if batch.generation.refine:
            payload["refine"] = {**batch.generation.refine, **engine.refiner_identity()}
        return payload

    # -- ending items without images ---------------------------------------------------

    def _end_item(self, batch: BatchView, item: ClaimedItem, state: ItemState, error: str,
                  action: str = "item.failed") -> None:
        with self.ctx.sessions() as session:
            owned = leases.finish(session, [item.id], owner=self.owner, state=state, now=utcnow(), error=error)
            if owned:
                audit.record(session, action, actor=self.actor, batch_id=batch.id, item_id=item.id,
                             payload={"error": error, "attempt": item.attempts, "task_id": self.task_id})
            session.commit()
        self.held.discard(item.id)
        if owned:
            self.report.failed += 1

    def _cancel_held(self, batch: BatchView, items: list[ClaimedItem]) -> None:
        with self.ctx.sessions() as session:
            owned = leases.finish(session, [item.id for item in items], owner=self.owner,
                                  state=ItemState.CANCELLED, now=utcnow())
            if owned:
                audit.record(session, "items.cancelled", actor=self.actor, batch_id=batch.id,
                             payload={"items": sorted(owned), "task_id": self.task_id})
            session.commit()
        self.held.difference_update(item.id for item in items)
        self.report.cancelled += len(owned)

    def _give_back_held(self, error: BaseException) -> None:
        """The task is failing (time limit, model, storage or database trouble): requeue what it holds."""
        if not self.held:
            return
        reason = f"given back by {self.worker}: {type(error).__name__}: {error}"[:ERROR_CHARS]
        try:
            with self.ctx.sessions() as session:
                requeued = leases.release(session, list(self.held), owner=self.owner,
                                          chunk_images=self.settings.chunk_images, reason=reason)
                session.commit()
            log.warning("gave back %d items to the queue", len(requeued))
            dispatch_pending(self.ctx.sessions, self.ctx.celery)
        except Exception:  # the database may be what failed: the lease expires and the sweeper requeues
            log.exception("could not give back %d items; the sweeper will requeue them", len(self.held))


def pack(items: Sequence[ClaimedItem], limit: int) -> Iterator[list[ClaimedItem]]:
    """Whole items in order, at most ``limit`` images per group (a bigger item goes alone)."""
    group: list[ClaimedItem] = []
    images = 0
    for item in items:
        if group and images + item.num_images > limit:
            yield group
            group, images = [], 0
        group.append(item)
        images += item.num_images
    if group:
        yield group
