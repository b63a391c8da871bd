"""qc rejudge / calibrate from the ledger, on SQLite and PostgreSQL: stored metrics judged again with
new thresholds, verdicts and scorer rows updated, every change audited, reviewers' decisions kept."""
from __future__ import annotations

import pytest
from sqlalchemy import select

from core import review as core_review
from core.audit.verify import verify_chain
from core.db import get_engine, session_scope
from models import AuditEvent, Image, QcResult
from qc.ledger import UnknownBatch, calibrate_batch, rejudge_batch
from qc.settings import QcSettings
from tests.reviewkit import seed_batch

BLURRY = ("review", ["blurry"])
PASS = ("pass", [])
REVIEWER = type("Reviewer", (), {"key_id": None, "name": "qa", "actor": "test:qa"})()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, configure) -> str:
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    configure(DATABASE_URL=url)
    return url


def verdicts(image_ids: list[str]) -> dict[str, tuple[str, list[str], str | None]]:
    with session_scope() as session:
        return {i.id: (i.qc_verdict, i.qc_reasons, i.review_status)
                for i in session.scalars(select(Image).where(Image.id.in_(image_ids)))}


def test_rejudge_moves_images_between_verdicts_and_audits_each_change(ledger):
    seeded = seed_batch("mkt", [BLURRY, BLURRY, BLURRY, PASS, PASS], with_png=False)
    blurry = seeded.flagged("blurry")
    passing = [i for i in seeded.image_ids if i not in blurry]
    with session_scope() as session:  # a reviewer already decided one of the blurry images
        core_review.decide(session, session.get(Image, blurry[0]), "approve", "acceptable", reviewer=REVIEWER)

    # A dry run reports and writes nothing.
    laxer = QcSettings(sharpness_min=0.0001)
    with session_scope() as session:
        report = rejudge_batch(session, seeded.batch_id, laxer, actor="cli:test", dry_run=True)
    assert (report.changed, report.moves) == (3, {"review->pass": 3})
    assert verdicts(blurry)[blurry[1]] == ("review", ["blurry"], None)

    with session_scope() as session:
        report = rejudge_batch(session, seeded.batch_id, laxer, actor="cli:test")
    assert report.as_dict() | {"sample": []} == {
        "batch_id": seeded.batch_id, "images": 5, "unchecked": 0, "changed": 3, "decided_changed": 1,
        "before": {"review": 3, "pass": 2}, "after": {"pass": 5}, "moves": {"review->pass": 3}, "sample": [],
        "dry_run": False}
    after = verdicts(seeded.image_ids)
    assert after[blurry[0]] == ("pass", [], "approved")  # the decision stays
    assert all(after[i] == ("pass", [], None) for i in blurry[1:])
    with session_scope() as session:
        sharpness = session.scalars(select(QcResult).where(QcResult.image_id.in_(blurry),
                                                           QcResult.scorer == "sharpness")).all()
        events = session.scalars(select(AuditEvent).where(AuditEvent.batch_id == seeded.batch_id,
                                                          AuditEvent.action.like("qc.%")).order_by(AuditEvent.seq)).all()
        assert core_review.queue_size(session, batch_id=seeded.batch_id) == 0
    assert {(r.verdict, tuple(r.reasons), r.thresholds["sharpness_min"]) for r in sharpness} == {("pass", (), 0.0001)}
    assert [e.action for e in events] == ["qc.rejudged"] * 3 + ["qc.batch_rejudged"]
    assert {e.image_id for e in events[:3]} == set(blurry) and all(e.actor == "cli:test" for e in events)
    assert events[0].payload["from"] == "review" and events[0].payload["to"] == "pass"
    assert events[-1].payload["settings"]["sharpness_min"] == 0.0001
    assert verify_chain(get_engine()).ok

    # Stricter contrast: every image goes to review and joins the queue; nothing changes twice.
    stricter = QcSettings(sharpness_min=0.0001, contrast_min=0.5)
    with session_scope() as session:
        assert rejudge_batch(session, seeded.batch_id, stricter).moves == {"pass->review": 5}
    with session_scope() as session:
        assert rejudge_batch(session, seeded.batch_id, stricter).changed == 0
        queued = [row.Image.id for row in core_review.queue_page(session, 10, batch_id=seeded.batch_id)[0]]
    assert queued == [i for i in seeded.image_ids if i != blurry[0]]  # the approved one stays decided
    assert verdicts(passing)[passing[0]] == ("review", ["low_contrast"], None)


def test_calibrate_reads_the_batch_distributions_and_suggests_thresholds(ledger):
    seeded = seed_batch("mkt", [BLURRY, PASS, PASS, ("review", ["underexposed"])], with_png=False)
    with session_scope() as session:
        report = calibrate_batch(session, seeded.batch_id, QcSettings(), flag_percent=5)
        assert report["batch_id"] == seeded.batch_id and report["images"] == 4
        assert report["metrics"]["contrast.rms_contrast"]["count"] == 4
        assert report["metrics"]["sharpness.laplacian_ratio"]["count"] == 1
        assert report["verdicts"] == {"review": 2, "pass": 2}
        assert report["thresholds"]["contrast_min"]["current"] == 0.012
        with pytest.raises(UnknownBatch):
            calibrate_batch(session, "00000000-0000-4000-8000-000000000000")
        with pytest.raises(UnknownBatch):
            rejudge_batch(session, "00000000-0000-4000-8000-000000000000")
