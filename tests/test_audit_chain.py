"""The audit chain under attack, on SQLite and PostgreSQL: tampering straight in SQL is detected
and located; the append-only triggers refuse changes; anchors catch a fully rewritten chain."""
from __future__ import annotations

import threading
from datetime import datetime, timezone
from types import SimpleNamespace

import pytest
from sqlalchemy import Connection, Engine, insert, select, update
from sqlalchemy.exc import DBAPIError

from core import audit
from core.audit.anchors import ChainBroken, anchor_chain, list_anchors, load_anchors
from core.audit.verify import verify_chain
from core.db import make_engine, session_scope
from core.storage import LocalObjectStore, S3ObjectStore
from models import AuditChainHead, AuditEvent
from tests.audit_support import (  # noqa: F401
    ROW_COLUMNS, as_attacker, fresh_pg_url, ledger, pg_template, rehash_from, stored_hash, write_events,
)

EVENTS = 20


def found(engine: Engine, anchors: dict[int, str] | None = None) -> list[tuple[int, str]]:
    result = verify_chain(engine, anchors)
    assert result.ok == (not result.problems)
    return [(p.seq, p.kind) for p in result.problems]


def forged_row(conn: Connection, seq: int, prev_hash: str) -> dict:
    row = {"seq": seq, "ts": datetime(2026, 1, 1, tzinfo=timezone.utc), "actor": "mallory", "action": "review",
           "batch_id": None, "item_id": None, "image_id": None, "payload": {"decision": "approved"},
           "prev_hash": prev_hash}
    row["hash"] = audit.event_hash(prev_hash, SimpleNamespace(**row))
    return row


@pytest.fixture
def chain(ledger: Engine) -> Engine:
    write_events(ledger, EVENTS)
    return ledger


def test_an_intact_chain_verifies_with_its_head(chain):
    result = verify_chain(chain)
    with session_scope(chain) as session:
        head = session.get(AuditChainHead, audit.CHAIN_HEAD_ID)
    assert (result.ok, result.events, result.problems) == (True, EVENTS, [])
    assert (result.head_seq, result.head) == (EVENTS, head.last_hash)
    assert result.summary().startswith(f"RESULT ok=true events={EVENTS} head={head.last_hash}")


def test_an_edited_payload_is_found_at_its_seq(chain):
    as_attacker(chain, """UPDATE audit_events SET payload = '{"n": 999}' WHERE seq = 5""")
    assert found(chain) == [(5, "edited")]


def test_an_edit_with_a_recomputed_hash_is_found_at_its_seq(chain):
    def rewrite_row_5(conn: Connection) -> None:
        event = conn.execute(select(*[getattr(AuditEvent, c) for c in ROW_COLUMNS]).where(AuditEvent.seq == 5)).one()
        fields = SimpleNamespace(**{**event._asdict(), "actor": "someone-else"})
        conn.execute(update(AuditEvent).where(AuditEvent.seq == 5)
                     .values(actor="someone-else", hash=audit.event_hash(event.prev_hash, fields)))

    as_attacker(chain, rewrite_row_5)
    assert found(chain) == [(5, "edited")]


@pytest.mark.parametrize("seq", [1, 7, EVENTS])
def test_a_deleted_row_is_found_at_its_seq(chain, seq):
    as_attacker(chain, f"DELETE FROM audit_events WHERE seq = {seq}")
    assert found(chain) == [(seq, "deleted")]


def test_a_forged_row_past_the_head_is_found(chain):
    as_attacker(chain, lambda conn: conn.execute(
        insert(AuditEvent), [forged_row(conn, EVENTS + 1, stored_hash(conn, EVENTS))]))
    assert found(chain) == [(EVENTS + 1, "inserted")]


def test_a_forged_row_squeezed_in_by_renumbering_is_found(chain):
    # Make room after seq 10 (in two steps: the primary key is checked row by row), then insert
    # a well-formed forgery chained to seq 10. The shifted rows still verify under their old seqs.
    as_attacker(
        chain,
        "UPDATE audit_events SET seq = seq + 1000000 WHERE seq > 10",
        "UPDATE audit_events SET seq = seq - 999999 WHERE seq > 1000000",
        lambda conn: conn.execute(insert(AuditEvent), [forged_row(conn, 11, stored_hash(conn, 10))]),
    )
    result = verify_chain(chain)
    assert [(p.seq, p.kind, p.last_seq) for p in result.problems] == [
        (11, "inserted", None), (12, "reordered", EVENTS + 1)]
    assert result.problems[1].detail == f"seq 12..{EVENTS + 1} were recorded as seq 11..{EVENTS}"


def test_a_garbage_row_before_the_chain_is_found(chain):
    as_attacker(chain, lambda conn: conn.execute(
        insert(AuditEvent), [{**forged_row(conn, 0, "f" * 64), "hash": "e" * 64}]))
    assert found(chain) == [(0, "inserted")]


def test_a_replaced_row_is_found_as_edited(chain):
    def replace_row_6(conn: Connection) -> None:
        conn.exec_driver_sql("DELETE FROM audit_events WHERE seq = 6")
        conn.execute(insert(AuditEvent), [forged_row(conn, 6, stored_hash(conn, 5))])

    as_attacker(chain, replace_row_6)
    assert found(chain) == [(6, "edited")]


