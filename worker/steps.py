"""The image steps, as public stage functions the chunk runner and the reviewer's regenerate
(``worker/regenerate.py``) both call:

    generate  one forward pass for a list of (item, index, seed) jobs; a pass that runs out of
              device memory is split in half, down to one image ("Out of device memory")
    encode    each image watermarked and in the batch's format with its provenance, in the worker's
              encoder pool (worker/sealing.py, core.provenance.encode_image), then signed
    store     each file under its write-once key (several uploads at once)
    check     QC on the stored images; QC never fails generation
    record    the image rows and their QC rows, bulk-inserted in the caller's transaction; returns
              the ``qc.verdict`` events for the caller to append with its own in one chain update

``render`` is generate + encode, for a caller that does not overlap them.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from core import webhooks
from core.canary import item_params
from core.params import GenerationParams
from core.provenance import CONTENT_TYPES, Encoding
from models import AuditEvent, Batch, Image, ImagePhashBand, QcResult, Verdict, utcnow
from models.base import new_id
from qc.phash import BAND_MAX_DISTANCE, HashIndex
from qc.results import phash_to_hex
from worker import logo, metrics
from worker.context import WorkerContext
from worker.duplicates import LedgerHashIndex, band_rows
from worker.leases import ClaimedItem
from worker.records import object_metadata, provenance, storage_key
from worker.sealing import embedded_watermark_id, mark_id, seal

log = logging.getLogger(__name__)
Job = tuple[ClaimedItem, int, int]  # (item, image index, seed)


@dataclass
class BatchView:
    """What the steps need of a batch: its stored params, read once per task."""

    id: str
    params: dict[str, Any]
    generation_params: GenerationParams
    encoding: Encoding = field(default_factory=Encoding)
    team: str | None = None
    submitted_hash: str | None = None  # the batch.submitted audit event's, linked from each manifest
    canary: dict[str, Any] | None = None  # batches.canary: the candidate's params (core/canary.py)


@dataclass
class GeneratedImage:
    """An image off the device, with the provenance its file will carry."""

    item: ClaimedItem
    index: int
    seed: int
    picture: Any  # PIL image, for QC and the encoder
    nsfw: bool
    record: dict[str, Any]
    timings: dict[str, float]


@dataclass
class RenderedImage(GeneratedImage):
    """A generated image encoded in its batch's format."""

    data: bytes = b""
    content_type: str = "image/png"
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


def is_out_of_memory(error: BaseException) -> bool:
    """torch.cuda.OutOfMemoryError, told by name so this module never imports torch."""
    return any(kind.__name__ == "OutOfMemoryError" for kind in type(error).__mro__)


