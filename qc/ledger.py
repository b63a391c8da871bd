"""QC from the ledger: ``instabatch qc rejudge BATCH`` and ``instabatch qc calibrate BATCH``.

Both read the metrics the worker stored per scorer (``qc_results``), never the images:

* ``rejudge_batch`` applies today's thresholds (``QcSettings``, from ``QC_*``) to the stored
  metrics, updates each changed image's verdict and reasons and its scorer rows' thresholds,
  and audits every change (``qc.rejudged`` per image, ``qc.batch_rejudged`` for the batch) in
  the caller's transaction. A reviewer's decision stays: an image moved out of ``review`` keeps
  its ``review_status``; one moved into ``review`` joins the queue.
* ``calibrate_batch`` prints the batch's metric distributions and suggested thresholds
  (``qc.calibration.calibrate``).

Batches are read a page of images at a time, so a 50,000-image batch never sits in memory
as ORM objects.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core import audit
from core.ledger import qc_results_by_image
from models import Batch, Image, QcResult
from qc.calibration import calibrate
from qc.policy import rejudge
from qc.results import QcOutcome, ScorerResult
from qc.settings import QcSettings

PAGE_IMAGES = 500
SAMPLE_CHANGES = 20


class UnknownBatch(LookupError):
    pass


@dataclass
class RejudgeReport:
    batch_id: str
    images: int = 0
    unchecked: int = 0  # images stored without QC results: nothing to re-judge
    changed: int = 0
    decided_changed: int = 0  # changed images that a reviewer had already decided
    before: Counter = field(default_factory=Counter)
    after: Counter = field(default_factory=Counter)
    moves: Counter = field(default_factory=Counter)  # "review->pass": n
    sample: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "batch_id": self.batch_id, "images": self.images, "unchecked": self.unchecked,
            "changed": self.changed, "decided_changed": self.decided_changed, "before": dict(self.before),
            "after": dict(self.after), "moves": dict(self.moves), "sample": self.sample, "dry_run": self.dry_run,
        }


@dataclass
class ImageVerdicts:
    id: str
    item_id: str
    verdict: str | None
    reasons: list[str]
    review_status: str | None
    results: list[QcResult]

    def outcome(self) -> QcOutcome:
        return QcOutcome(self.verdict or "pass", list(self.reasons), [
            ScorerResult(r.scorer, r.scorer_version, dict(r.metrics or {}), dict(r.thresholds or {}), r.verdict,
                         list(r.reasons or []))
            for r in self.results
        ])


def image_verdicts(session: Session, batch_id: str, page: int = PAGE_IMAGES) -> Iterator[ImageVerdicts]:
    """The batch's images with their QC rows, a page at a time (keyset on image id)."""
    after = ""
    while True:
        images = session.execute(
            select(Image.id, Image.item_id, Image.qc_verdict, Image.qc_reasons, Image.review_status)
            .where(Image.batch_id == batch_id, Image.id > after).order_by(Image.id).limit(page)
        ).all()
        if not images:
            return
        results = qc_results_by_image(session, [row.id for row in images])
        for row in images:
            yield ImageVerdicts(row.id, row.item_id, row.qc_verdict, list(row.qc_reasons or []), row.review_status,
                              results[row.id])
        after = images[-1].id


def _batch(session: Session, batch_id: str) -> Batch:
    batch = session.get(Batch, batch_id)
    if batch is None:
        raise UnknownBatch(batch_id)
    return batch


def rejudge_batch(session: Session, batch_id: str, settings: QcSettings | None = None, *,
                  actor: str = "cli", dry_run: bool = False) -> RejudgeReport:
    """Re-apply thresholds to a batch's stored metrics; the caller commits (nothing is written on a dry run)."""
    settings = settings or QcSettings()
    _batch(session, batch_id)
    report = RejudgeReport(batch_id, dry_run=dry_run)
    events: list[dict[str, Any]] = []
    for stored in image_verdicts(session, batch_id):
        report.images += 1
        report.before[stored.verdict or "unchecked"] += 1
        if not stored.results:
            report.unchecked += 1
            report.after[stored.verdict or "unchecked"] += 1
            continue
        outcome = rejudge(stored.outcome(), settings)
        report.after[outcome.verdict] += 1
        if (outcome.verdict, outcome.reasons) == (stored.verdict, stored.reasons):
            continue
        change = {"image_id": stored.id, "from": stored.verdict, "to": outcome.verdict,
                  "reasons_from": stored.reasons, "reasons_to": outcome.reasons,
                  "review_status": stored.review_status}
        _note_change(report, change)
        if not dry_run:
            _apply(session, stored, outcome)
            events.append({"action": "qc.rejudged", "actor": actor, "batch_id": batch_id,
                           "item_id": stored.item_id, "image_id": stored.id, "payload": change})
    if not dry_run:
        audit.record_many(session, events)
        audit.record(session, "qc.batch_rejudged", actor=actor, batch_id=batch_id, payload={
            **{k: v for k, v in report.as_dict().items() if k not in ("sample", "dry_run", "batch_id")},
            "settings": settings.model_dump(mode="json", exclude={"blocked_terms", "blocked_patterns"}),
        })
    return report


def _note_change(report: RejudgeReport, change: dict[str, Any]) -> None:
    report.changed += 1
    report.decided_changed += change["review_status"] is not None
    report.moves[f"{change['from']}->{change['to']}"] += 1
    if len(report.sample) < SAMPLE_CHANGES:
        report.sample.append(change)


def _apply(session: Session, stored: ImageVerdicts, outcome: QcOutcome) -> None:
    session.execute(update(Image).where(Image.id == stored.id)
                    .values(qc_verdict=outcome.verdict, qc_reasons=list(outcome.reasons)))
    for row, judged in zip(stored.results, outcome.results):
        fresh = judged.to_dict()
        if (row.verdict, row.reasons or [], row.thresholds or {}) != (fresh["verdict"], fresh["reasons"],
                                                                      fresh["thresholds"]):
            row.verdict, row.reasons, row.thresholds = fresh["verdict"], fresh["reasons"], fresh["thresholds"]
    session.flush()


def calibrate_batch(session: Session, batch_id: str, settings: QcSettings | None = None,
                    flag_percent: float = 1.0) -> dict[str, Any]:
    """Distributions of the batch's stored metrics, its verdicts under ``settings``, and the
    thresholds that would flag ``flag_percent`` percent of it on each quality bar."""
    batch = _batch(session, batch_id)
    rows = ({"results": [_result_dict(r) for r in stored.results]}
            for stored in image_verdicts(session, batch_id) if stored.results)
    report = calibrate(rows, settings, flag_percent)
    return {"batch_id": batch.id, "batch_name": batch.name, "flag_percent": flag_percent, **report}


def _result_dict(row: QcResult) -> dict[str, Any]:
    return {"scorer": row.scorer, "version": row.scorer_version, "metrics": row.metrics or {},
            "thresholds": row.thresholds or {}, "verdict": row.verdict, "reasons": row.reasons or []}
