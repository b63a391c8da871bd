"""The image steps: render → store → check → record, as public methods the chunk runner and the
reviewer's regenerate (``worker/regenerate.py``) both call.

    render  one forward pass for a list of (item, index, seed) jobs, each image encoded as PNG
            with its provenance
    store   each PNG under its write-once key (several uploads at once)
    check   QC on the stored images; QC never fails generation
    record  the image row, its QC rows and the ``qc.verdict`` event, in the caller's transaction
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import audit, webhooks
from core.params import GenerationParams
from core.provenance import encode_png
from models import AuditEvent, Batch, Image, QcResult, Verdict, utcnow
from models.base import new_id
from worker import logo
from worker.context import WorkerContext
from worker.leases import ClaimedItem
from worker.records import object_metadata, provenance, storage_key
from worker.sealing import embedded_watermark_id

log = logging.getLogger(__name__)
Job = tuple[ClaimedItem, int, int]  # (item, image index, seed)


@dataclass
class BatchView:
    """What the steps need of a batch: its stored params, read once per task."""

    id: str
    params: dict[str, Any]
    generation_params: GenerationParams
    team: str | None = None
    submitted_hash: str | None = None  # the batch.submitted audit event's, linked from each manifest


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
    credentials: dict[str, Any] | None = None  # signed, watermarked or skipped (worker/sealing.py)


@dataclass
class UploadedImage:
    """A rendered image stored under its key, not yet recorded in the ledger."""

    id: str
    rendered: RenderedImage
    key: str
    sha256: str
    qc: Any = None  # qc.results.QcOutcome, or None when QC failed

    @property
    def item(self) -> ClaimedItem:
        return self.rendered.item


class ImageSteps:
    """The steps of one task, with the seconds spent per stage (``seconds``, read by the benchmark)."""

    def __init__(self, ctx: WorkerContext, *, actor: str):
        self.ctx = ctx
        self.actor = actor
        self.seconds: dict[str, float] = defaultdict(float)
        self._batches: dict[str, BatchView] = {}
        self._known_hashes: dict[str, dict[int, str]] = {}

    def batch(self, batch_id: str) -> BatchView:
        """The batch's params, and the perceptual hashes of its images so far (for duplicates)."""
        if batch_id not in self._batches:
            def read(session: Session) -> tuple[Any, list[Any]]:
                row = session.execute(select(Batch.params, Batch.team, AuditEvent.hash).outerjoin(
                    AuditEvent, (AuditEvent.batch_id == Batch.id) & (AuditEvent.action == "batch.submitted"))
                    .where(Batch.id == batch_id).limit(1)).first()
                hashes = session.execute(
                    select(Image.phash, Image.id).where(Image.batch_id == batch_id, Image.phash.is_not(None))
                ).all()
                return row, hashes

            row, hashes = self.ctx.in_ledger(read, what="reading the batch")
            params, team, submitted_hash = row if row is not None else ({}, None, None)
            params = params or {}
            self._batches[batch_id] = BatchView(batch_id, params, GenerationParams.from_batch(params), team,
                                                submitted_hash)
            self._known_hashes[batch_id] = {int(phash, 16): image_id for phash, image_id in hashes}
        return self._batches[batch_id]

    def render(self, batch: BatchView, jobs: list[Job]) -> list[RenderedImage]:
        """One forward pass for every job, each image encoded as PNG with its provenance."""
        model = self.ctx.model
        result = model.generate([item.prompt for item, _, _ in jobs], [seed for _, _, seed in jobs], batch.generation_params)
        began = time.perf_counter()
        pictures = logo.stamp(self.ctx, batch.generation_params, jobs, result.images)  # before QC and encoding
        identity = {"model": model.model_id, "weights_sha256": model.weights_sha256}
        extra = {**(model.refiner_identity() if batch.generation_params.refine_options else {}),
                 **logo.provenance(batch.generation_params)} or None
        records = [
            provenance(item_id=item.id, batch_id=item.batch_id, external_id=item.external_id, prompt=item.prompt,
                       seed=seed, index=index, params=batch.generation_params.canonical(), extra=extra, **identity)
            for item, index, seed in jobs
        ]
        marked = [self.ctx.sealer.mark(picture, record) for picture, record in zip(pictures, records)]
        pngs = [encode_png(picture, record) for (picture, _), record in zip(marked, records)]
        signed = [self.ctx.sealer.sign(png, "image/png", record, mark, team=batch.team,
                                       submitted_hash=batch.submitted_hash)
                  for png, (_, mark), record in zip(pngs, marked, records)]
        stages = {**result.seconds, "encode": time.perf_counter() - began}
        for name, seconds in stages.items():
            self.seconds[name] += seconds
        return [
            RenderedImage(item, index, seed, picture, flag, png, record,
                          {name: seconds / len(jobs) for name, seconds in stages.items()}, state)
            for (item, index, seed), (picture, _), flag, (png, state), record
            in zip(jobs, marked, result.nsfw_flags, signed, records)
        ]

    def store(self, rendered: list[RenderedImage]) -> list[UploadedImage]:
        """Each image under its deterministic key (a redelivered chunk adopts the object already there)."""
        def put(image: RenderedImage) -> UploadedImage:
            return self.upload(image, storage_key(image.item.batch_id, image.item.seq, image.item.id, image.index))

        began = time.perf_counter()
        # Uploads are network-bound: several at once (boto3 clients are thread-safe).
        stored = list(self.ctx.uploads.map(put, rendered)) if len(rendered) > 1 else [put(i) for i in rendered]
        self._time("store", began, stored)
        return stored

    def upload(self, image: RenderedImage, key: str, *, image_id: str | None = None,
               metadata: dict[str, Any] | None = None) -> UploadedImage:
        """One image under ``key``; ``metadata`` adds to its provenance in the object's metadata."""
        metadata = object_metadata({**image.record, **(metadata or {})})
        result = self.ctx.retry(lambda: self.ctx.store.put(key, image.png, metadata), what=f"storing {key}")
        return UploadedImage(image_id or new_id(), image, key, result.sha256)

    def check(self, batch: BatchView, stored: list[UploadedImage]) -> None:
        """QC every image (``image.qc``); a QC error sends the images to a human instead of failing them."""
        if not stored:
            return
        began = time.perf_counter()
        try:
            outcomes = self.ctx.quality_checker.check([image.rendered.picture for image in stored],
                                     [image.item.prompt for image in stored],
                                     nsfw_flags=[image.rendered.nsfw for image in stored],
                                     known_hashes=self._known_hashes[batch.id])
        except SoftTimeLimitExceeded:
            raise
        except Exception:  # QC never fails generation: the images go to a human instead
            log.exception("QC failed for %d images of batch %s", len(stored), batch.id)
            outcomes = [None] * len(stored)
        for image, outcome in zip(stored, outcomes):
            image.qc = outcome
        self._time("qc", began, stored)

    def record(self, session: Session, batch: BatchView, image: UploadedImage) -> None:
        """The image row with its QC rows and the ``qc.verdict`` event, in the caller's transaction."""
        model = self.ctx.model
        outcome = image.qc
        verdict = outcome.verdict if outcome is not None else "review"  # QC failed: a human looks
        reasons = list(outcome.reasons) if outcome is not None else ["qc_error"]
        phash = outcome.to_dict()["phash"] if outcome is not None else None
        rendered = image.rendered
        session.add(Image(
            id=image.id, item_id=image.item.id, batch_id=batch.id, index=rendered.index, seed=rendered.seed,
            storage_key=image.key, sha256=image.sha256, width=rendered.picture.width, height=rendered.picture.height,
            model_id=model.model_id, weights_sha256=model.weights_sha256, refine=self.refine_record(batch),
            timings={name: round(value, 6) for name, value in rendered.timings.items()},
            phash=phash, qc_verdict=verdict, qc_reasons=reasons, created_at=utcnow(),
            watermark_id=embedded_watermark_id(rendered.credentials), credentials=rendered.credentials,
        ))
        if verdict != Verdict.PASS:
            webhooks.enqueue_for_batch(session, webhooks.IMAGE_FLAGGED, batch.id, {
                "image_id": image.id, "item_id": image.item.id, "external_id": image.item.external_id,
                "verdict": verdict, "reasons": reasons})
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

    def remember_hashes(self, batch: BatchView, recorded: list[UploadedImage]) -> None:
        """Recorded images count as known for the duplicate check of the task's later micro-batches."""
        for image in recorded:
            if image.qc is not None and image.qc.phash is not None:
                self._known_hashes[batch.id][image.qc.phash] = image.id

    def refine_record(self, batch: BatchView) -> dict[str, Any] | None:
        """The refine settings and the refiner's identity, when the batch refines."""
        options = batch.generation_params.refine_options
        return {**options, **self.ctx.model.refiner_identity()} if options else None

    def _time(self, stage: str, began: float, images: list[UploadedImage]) -> None:
        elapsed = time.perf_counter() - began
        self.seconds[stage] += elapsed
        for image in images:
            image.rendered.timings[stage] = elapsed / len(images)
