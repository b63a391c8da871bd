"""The review workflow over HTTP on SQLite and PostgreSQL: the queue (order, paging, filters), decisions
(once, by whom, audited, counted), regenerate requests published to a real Redis, contact sheets."""
from __future__ import annotations

import base64
import io
import json
import threading
from datetime import datetime, timedelta, timezone

import pytest
import redis
from PIL import Image as PILImage
from sqlalchemy import select

from tests.apikit import ApiHarness
from core import review as core_review
from core.db import session_factory, session_scope
from models import AuditEvent, Image, Review
from qc.contact_sheet import VERDICT_COLOURS
from tests.reviewkit import seed_batch

REVIEW = ("review", ["blurry"])
DUPLICATE = ("review", ["near_duplicate"])


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def api(configure, ledger_url, redis_url) -> ApiHarness:
    redis.Redis.from_url(redis_url).flushdb()
    configure(DATABASE_URL=ledger_url, BROKER_URL=redis_url)
    return ApiHarness.start()


def queue(api: ApiHarness, who: str = "reviewer", **params) -> dict:
    response = api.get(who, "/v1/review", params=params)
    assert response.status_code == 200, response.text
    return response.json()


def all_pages(api: ApiHarness, limit: int, **filters) -> tuple[list[str], int]:
    ids, cursor, first = [], None, None
    while True:
        page = queue(api, limit=limit, **filters, **({"cursor": cursor} if cursor else {}))
        first = page["total"] if first is None else first
        assert cursor is None or page["total"] is None  # counted on the first page only
        ids += [entry["image_id"] for entry in page["entries"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids, first


def decide(api: ApiHarness, image_id: str, decision: str, reason: str = "blurry", who: str = "reviewer", **extra):
    return api.post(who, f"/v1/images/{image_id}/review", json={"decision": decision, "reason_code": reason, **extra})


# The queue

def test_queue_lists_flagged_undecided_images_oldest_first_with_paging_and_filters(api):
    # Older than anything else in the (session-wide) PostgreSQL ledger, so these lead the queue.
    start = datetime(2001, 1, 1, tzinfo=timezone.utc)
    mine = seed_batch(api.team, [REVIEW, DUPLICATE, ("pass", []), REVIEW, ("reject", ["black"]), DUPLICATE, REVIEW],
                      same_time_pairs=True, start=start + timedelta(hours=1))
    other = seed_batch(api.other_team, [DUPLICATE, REVIEW], start=start)

    ids, total = all_pages(api, limit=2)
    assert total >= 7 and len(ids) == len(set(ids)) == total
    assert ids[:7] == other.image_ids + mine.flagged()  # the other team's batch is older; reviewers see every team

    assert all_pages(api, limit=3, batch_id=mine.batch_id) == (mine.flagged(), 5)
    duplicates, total = all_pages(api, limit=1, reason="near_duplicate")
    assert duplicates[:3] == other.flagged("near_duplicate") + mine.flagged("near_duplicate")
    assert total == len(duplicates) and set(duplicates) & set(mine.flagged("blurry")) == set()
    assert all_pages(api, limit=2, batch_id=mine.batch_id, reason="blurry") == (mine.flagged("blurry"), 3)
    assert all_pages(api, limit=50, batch_id=mine.batch_id, reason="underexposed") == ([], 0)

    entry = queue(api, limit=1, batch_id=mine.batch_id)["entries"][0]
    assert entry["image_id"] == mine.flagged()[0] and entry["batch_id"] == mine.batch_id
    assert entry["prompt"] and entry["team"] == api.team
    assert entry["verdict"] == "review" and entry["reasons"] == mine.reasons[entry["image_id"]]
    finding = entry["findings"][0]
    assert [f["scorer"] for f in entry["findings"]] == [finding["scorer"]] and finding["scorer"] in ("sharpness", "duplicate")
    assert finding["thresholds"] and "contrast.rms_contrast" in entry["metrics"]
    image = api.client.get(entry["url"])  # the signed URL needs no key: an <img> tag loads it
    assert image.status_code == 200 and PILImage.open(io.BytesIO(image.content)).size == (64, 64)


def test_queue_rejects_bad_filters_and_cursors(api):
    for params in ({"cursor": "nonsense"}, {"cursor": base64.urlsafe_b64encode(b"b:x").decode()},
                   {"cursor": base64.urlsafe_b64encode(b"r:2026-13-01|x").decode()},
                   {"batch_id": "not-a-uuid"}, {"reason": "Blurry!"}, {"limit": 0}, {"limit": 201}):
        response = api.get("reviewer", "/v1/review", params=params)
        assert response.status_code == 422, (params, response.text)
        assert response.json()["error"]["code"] == "validation_error"


def test_queue_and_decisions_by_role(api):
    seeded = seed_batch(api.team, [REVIEW, REVIEW])
    assert queue(api, "auditor", batch_id=seeded.batch_id)["total"] == 2  # auditors read the queue
    assert queue(api, "admin", batch_id=seeded.batch_id)["total"] == 2
    for who, status in (("submitter", 403), ("other_team", 403), (None, 401), ("revoked", 401)):
        assert api.get(who, "/v1/review").status_code == status
    for who, status in (("submitter", 403), ("auditor", 403), (None, 401)):
        response = decide(api, seeded.image_ids[0], "approve", "acceptable", who=who)
        assert response.status_code == status and set(response.json()) == {"error"}
    assert decide(api, seeded.image_ids[0], "approve", "acceptable", who="admin").status_code == 200
    assert decide(api, seeded.image_ids[1], "reject", who="reviewer").status_code == 200


# Decisions

def test_decisions_are_recorded_once_audited_and_counted(api):
    seeded = seed_batch(api.team, [REVIEW, DUPLICATE, REVIEW, ("pass", []), ("reject", ["black"])])
    flagged = seeded.image_ids[:3]

    approved = decide(api, flagged[0], "approve", "false_positive", comment="the mug is sharp enough")
    assert approved.status_code == 200, approved.text
    body = approved.json()
    assert body["review_status"] == "approved" and body["regeneration"] is None
    assert body["review"]["decision"] == "approved" and body["review"]["reason_code"] == "false_positive"
    assert body["review"]["reviewer_name"] == "test reviewer"
    rejected = decide(api, flagged[1], "reject", "near_duplicate")
    assert rejected.status_code == 200 and rejected.json()["review_status"] == "rejected"

    again = decide(api, flagged[0], "reject")
    assert again.status_code == 409 and again.json()["error"]["code"] == "already_decided"
    assert again.json()["error"]["details"] == {"review_status": "approved"}
    # QC can be overruled explicitly: approve an image QC rejected.
    assert decide(api, seeded.image_ids[4], "approve", "false_positive").status_code == 200

    assert [e["image_id"] for e in queue(api, batch_id=seeded.batch_id)["entries"]] == [flagged[2]]
    with session_scope() as session:
        review = session.scalar(select(Review).where(Review.image_id == flagged[0]))
        event = session.scalar(select(AuditEvent).where(AuditEvent.image_id == flagged[0],
                                                        AuditEvent.action == "review.decision"))
        key_id = review.reviewer_key_id
        assert session.get(Image, flagged[0]).review_status == "approved"
        assert session.scalar(select(Review.id).where(Review.image_id == flagged[0]).offset(1)) is None
    assert key_id and event.actor == f"key:{key_id}" and event.batch_id == seeded.batch_id
    assert event.payload["decision"] == "approved" and event.payload["reason_code"] == "false_positive"
    assert event.payload["comment"] == "the mug is sharp enough" and event.payload["qc_reasons"] == ["blurry"]
    assert api.get("auditor", "/v1/audit/verify").json()["ok"] is True

    batch = api.get("submitter", f"/v1/batches/{seeded.batch_id}").json()
    assert batch["review"] == {"pass": 1, "review": 3, "reject": 1, "unchecked": 0, "awaiting_review": 1,
                               "approved": 2, "rejected": 1, "regenerated": 0}
    listed = api.get("submitter", "/v1/batches").json()["batches"]
    assert next(b for b in listed if b["id"] == seeded.batch_id)["review"] == batch["review"]
    item = api.get("submitter", f"/v1/items/{seeded.item_ids[0]}").json()
    assert item["images"][0]["review_status"] == "approved"
    assert item["images"][0]["reviews"][0]["reason_code"] == "false_positive"


def test_bad_decision_bodies_are_4xx_and_change_nothing(api):
    image_id = seed_batch(api.team, [REVIEW]).image_ids[0]
    bodies = [{"decision": "maybe", "reason_code": "x"}, {"decision": "approve"},
              {"decision": "approve", "reason_code": "Has Spaces"}, {"decision": "approve", "reason_code": ""},
              {"decision": "approve", "reason_code": "ok", "extra": 1},
              {"decision": "approve", "reason_code": "ok", "comment": "x" * 2001},
              {"decision": "approve", "reason_code": "ok", "comment": "nul\x00"}, ["approve"]]
    for body in bodies:
        response = api.post("reviewer", f"/v1/images/{image_id}/review", json=body)
        assert response.status_code == 422, (body, response.text)
    response = api.post("reviewer", f"/v1/images/{image_id}/review", content=b"decision=approve",
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 415
    assert api.post("reviewer", f"/v1/images/{image_id}/review", content=b"{",
                    headers={"Content-Type": "application/json"}).status_code == 400
    for missing in ("00000000-0000-4000-8000-000000000000", "not-an-id"):
        response = decide(api, missing, "approve", "ok")
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    with session_scope() as session:
        assert session.get(Image, image_id).review_status is None
        assert session.scalar(select(Review.id).where(Review.image_id == image_id)) is None


def test_two_reviewers_deciding_at_once_get_one_decision(api, ledger_url):
    image_id = seed_batch(api.team, [REVIEW]).image_ids[0]
    sessions = session_factory()
    first, second = sessions(), sessions()
    reviewer = type("R", (), {"key_id": None, "name": "r", "actor": "test:r"})()
    outcome: dict[str, object] = {}

    core_review.decide(first, first.get(Image, image_id), "approve", "acceptable", reviewer=reviewer)

    def other_reviewer() -> None:
        try:
            core_review.decide(second, second.get(Image, image_id), "reject", "blurry", reviewer=reviewer)
            second.commit()
            outcome["second"] = "decided"
        except core_review.AlreadyDecided as exc:
            second.rollback()
            outcome["second"] = exc.status
        except Exception as exc:  # SQLite: the writer lock times out instead of waiting for the commit
            second.rollback()
            outcome["second"] = exc

    thread = threading.Thread(target=other_reviewer)
    if ledger_url.startswith("postgresql"):
        thread.start()  # blocks on the row lock until the first commits, then finds it decided
        thread.join(0.5)
        first.commit()
        thread.join(30)
    else:
        first.commit()
        thread.start()
        thread.join(30)
    first.close(), second.close()
    assert outcome["second"] == "approved"
    with session_scope() as session:
        assert len(session.scalars(select(Review).where(Review.image_id == image_id)).all()) == 1


# Regenerate

def test_regenerate_records_the_request_and_publishes_the_work(api, redis_url):
    seeded = seed_batch(api.team, [REVIEW, REVIEW])
    parent = seeded.image_ids[0]
    response = decide(api, parent, "regenerate", "blurry", comment="try another seed")
    assert response.status_code == 200, response.text
    regeneration = response.json()["regeneration"]
    with session_scope() as session:
        parent_row = session.get(Image, parent)
        expected_seed = core_review.regeneration_seed(parent, 1, parent_row.seed)
        review = session.scalar(select(Review).where(Review.image_id == parent))
        event = session.scalar(select(AuditEvent).where(AuditEvent.image_id == parent,
                                                        AuditEvent.action == "review.decision"))
        pending = core_review.pending_regenerations(session)
    assert regeneration["seed"] == expected_seed != parent_row.seed and regeneration["generation"] == 1
    assert review.decision == "regenerated" and review.new_image_id == regeneration["new_image_id"]
    assert event.payload["regeneration"]["seed"] == expected_seed
    assert [(p.parent_image_id, p.seed, p.new_image_id) for p in pending] == \
        [(parent, expected_seed, regeneration["new_image_id"])]

    messages = [json.loads(raw) for raw in redis.Redis.from_url(redis_url).lrange(core_review.REGENERATE_QUEUE, 0, -1)]
    sent = [json.loads(base64.b64decode(m["body"]))[0] for m in messages
            if m["headers"]["task"] == core_review.REGENERATE_TASK]
    assert sent == [[parent, expected_seed]]
    assert api.get("submitter", f"/v1/batches/{seeded.batch_id}").json()["review"]["regenerated"] == 1
    assert decide(api, parent, "regenerate").status_code == 409


def test_regeneration_seeds_are_deterministic_per_chain_depth():
    seeds = {core_review.regeneration_seed("a", generation) for generation in range(1, 50)}
    assert len(seeds) == 49 and all(0 <= seed < 2**32 for seed in seeds)
    assert core_review.regeneration_seed("a", 1) == core_review.regeneration_seed("a", 1) != core_review.regeneration_seed("b", 1)
    clash = core_review.regeneration_seed("a", 1)
    assert core_review.regeneration_seed("a", 1, parent_seed=clash) != clash


# Contact sheet

def test_contact_sheet_png_badges_each_tile_and_is_team_scoped(api):
    seeded = seed_batch(api.team, [("pass", []), REVIEW, ("reject", ["black"])])
    response = api.get("submitter", f"/v1/batches/{seeded.batch_id}/contact-sheet.png", params={"tile": 64})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    sheet = PILImage.open(io.BytesIO(response.content)).convert("RGB")
    from qc.contact_sheet import BORDER, GAP, TITLE_HEIGHT
    cell = 64 + 2 * BORDER + GAP
    for column, verdict in enumerate(("pass", "review", "reject")):
        # the tile's frame (left edge, half-way down) is the verdict's colour
        assert sheet.getpixel((GAP + column * cell + 1, TITLE_HEIGHT + GAP + 40)) == VERDICT_COLOURS[verdict]
    assert api.get("other_team", f"/v1/batches/{seeded.batch_id}/contact-sheet.png").status_code == 404
    only = api.get("reviewer", f"/v1/batches/{seeded.batch_id}/contact-sheet.png", params={"verdict": "review"})
    assert only.status_code == 200
    assert PILImage.open(io.BytesIO(only.content)).width < sheet.width  # one tile, not three
    assert api.get("reviewer", f"/v1/batches/{seeded.batch_id}/contact-sheet.png",
                   params={"verdict": "maybe"}).status_code == 422
