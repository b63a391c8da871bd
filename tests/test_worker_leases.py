"""Leases and the sweeper, on SQLite and PostgreSQL: claims, redelivery, lost leases, expiry, the attempt cap."""
from __future__ import annotations

import socket
import subprocess
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from core import ledger
from models import Batch, Item, Outbox, utcnow
from tests.workerkit import Stack, build_stack, running_worker
from worker import leases
from worker.sweeper import sweep

LEASE = 60


@pytest.fixture(params=["sqlite", "postgresql"])
def stack(request, configure, random_checkpoint) -> Stack:
    env = {"INSTABATCH_MODEL": str(random_checkpoint), "MAX_ATTEMPTS": "3"}
    if request.param == "postgresql":
        env["DATABASE_URL"] = request.getfixturevalue("pg_url")
    return build_stack(configure, **env)


def claim(stack: Stack, ids: list[str], task_id: str, worker: str = "host:1", now=None) -> list[leases.ClaimedItem]:
    """Claim as a task does: items of dead earlier runs of the same task may be taken back."""
    owner, now = leases.lease_owner(worker, task_id), now or utcnow()
    with stack.sessions() as session:
        reclaim = leases.reclaimable_owners(session, ids, task_id=task_id, owner=owner, now=now, lease_seconds=LEASE,
                                            heartbeat_seconds=LEASE / 4)
        claimed = leases.claim(session, ids, owner=owner, reclaim=reclaim, lease_seconds=LEASE,
                               max_attempts=stack.settings.max_attempts, now=now)
        session.commit()
    return claimed


def dead_local_worker() -> str:
    """``host:pid`` of a process of this host that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return f"{socket.gethostname()}:{process.pid}"


def item_ids(stack: Stack, batch_id: str) -> list[str]:
    return [item.id for item in stack.items(batch_id)]


def expire(stack: Stack, ids: list[str]) -> None:
    with stack.sessions() as session:
        session.execute(update(Item).where(Item.id.in_(ids)).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()


def test_a_claim_takes_items_once_and_a_redelivery_of_the_same_task_takes_them_back(stack: Stack):
    ids = item_ids(stack, stack.submit(["a", "b", "c"], dispatch=False))
    first = claim(stack, ids, "task-1", worker=dead_local_worker())
    assert [item.id for item in first] == ids and all(item.attempts == 1 for item in first)
    assert claim(stack, ids, "task-2", worker="other:2") == []  # a duplicate chunk: nothing to claim
    again = claim(stack, ids, "task-1", worker="host:7")  # the same message again: its first run died
    assert [item.attempts for item in again] == [2, 2, 2]


def test_a_redelivered_twin_leaves_a_run_that_still_beats_alone(stack: Stack):
    """The visibility timeout redelivers a long task under its id while it still runs on another
    host: the twin takes nothing until that run misses two heartbeats."""
    ids = item_ids(stack, stack.submit(["a", "b"], dispatch=False))
    assert len(claim(stack, ids, "long-task", worker="far-host:5")) == 2
    assert claim(stack, ids, "long-task", worker="host:7") == []
    silent = utcnow() + timedelta(seconds=2 * LEASE / 4 + 1)  # two beats later, never renewed
    assert len(claim(stack, ids, "long-task", worker="host:7", now=silent)) == 2


def test_an_expired_lease_moves_on_and_the_old_holder_can_no_longer_finish(stack: Stack):
    ids = item_ids(stack, stack.submit(["a", "b"], dispatch=False))
    claim(stack, ids, "slow")
    expire(stack, ids)
    assert len(claim(stack, ids, "fast", worker="other:2")) == 2
    with stack.sessions() as session:
        assert leases.finish(session, ids, owner="host:1:slow", state=leases.ItemState.SUCCEEDED, now=utcnow()) == set()
        assert leases.finish(session, ids, owner="other:2:fast", state=leases.ItemState.SUCCEEDED,
                             now=utcnow()) == set(ids)
        session.commit()
    with stack.sessions() as session:
        assert set(session.scalars(select(Item.state).where(Item.id.in_(ids)))) == {"succeeded"}


def test_items_out_of_attempts_end_dead_and_cancelled_batches_end_cancelled(stack: Stack):
    dead_batch = stack.submit(["a", "b"], dispatch=False)
    ids = item_ids(stack, dead_batch)
    cancelled_batch = stack.submit(["c"], dispatch=False)
    with stack.sessions() as session:
        session.execute(update(Item).where(Item.id == ids[0]).values(attempts=3))
        session.commit()
    with stack.sessions() as session:
        ledger.cancel_batch(session, session.get(Batch, cancelled_batch), actor="t")
        session.commit()
    other = item_ids(stack, cancelled_batch)
    with stack.sessions() as session:
        # a cancelled batch's item still running under a dead worker's lease
        session.execute(update(Item).where(Item.id.in_(other)).values(state="running", lease_owner="x:1:t"))
        settled = leases.settle_unclaimable(session, ids + other, [], 3, utcnow())
        session.commit()
    assert [item_id for item_id, _ in settled.dead] == [ids[0]]
    assert [item_id for item_id, _ in settled.cancelled] == other
    assert [item.id for item in claim(stack, ids + other, "t2")] == [ids[1]]
    error = next(item.error for item in stack.items(dead_batch) if item.id == ids[0])
    assert "dead after 3 attempts" in error


def test_the_sweeper_requeues_expired_leases_and_a_worker_finishes_them(stack: Stack):
    batch_id = stack.submit(["a red mug", "a blue cup", "a green vase"], dispatch=False)
    ids = item_ids(stack, batch_id)
    with stack.sessions() as session:  # the original chunks went out; the worker that took them died
        session.execute(update(Outbox).values(dispatched_at=utcnow()))
        session.commit()
    claim(stack, ids, "ghost-task", worker="ghost:1")
    with stack.sessions() as session:
        session.execute(update(Item).where(Item.id == ids[2]).values(attempts=3))
        session.commit()
    assert sweep(stack.sessions, stack.app, stack.settings).requeued == []  # leases still valid: nothing moves
    expire(stack, ids)

    report = sweep(stack.sessions, stack.app, stack.settings)
    assert sorted(report.requeued) == sorted(ids[:2]) and report.dead == [ids[2]]
    assert report.dispatched >= 1
    with running_worker(stack):
        counts = stack.wait_until_done(batch_id)
    assert counts["succeeded"] == 2 and counts["dead"] == 1
    assert [item.attempts for item in stack.items(batch_id)[:2]] == [2, 2]
    assert len(stack.events(batch_id, "batch.completed")) == 1


def test_the_sweeper_requeues_at_once_what_a_known_dead_worker_held(stack: Stack):
    ids = item_ids(stack, stack.submit(["a", "b"], dispatch=False))
    claim(stack, ids[:1], "t1", worker="host:111")
    claim(stack, ids[1:], "t2", worker="host:1112")  # a pid that merely starts with the same digits
    report = sweep(stack.sessions, stack.app, stack.settings, abandoned_by="host:111")
    assert report.requeued == ids[:1]
