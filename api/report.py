"""The generation record of one batch, for compliance: who submitted it and when, which model and
refiner (weights sha256) and code made its images, its parameters and outcome, each reviewer's
decisions, and where its audit events sit in the hash chain with the anchor that covers them
(docs/architecture.md, "Results out, progress pushed, the remote client").
Read-only: ``GET /v1/batches/{id}/report`` and ``.json``."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api import queries
from api.schemas.results import AuditRange, BatchReport, DecisionRecord, ModelUse, ReviewerDecisions
from core import canary
from core.audit.anchors import list_anchors
from core.audit.verify import read_head
from core.storage import ObjectStore
from models import ApiKey, AuditEvent, Batch, Image, Item, Review, utcnow

VERIFY_COMMAND = "instabatch audit verify"
TEMPLATES = Environment(loader=FileSystemLoader(Path(__file__).resolve().parent / "templates"),
                        autoescape=select_autoescape(["html"]), trim_blocks=True, lstrip_blocks=True)


def batch_report(session: Session, store: ObjectStore, batch: Batch) -> BatchReport:
    view = queries.batch_view(session, batch)
    review = view.review.model_dump(by_alias=True)
    return BatchReport(
        batch=view, submitted_by=_submitter(session, batch), submitted_at=batch.created_at,
        code_versions=_code_versions(session, batch.id), models=_models(session, batch.id),
        parameters=batch.params, counts=view.counts,
        verdicts={name: review[name] for name in ("pass", "review", "reject", "unchecked")},
        verdicts_by_model=canary.compare(session, [batch.id]),
        decisions={name: review[name] for name in ("awaiting_review", "approved", "rejected", "regenerated")},
        reviewers=_reviewers(session, batch.id), decision_log=_decision_log(session, batch.id), audit=_audit_range(session, store, batch.id), generated_at=utcnow(),
    )


def _submitter(session: Session, batch: Batch) -> dict[str, Any]:
    key = session.get(ApiKey, batch.submitted_by) if batch.submitted_by else None
    if key is not None:
        return {"key_id": key.id, "key_prefix": key.prefix, "name": key.name, "role": key.role, "team": key.team}
    actor = session.scalar(select(AuditEvent.actor).where(AuditEvent.batch_id == batch.id,
                                                          AuditEvent.action == "batch.submitted"))
    return {"key_id": None, "name": actor, "role": None, "team": batch.team}  # submitted without a key (the CLI)


def _code_versions(session: Session, batch_id: str) -> list[str]:
    version = AuditEvent.payload["code_version"].as_string()
    rows = session.scalars(select(version).where(AuditEvent.batch_id == batch_id,
                                                 AuditEvent.action == "item.generated").distinct())
    return sorted(value for value in rows if value)


def _models(session: Session, batch_id: str) -> list[ModelUse]:
    counts = session.execute(select(Image.model_id, Image.weights_sha256, func.count())
                             .where(Image.batch_id == batch_id).group_by(Image.model_id, Image.weights_sha256))
    uses = []
    for model_id, weights, n in counts:
        refine = session.scalar(select(Image.refine).where(Image.batch_id == batch_id, Image.model_id == model_id,
                                                           Image.weights_sha256 == weights,
                                                           Image.refine.is_not(None)).limit(1))
        uses.append(ModelUse(model_id=model_id, weights_sha256=weights, images=n, refine=refine or None))
    return uses


def _reviewers(session: Session, batch_id: str) -> list[ReviewerDecisions]:
    rows = session.execute(
        select(Review.reviewer_name, Review.reviewer_key_id, Review.decision, func.count(),
               func.min(Review.created_at), func.max(Review.created_at))
        .join(Image, Image.id == Review.image_id).where(Image.batch_id == batch_id)
        .group_by(Review.reviewer_name, Review.reviewer_key_id, Review.decision))
    by_reviewer: dict[str, dict[str, Any]] = {}
    for name, key_id, decision, n, first, last in rows:
        entry = by_reviewer.setdefault(name or key_id or "unknown", {"reviewer": name or key_id or "unknown"})
        entry[decision] = entry.get(decision, 0) + n
        entry["first_at"] = min(filter(None, (entry.get("first_at"), first)))
        entry["last_at"] = max(filter(None, (entry.get("last_at"), last)))
    return [ReviewerDecisions.model_validate(entry) for _, entry in sorted(by_reviewer.items())]


def _decision_log(session: Session, batch_id: str) -> list[DecisionRecord]:
    rows = session.execute(
        select(Review, Image.qc_verdict, Item.external_id).join(Image, Image.id == Review.image_id)
        .join(Item, Item.id == Image.item_id).where(Image.batch_id == batch_id)
        .order_by(Review.created_at, Review.id))
    return [DecisionRecord(at=review.created_at, reviewer=review.reviewer_name or review.reviewer_key_id or "unknown",
                           decision=review.decision, reason_code=review.reason_code, image_id=review.image_id,
                           external_id=external_id, verdict=verdict)
            for review, verdict, external_id in rows]


def _audit_range(session: Session, store: ObjectStore, batch_id: str) -> AuditRange:
    events, first_seq, last_seq, first_at, last_at = session.execute(
        select(func.count(), func.min(AuditEvent.seq), func.max(AuditEvent.seq), func.min(AuditEvent.ts),
               func.max(AuditEvent.ts)).where(AuditEvent.batch_id == batch_id)).one()
    last_hash = session.scalar(select(AuditEvent.hash).where(AuditEvent.seq == last_seq)) if last_seq else None
    head_seq, head_hash = read_head(session.connection())
    anchors = list_anchors(store)
    latest = anchors[-1] if anchors else None
    covered = bool(latest and last_seq is not None and latest.seq >= last_seq)
    return AuditRange(
        events=events, first_seq=first_seq, last_seq=last_seq, first_at=first_at, last_at=last_at, last_hash=last_hash,
        chain_head_seq=head_seq, chain_head_hash=head_hash, anchor_seq=latest.seq if latest else None,
        anchor_hash=latest.hash if latest else None, anchor_key=latest.key if latest else None, covered=covered,
        verify_command=VERIFY_COMMAND,
    )


def report_html(report: BatchReport) -> str:
    return TEMPLATES.get_template("report.html").render(
        report=report, parameters=json.dumps(report.parameters, indent=2, sort_keys=True),
        states=Counter(report.counts), refine_json=lambda value: json.dumps(value, sort_keys=True) if value else "none",
    )