class ImageSteps:
    """The steps of one task, with the seconds spent per stage (``seconds``, read by the benchmark)."""

    def __init__(self, ctx: WorkerContext, *, actor: str):
        self.ctx = ctx
        self.actor = actor
        self.seconds: dict[str, float] = defaultdict(float)
        self._batches: dict[str | tuple[str, str], BatchView] = {}  # by id, and (id, model) for canary items
        self._known_hashes: dict[str, HashIndex] = {}  # only with a duplicate threshold past the bands

    def batch(self, batch_id: str, model: str | None = None) -> BatchView:
        """The batch's params, read once per task; with ``model`` (an item's ``items.model``), the params
        that model runs the batch with (the canary's, core/canary.py), so ``params.model`` names it."""
        if batch_id not in self._batches:
            def read(session: Session) -> Any:
                return session.execute(select(Batch.params, Batch.team, AuditEvent.hash, Batch.canary).outerjoin(
                    AuditEvent, (AuditEvent.batch_id == Batch.id) & (AuditEvent.action == "batch.submitted"))
                    .where(Batch.id == batch_id).limit(1)).first()

            row = self.ctx.in_ledger(read, what="reading the batch")
            params, team, submitted_hash, canary = row if row is not None else ({}, None, None, None)
            params = params or {}
            generation = GenerationParams.from_batch(params)
            encoding = Encoding(generation.output.format, generation.output.quality,
                                self.ctx.settings.png_compress_level)
            self._batches[batch_id] = BatchView(batch_id, params, generation, encoding, team, submitted_hash, canary)
        view = self._batches[batch_id]
        if model is None:
            return view
        if (batch_id, model) not in self._batches:
            params = item_params(view.params, view.canary, model)
            self._batches[(batch_id, model)] = replace(view, params=params,
                                                       generation_params=GenerationParams.from_batch(params))
        return self._batches[(batch_id, model)]

    def known_hashes(self, batch_id: str) -> HashIndex:
        """The batch's recorded pHashes for the duplicate check: an indexed query per image
        (worker/duplicates.py); the whole batch's, loaded once per task, only when the duplicate
        threshold is wider than the bands can find."""
        if self.ctx.quality_checker.settings.duplicate_max_distance <= BAND_MAX_DISTANCE:
            return LedgerHashIndex(lambda work: self.ctx.in_ledger(work, what="the duplicate look-up"), batch_id)
        if batch_id not in self._known_hashes:
            rows = self.ctx.in_ledger(lambda session: session.execute(
                select(Image.phash, Image.id).where(Image.batch_id == batch_id, Image.phash.is_not(None))).all(),
                what="reading the batch's pHashes")
            self._known_hashes[batch_id] = HashIndex({int(phash, 16): image_id for phash, image_id in rows})
        return self._known_hashes[batch_id]

    def render(self, batch: BatchView, jobs: list[Job], *, model: str | None = None) -> list[RenderedImage]:
        """generate, then encode."""
        return self.encode(batch, self.generate(batch, jobs, model=model))

    def generate(self, batch: BatchView, jobs: list[Job], *, pad: bool = True,
                 model: str | None = None) -> list[GeneratedImage]:
        """One forward pass of one registry model (``model``, else the batch's ``params.model``) for every
        job. Out of device memory, the pass is split in half (down to one image), each half unpadded:
        padding back up would run out of memory again."""
        try:
            return self._generate_once(batch, jobs, pad, model)
        except SoftTimeLimitExceeded:
            raise
        except Exception as error:
            if not is_out_of_memory(error) or len(jobs) == 1:
                raise
            half = len(jobs) // 2
            log.warning("out of device memory with %d images; splitting into %d + %d", len(jobs), half,
                        len(jobs) - half)
            metrics.item_failure("oom_split")
            self.ctx.model.free_cache()
            return (self.generate(batch, jobs[:half], pad=False, model=model)
                    + self.generate(batch, jobs[half:], pad=False, model=model))

    def identity(self, batch: BatchView, model: str | None = None) -> dict[str, str]:
        """The registry name and weights sha256 of the model that runs for ``model`` (else the batch's
        ``params.model``): what provenance, the image row and the audit event record."""
        return self.ctx.model.identity(model if model is not None else batch.generation_params.model)

    def encode_ahead(self, batch: BatchView, jobs: list[Job]) -> None:
        """The text encoding of a coming ``generate(batch, jobs)``, now: the chunk runner runs it on another
        thread beside the pass before (worker/chunk.py). A failure here costs nothing: generate encodes."""
        ahead = getattr(self.ctx.model, "encode_ahead", None)  # an engine without one (bench/sim.py)
        if ahead is None:
            return
        try:
            ahead([item.prompt for item, _, _ in jobs], model=batch.generation_params.model)
        except Exception as error:
            log.warning("encoding the next pass's prompts ahead failed (generate will): %s", error)

    def _generate_once(self, batch: BatchView, jobs: list[Job], pad: bool, name: str | None) -> list[GeneratedImage]:
        model = self.ctx.model
        # Keywords only when they differ from the defaults: engines that never split (or serve one model,
        # bench/sim.py) need not know them. Without ``model`` the runner runs ``params.model``.
        options = {**({} if pad else {"pad": False}), **({} if name is None else {"model": name})}
        result = model.generate([item.prompt for item, _, _ in jobs], [seed for _, _, seed in jobs],
                                batch.generation_params, **options)
        pictures = logo.stamp(self.ctx, batch.generation_params, jobs, result.images)  # before QC and encoding
        identity = result.identity or self.identity(batch, name)  # the runner says which model it ran
        extra = {**(model.refiner_identity() if batch.generation_params.refine_options else {}),
                 **logo.provenance(batch.generation_params)} or None
        for name, seconds in result.seconds.items():
            self.seconds[name] += seconds
            metrics.observe_stage(name, seconds)
        return [
            GeneratedImage(item, index, seed, picture, flag, provenance(
                item_id=item.id, batch_id=item.batch_id, external_id=item.external_id, prompt=item.prompt,
                seed=seed, index=index, params=batch.generation_params.canonical(), extra=extra, **identity),
                {name: seconds / len(jobs) for name, seconds in result.seconds.items()})
            for (item, index, seed), picture, flag in zip(jobs, pictures, result.nsfw_flags)
        ]

    def encode(self, batch: BatchView, images: list[GeneratedImage]) -> list[RenderedImage]:
        """Each image watermarked, put in the batch's format with its provenance and signed with its Content
        Credentials (together, in the worker's encoder pool: worker/sealing.py), before anything hashes or
        stores it (docs/architecture.md, "Content Credentials")."""
        began = time.perf_counter()
        signing = [self.ctx.sealer.signing(image.record, team=batch.team, submitted_hash=batch.submitted_hash)
                   for image in images]
        signed = list(self.ctx.encoders.map(seal, [image.picture for image in images],
                                            [mark_id(image.record) for image in images],
                                            [batch.encoding] * len(images), [image.record for image in images],
                                            signing))
        content_type = CONTENT_TYPES[batch.encoding.format]
        elapsed = time.perf_counter() - began
        self.seconds["encode"] += elapsed
        metrics.observe_stage("encode", elapsed)
        for image in images:
            image.timings["encode"] = elapsed / len(images)
        return [RenderedImage(**{name: getattr(image, name) for name in GeneratedImage.__dataclass_fields__},
                              data=data, content_type=content_type, credentials=state)
                for image, (data, state) in zip(images, signed)]

    def store(self, batch: BatchView, rendered: list[RenderedImage]) -> list[UploadedImage]:
        """Each image under its deterministic key (a redelivered chunk adopts the object already there)."""
        def put(image: RenderedImage) -> UploadedImage:
            item = image.item
            return self.upload(image, storage_key(item.batch_id, item.seq, item.id, image.index,
                                                  extension=batch.encoding.extension))

        began = time.perf_counter()
        # Uploads are network-bound: several at once (boto3 clients are thread-safe).
        stored = list(self.ctx.uploads.map(put, rendered)) if len(rendered) > 1 else [put(i) for i in rendered]
        self._time("store", began, stored)
        return stored

    def upload(self, image: RenderedImage, key: str, *, image_id: str | None = None,
               metadata: dict[str, Any] | None = None) -> UploadedImage:
        """One image under ``key``; ``metadata`` adds to its provenance in the object's metadata."""
        metadata = object_metadata({**image.record, **(metadata or {})})
        result = self.ctx.retry(lambda: self.ctx.store.put(key, image.data, metadata, image.content_type), what=f"storing {key}")
        return UploadedImage(image_id or new_id(), image, key, result.sha256)

    def check(self, batch: BatchView, stored: list[UploadedImage]) -> None:
        """QC every image (``image.qc``); a QC error sends the images to a human instead of failing them."""
        self.attach_qc(stored, self.qc(batch, [image.rendered for image in stored]))

    def qc(self, batch: BatchView, images: list[GeneratedImage]) -> list[Any]:
        """The QC outcomes of generated images (None each when QC itself failed). Needs only the
        pixels, so it can run beside encode and store (worker/chunk.py)."""
        if not images:
            return []
        began = time.perf_counter()
        try:
            outcomes = self.ctx.quality_checker.check([image.picture for image in images],
                                                      [image.item.prompt for image in images],
                                                      nsfw_flags=[image.nsfw for image in images],
                                                      known_hashes=self.known_hashes(batch.id))
        except SoftTimeLimitExceeded:
            raise
        except Exception:  # QC never fails generation: the images go to a human instead
            log.exception("QC failed for %d images of batch %s", len(images), batch.id)
            outcomes = [None] * len(images)
        elapsed = time.perf_counter() - began
        self.seconds["qc"] += elapsed
        metrics.observe_stage("qc", elapsed)
        for image in images:
            image.timings["qc"] = elapsed / len(images)
        return outcomes

    @staticmethod
    def attach_qc(stored: list[UploadedImage], outcomes: list[Any]) -> None:
        for image, outcome in zip(stored, outcomes):
            image.qc = outcome
            image.rendered.timings.setdefault("qc", 0.0)

    def record(self, session: Session, batch: BatchView, images: list[UploadedImage], *,
               parent_image_id: str | None = None) -> list[dict[str, Any]]:
        """The image rows and their QC rows, bulk-inserted in the caller's transaction; returns the
        ``qc.verdict`` events, for the caller to append with its own (core.audit.record_many)."""
        if not images:
            return []
        now = utcnow()
        session.execute(insert(Image), [self._image_row(batch, image, parent_image_id, now) for image in images])
        qc_rows = [{"image_id": image.id, "scorer": row["scorer"], "scorer_version": row["version"],
                    "metrics": row["metrics"], "thresholds": row["thresholds"], "verdict": row["verdict"],
                    "reasons": row["reasons"], "created_at": now}
                   for image in images if image.qc is not None
                   for row in (result.to_dict() for result in image.qc.results)]
        if qc_rows:
            session.execute(insert(QcResult), qc_rows)
        bands = [row for image in images if image.qc is not None and image.qc.phash is not None
                 for row in band_rows(batch.id, image.id, phash_to_hex(image.qc.phash))]
        if bands:
            session.execute(insert(ImagePhashBand), bands)
        self._flag(session, batch, [image for image in images if image.qc is None or image.qc.verdict != Verdict.PASS])
        return [self._verdict_event(batch, image) for image in images if image.qc is not None]

    @staticmethod
    def _flag(session: Session, batch: BatchView, flagged: list[UploadedImage]) -> None:
        """Each image QC did not pass is an ``image.flagged`` webhook delivery, in the same transaction;
        the batch's endpoint looked up once for all of them."""
        endpoint = webhooks.batch_endpoint(session, batch.id) if flagged else None
        if endpoint is None:
            return
        for image in flagged:
            outcome = image.qc
            webhooks.enqueue_for_batch(session, webhooks.IMAGE_FLAGGED, batch.id, {
                "image_id": image.id, "item_id": image.item.id, "external_id": image.item.external_id,
                "verdict": outcome.verdict if outcome is not None else "review",
                "reasons": list(outcome.reasons) if outcome is not None else ["qc_error"]}, endpoint=endpoint)

    def _image_row(self, batch: BatchView, image: UploadedImage, parent_image_id: str | None,
                   now: Any) -> dict[str, Any]:
        outcome, rendered = image.qc, image.rendered
        return {
            "id": image.id, "item_id": image.item.id, "batch_id": batch.id, "index": rendered.index,
            "seed": rendered.seed, "storage_key": image.key, "sha256": image.sha256,
            "width": rendered.picture.width, "height": rendered.picture.height,
            # the model that made this image, as its provenance records it (docs/models.md, "Registry")
            "model_id": rendered.record["model"], "weights_sha256": rendered.record["weights_sha256"],
            "refine": self.refine_record(batch),
            "timings": {name: round(value, 6) for name, value in rendered.timings.items()},
            "phash": phash_to_hex(outcome.phash) if outcome is not None else None,
            "qc_verdict": outcome.verdict if outcome is not None else "review",  # QC failed: a human looks
            "qc_reasons": list(outcome.reasons) if outcome is not None else ["qc_error"],
            "parent_image_id": parent_image_id, "created_at": now,
            "watermark_id": embedded_watermark_id(rendered.credentials), "credentials": rendered.credentials,
        }

    def _verdict_event(self, batch: BatchView, image: UploadedImage) -> dict[str, Any]:
        outcome = image.qc
        return {"action": "qc.verdict", "actor": self.actor, "batch_id": batch.id, "item_id": image.item.id,
                "image_id": image.id, "payload": {
                    "verdict": outcome.verdict, "reasons": list(outcome.reasons),
                    "advisories": list(outcome.advisories), "phash": phash_to_hex(outcome.phash),
                    "scorers": [{"scorer": r.scorer, "version": r.version, "verdict": r.verdict}
                                for r in outcome.results],
                    "notes": list(getattr(outcome, "notes", []) or []),
                }}

    def remember_hashes(self, batch: BatchView, recorded: list[UploadedImage]) -> None:
        """Recorded images count as known for a loaded index (the ledger index reads them itself)."""
        index = self._known_hashes.get(batch.id)
        for image in recorded:
            if index is not None and image.qc is not None and image.qc.phash is not None:
                index.add(image.qc.phash, image.id)

    def refine_record(self, batch: BatchView) -> dict[str, Any] | None:
        """The refine settings and the refiner's identity, when the batch refines."""
        options = batch.generation_params.refine_options
        return {**options, **self.ctx.model.refiner_identity()} if options else None

    def _time(self, stage: str, began: float, images: list[UploadedImage]) -> None:
        elapsed = time.perf_counter() - began
        self.seconds[stage] += elapsed
        metrics.observe_stage("upload" if stage == "store" else stage, elapsed)
        for image in images:
            image.rendered.timings[stage] = elapsed / len(images)
