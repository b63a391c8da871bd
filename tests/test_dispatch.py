"""Fair scheduling and broker loss (the relay's order, its bound per queue), on PostgreSQL + Redis + S3 with a real worker.

The broker losing every message (a Redis restart without persistence is FLUSHDB as far as the
queues are concerned) must not strand a batch: the relay sees its chunks in flight, unclaimed,
with nothing running, and sends them again; the claim keeps every image single.
"""
from __future__ import annotations

from datetime import timedelta

import pytest
import redis
from sqlalchemy import func, select, update

from core.dispatch import dispatch_pending
from models import Image, Outbox, utcnow
from tests.workerkit import Stack, build_stack, queued_messages, quiet_outbox, running_worker


@pytest.fixture
def small_bound(configure, random_checkpoint, pg_url, redis_url, s3_server, s3_bucket) -> Stack:
    redis.Redis.from_url(redis_url).flushdb()
    return build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), DATABASE_URL=pg_url,
                       BROKER_URL=redis_url, S3_BUCKET=s3_bucket, S3_ENDPOINT_URL=s3_server,
                       INSTABATCH_CHUNK_IMAGES="2", DISPATCH_IN_FLIGHT="3", INSTABATCH_TORCH_THREADS="1")


def item_ids(stack: Stack, batch_id: str) -> list[str]:
    return [item.id for item in stack.items(batch_id)]


def in_flight(stack: Stack, batch_id: str) -> int:
    with stack.sessions() as session:
        return session.scalar(select(func.count()).select_from(Outbox).where(
            Outbox.batch_id == batch_id, Outbox.dispatched_at.is_not(None), Outbox.claimed_at.is_(None))) or 0


def claim_one(stack: Stack, batch_id: str) -> None:
    """A worker took one of the batch's messages (what ``mark_claimed`` records)."""
    with stack.sessions() as session:
        first = session.scalar(select(func.min(Outbox.id)).where(
            Outbox.batch_id == batch_id, Outbox.dispatched_at.is_not(None), Outbox.claimed_at.is_(None)))
        session.execute(update(Outbox).where(Outbox.id == first).values(claimed_at=utcnow()))
        session.commit()


def test_no_more_than_the_bound_of_a_queue_is_in_the_broker_and_a_later_batch_is_next(
        small_bound: Stack, redis_url):
    client = redis.Redis.from_url(redis_url)
    quiet_outbox(small_bound.sessions)
    big = small_bound.submit([f"a red mug {i}" for i in range(20)])  # 10 chunks
    assert in_flight(small_bound, big) == 3
    assert queued_messages(client, "generate", set(item_ids(small_bound, big))) == 3
    assert dispatch_pending(small_bound.sessions, small_bound.app) == 0  # nothing claimed: no room
    same_team = small_bound.submit(["a green lamp", "a grey chair"])
    other_team = small_bound.submit(["a blue vase", "a white shelf"], team="small")
    assert in_flight(small_bound, same_team) == in_flight(small_bound, other_team) == 0  # the queue is full
    claim_one(small_bound, big)
    assert dispatch_pending(small_bound.sessions, small_bound.app) == 1
    assert in_flight(small_bound, other_team) == 1  # the team with nothing in flight goes first
    claim_one(small_bound, big)
    assert dispatch_pending(small_bound.sessions, small_bound.app) == 1
    assert in_flight(small_bound, same_team) == 1  # then, within the big team, the batch with nothing in flight
    assert in_flight(small_bound, big) == 1
    assert queued_messages(client, "generate", set(item_ids(small_bound, big))) == 3  # two claimed ones still listed
    client.flushdb()


def test_a_high_chunk_waiting_holds_back_the_lower_queues(small_bound: Stack, redis_url):
    client = redis.Redis.from_url(redis_url)
    quiet_outbox(small_bound.sessions)
    urgent = small_bound.submit([f"a red mug {i}" for i in range(10)], priority="high")  # 5 chunks
    normal = small_bound.submit(["a green lamp", "a grey chair"])
    assert in_flight(small_bound, urgent) == 3
    assert in_flight(small_bound, normal) == 0  # "high" still has chunks waiting
    claim_one(small_bound, urgent)
    claim_one(small_bound, urgent)
    assert dispatch_pending(small_bound.sessions, small_bound.app) == 3  # the last two high ones, then normal
    assert in_flight(small_bound, urgent) == 3
    assert in_flight(small_bound, normal) == 1
    assert queued_messages(client, "generate", set(item_ids(small_bound, normal))) == 1
    client.flushdb()


def test_a_broker_that_lost_every_message_gets_them_again_and_the_batch_finishes_once(
        small_bound: Stack, redis_url):
    prompts = [f"a blue cup {i}" for i in range(12)]
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    quiet_outbox(small_bound.sessions)
    batch_id = small_bound.submit(prompts)
    assert queued_messages(client, "generate", set(item_ids(small_bound, batch_id))) == 3
    client.flushdb()  # the broker restarted empty
    # Not yet: a chunk in flight for less than REDISPATCH_SECONDS may simply be waiting.
    assert dispatch_pending(small_bound.sessions, small_bound.app) == 0
    with small_bound.sessions() as session:  # REDISPATCH_SECONDS later, nothing was claimed
        # Only the sent rows age: moving the pending ones too made them look in flight and lost,
        # so the pass "re-sent" chunks never sent, beyond the bound.
        session.execute(update(Outbox).where(Outbox.batch_id == batch_id, Outbox.dispatched_at.is_not(None))
                        .values(dispatched_at=utcnow() - timedelta(seconds=60)))
        session.commit()
    assert dispatch_pending(small_bound.sessions, small_bound.app) == 3  # the lost ones again, no more
    assert queued_messages(client, "generate", set(item_ids(small_bound, batch_id))) == 3
    with running_worker(small_bound):
        counts = small_bound.wait_until_done(batch_id, timeout=240)
    assert counts["succeeded"] == len(prompts)
    with small_bound.sessions() as session:
        images = session.execute(select(Image.item_id, Image.index).where(Image.batch_id == batch_id)).all()
        sends = session.scalars(select(Outbox.sends).where(Outbox.batch_id == batch_id)).all()
    assert len(images) == len(set(images)) == len(prompts)  # no image twice
    assert sorted(sends) == [1, 1, 1, 2, 2, 2]  # only the lost chunks were sent again
