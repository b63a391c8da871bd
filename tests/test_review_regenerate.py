"""Regenerate end to end with a real Celery worker: a reviewer's decision over HTTP becomes a new
image for the same item (new seed, linked to its parent, checked by QC again), exactly once."""
from __future__ import annotations

import hashlib
import time

from sqlalchemy import select

from tests.apikit import ApiHarness
from core import review as core_review
from core.provenance import read_png_provenance
from models import AuditEvent, Image, QcResult
from tests.workerkit import Stack, running_worker
from worker.regenerate import regenerate_image


def wait_for_image(stack: Stack, image_id: str, timeout: float = 120.0) -> Image:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with stack.sessions() as session:
            image = session.get(Image, image_id)
        if image is not None:
            return image
        time.sleep(0.2)
    raise TimeoutError(f"image {image_id} did not appear in {timeout}s")


def test_regenerate_makes_a_linked_image_that_goes_through_qc_once(stack: Stack):
    api = ApiHarness.start(team="t")  # the stack submits as team "t"
    with running_worker(stack):
        batch_id = stack.submit(["a red mug on a white table"], params={"width": 64, "height": 64})
        stack.wait_until_done(batch_id)
        (parent,) = stack.images(batch_id)
        response = api.post("reviewer", f"/v1/images/{parent.id}/review",
                            json={"decision": "regenerate", "reason_code": "blurry"})
        assert response.status_code == 200, response.text
        request = response.json()["regeneration"]
        child = wait_for_image(stack, request["new_image_id"])

    assert child.parent_image_id == parent.id and child.item_id == parent.item_id
    assert child.index == parent.index and child.seed == request["seed"] != parent.seed
    assert child.qc_verdict in ("pass", "review", "reject") and child.review_status is None
    assert child.storage_key != parent.storage_key and child.model_id == parent.model_id
    data = stack.store.get(child.storage_key)
    assert hashlib.sha256(data).hexdigest() == child.sha256 != parent.sha256
    assert int(read_png_provenance(data)["seed"]) == child.seed
    with stack.sessions() as session:
        assert session.scalar(select(QcResult.id).where(QcResult.image_id == child.id).limit(1)) is not None
        actions = session.scalars(select(AuditEvent.action).where(AuditEvent.image_id == child.id)
                                  .order_by(AuditEvent.seq)).all()
        pending = [request.parent_image_id for request in core_review.pending_regenerations(session)]
        assert parent.id not in pending  # (the session-wide PostgreSQL ledger may hold other tests' requests)
    assert actions == ["qc.verdict", "image.regenerated"]
    event = stack.events(batch_id, "image.regenerated")[0]
    assert event.payload["parent_image_id"] == parent.id and event.payload["seed"] == child.seed

    # At-least-once delivery: the same message again changes nothing; a forged seed is refused.
    ctx = stack.app.instabatch
    assert regenerate_image(ctx, parent.id, request["seed"])["status"] == "exists"
    assert regenerate_image(ctx, parent.id, request["seed"] + 1)["status"] == "seed_mismatch"
    assert regenerate_image(ctx, child.id, 7)["status"] == "no_request"
    assert len(stack.images(batch_id)) == 2
    counts = api.get("submitter", f"/v1/batches/{batch_id}").json()["review"]
    assert counts["regenerated"] == 1 and sum(counts[v] for v in ("pass", "review", "reject")) == 2
    if child.qc_verdict == "review":  # the new image waits for a reviewer like any other
        entries = api.get("reviewer", "/v1/review", params={"batch_id": batch_id}).json()["entries"]
        assert [(e["image_id"], e["parent_image_id"]) for e in entries] == [(child.id, parent.id)]


def test_a_regenerate_out_of_attempts_ends_visibly_and_is_not_sent_again(stack: Stack):
    """A regenerate whose prompt kills the worker is redelivered after every death; each run
    counts an attempt first, so past MAX_ATTEMPTS the request ends, on the parent's review."""
    from sqlalchemy import update

    from models import Review

    api = ApiHarness.start(team="t")
    with running_worker(stack):
        batch_id = stack.submit(["a blue cup on a grey table"], params={"width": 64, "height": 64})
        stack.wait_until_done(batch_id)
    (parent,) = stack.images(batch_id)
    response = api.post("reviewer", f"/v1/images/{parent.id}/review",
                        json={"decision": "regenerate", "reason_code": "blurry"})
    request = response.json()["regeneration"]
    with stack.sessions() as session:  # every earlier run died before recording anything
        session.execute(update(Review).where(Review.image_id == parent.id)
                        .values(regeneration_attempts=stack.settings.max_attempts))
        session.commit()

    ctx = stack.app.instabatch
    assert regenerate_image(ctx, parent.id, request["seed"])["status"] == "dead"
    assert regenerate_image(ctx, parent.id, request["seed"])["status"] == "dead"  # ended once
    with stack.sessions() as session:
        assert session.get(Image, request["new_image_id"]) is None
        assert parent.id not in [r.parent_image_id for r in core_review.pending_regenerations(session)]
    assert len(stack.events(batch_id, "image.regeneration_dead")) == 1
    item = api.get("reviewer", f"/v1/items/{parent.item_id}").json()
    (review,) = item["images"][0]["reviews"]
    assert review["regeneration_attempts"] == stack.settings.max_attempts
    assert review["regeneration_error"].startswith(f"dead after {stack.settings.max_attempts} attempts")