@pytest.mark.parametrize("first,second", [(4, 9), (12, 13)])
def test_swapped_rows_are_found_at_both_seqs(chain, first, second):
    as_attacker(
        chain,
        f"UPDATE audit_events SET seq = -1 WHERE seq = {first}",
        f"UPDATE audit_events SET seq = {first} WHERE seq = {second}",
        f"UPDATE audit_events SET seq = {second} WHERE seq = -1",
    )
    result = verify_chain(chain)
    assert [(p.seq, p.kind) for p in result.problems] == [(first, "reordered"), (second, "reordered")]
    assert result.problems[0].detail == f"recorded as seq {second}"


def test_a_head_row_that_disagrees_is_found(chain):
    as_attacker(chain, f"UPDATE audit_chain_head SET last_hash = '{'a' * 64}'")
    assert found(chain) == [(EVENTS, "edited")]


def test_verify_sees_one_snapshot_while_writers_commit(ledger):
    write_events(ledger, 5)
    stop = threading.Event()

    def keep_writing() -> None:
        while not stop.is_set():
            write_events(ledger, 1, actor="busy-writer")

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        results = [verify_chain(ledger) for _ in range(5)]
    finally:
        stop.set()
        writer.join()
    assert all(r.ok for r in results), [r.problems for r in results]
    assert results[-1].events >= results[0].events >= 5


# -- the append-only triggers -----------------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "UPDATE audit_events SET actor = 'x' WHERE seq = 1",
    "DELETE FROM audit_events WHERE seq = 1",
])
def test_the_trigger_refuses_update_and_delete(chain, statement):
    with pytest.raises(DBAPIError, match="append-only"):
        with chain.begin() as conn:
            conn.exec_driver_sql(statement)
    assert found(chain) == []


def test_the_trigger_refuses_truncate_on_postgresql(fresh_pg_url):
    from core.db import make_engine

    engine = make_engine(fresh_pg_url)
    write_events(engine, 2)
    with pytest.raises(DBAPIError, match="append-only"):
        with engine.begin() as conn:
            conn.exec_driver_sql("TRUNCATE audit_events")
    assert verify_chain(engine).events == 2
    engine.dispose()


# -- anchors ------------------------------------------------------------------------------------

@pytest.fixture
def s3_store(s3_server, s3_bucket) -> S3ObjectStore:
    return S3ObjectStore(s3_bucket, endpoint_url=s3_server)


def anchor(engine: Engine, store) -> object:
    with session_scope(engine) as session:
        return anchor_chain(session, store)


def test_anchors_catch_a_chain_rewritten_with_recomputed_hashes(chain, s3_store):
    assert anchor(chain, s3_store).created
    again = anchor(chain, s3_store)
    assert not again.created and again.anchor.seq == EVENTS
    write_events(chain, 10)
    assert anchor(chain, s3_store).anchor.seq == EVENTS + 10
    assert [a.seq for a in list_anchors(s3_store)] == [EVENTS, EVENTS + 10]
    assert verify_chain(chain, load_anchors(s3_store)).as_dict()["anchors"] == 2

    as_attacker(chain, """UPDATE audit_events SET payload = '{"n": -1}' WHERE seq = 3""",
                lambda conn: rehash_from(conn, 3))
    assert found(chain) == []  # the chain alone cannot tell
    assert found(chain, load_anchors(s3_store)) == [(EVENTS, "anchor_mismatch"), (EVENTS + 10, "anchor_mismatch")]


def test_anchors_are_write_once(chain, s3_store):
    written = anchor(chain, s3_store).anchor
    put = s3_store.put(written.key, b'{"seq": 1, "hash": "forged"}', {})
    assert not put.created
    assert b"forged" not in s3_store.get(written.key)


def test_anchors_catch_a_truncated_and_reset_chain(chain, tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    anchor(chain, store)
    as_attacker(chain, f"DELETE FROM audit_events WHERE seq > {EVENTS - 5}",
                lambda conn: conn.execute(update(AuditChainHead).values(
                    last_seq=EVENTS - 5, last_hash=stored_hash(conn, EVENTS - 5))))
    assert found(chain) == []
    assert found(chain, load_anchors(store)) == [(EVENTS, "anchor_missing")]


def test_a_broken_chain_is_not_anchored(chain, tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    anchor(chain, store)
    write_events(chain, 3)
    as_attacker(chain, f"DELETE FROM audit_events WHERE seq = {EVENTS + 2}")
    with pytest.raises(ChainBroken, match="deleted"):
        anchor(chain, store)
    assert [a.seq for a in list_anchors(store)] == [EVENTS]


def test_the_periodic_task_body_anchors_the_configured_ledger_in_the_configured_store(configure, sqlite_url):
    from core.audit.anchors import anchor_now
    from core.storage import get_store

    configure(DATABASE_URL=sqlite_url)
    assert anchor_now() is None  # nothing to anchor in an empty chain
    write_events(make_engine(sqlite_url), 3)
    result = anchor_now()
    assert (result.created, result.anchor.seq) == (True, 3)
    assert load_anchors(get_store()) == {3: result.anchor.hash}


def test_payloads_that_the_database_respells_still_verify(ledger):
    # jsonb gives 1e20 back as 100000000000000000000 and -0.0 as 0.0; JSON has no NaN.
    awkward = {"big": 1e20, "tiny": 5e-324, "neg_zero": -0.0, "three": 3.0, "sum": 0.1 + 0.2, "huge_int": 2**70,
               "nan": float("nan"), "inf": float("-inf"), "nested": [{"x": 1e16}, [2.5e-8, "tasse ☕"]], "ok": True}
    with session_scope(ledger) as session:
        event = audit.record(session, "probe", actor="t", payload=awkward)
    assert event.payload["nan"] == "NaN" and event.payload["inf"] == "-Infinity"
    assert found(ledger) == []
