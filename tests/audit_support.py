"""Fixtures and helpers for the audit tests: a fresh ledger per test, and an attacker's SQL.

Tampering breaks the chain for good, so these tests never share the session-wide ``pg_url``
database: each gets a copy of a migrated template database (fast: ``CREATE DATABASE ... TEMPLATE``).
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import Connection, Engine, create_engine, select, text, update

from core import audit
from core.db import make_engine, session_scope
from core.migrate import upgrade
from models import AuditChainHead, AuditEvent
from tests.fixtures.services import PG_ADMIN_URL


def _pg_url(name: str) -> str:
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    name = f"instabatch_audit_tmpl_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    upgrade(_pg_url(name))
    yield name
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def fresh_pg_url(pg_template: str) -> Iterator[str]:
    """A migrated PostgreSQL database of this test's own."""
    name = f"instabatch_audit_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}" TEMPLATE "{pg_template}"'))
    yield _pg_url(name)
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request) -> Iterator[Engine]:
    """An engine on a fresh, migrated ledger of this test's own, on each database."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "fresh_pg_url")
    engine = make_engine(url)
    yield engine
    engine.dispose()


def write_events(engine: Engine, count: int, *, actor: str = "tester", batch_id: str | None = None) -> None:
    """``count`` events through the real writer, one transaction each (like the services)."""
    for n in range(count):
        with session_scope(engine) as session:
            audit.record(session, "probe", actor=actor, batch_id=batch_id, payload={"n": n, "note": "tasse rouge ☕"})


def bulk_events(engine: Engine, count: int, *, batch: int = 20_000) -> None:
    """``count`` events quickly: the chain is computed in Python, rows go in with bulk inserts."""
    for start in range(0, count, batch):
        size = min(batch, count - start)
        with session_scope(engine) as session:
            audit.record_many(session, (
                {"action": "item.generated", "actor": f"worker-{n % 4}", "batch_id": f"batch-{n // 1000:05d}",
                 "payload": {"n": n, "seed": n * 7, "model": "tiny-instaflow", "prompt": f"a red mug #{n}"}}
                for n in range(start, start + size)
            ))


ROW_COLUMNS = ("seq", "ts", "actor", "action", "batch_id", "item_id", "image_id", "payload", "prev_hash", "hash")


def stored_hash(conn: Connection, seq: int) -> str:
    return conn.execute(select(AuditEvent.hash).where(AuditEvent.seq == seq)).scalar_one()


def rehash_from(conn: Connection, first_seq: int) -> None:
    """Recompute every hash from ``first_seq`` on and move the chain head: a rewritten chain."""
    prev_hash = stored_hash(conn, first_seq - 1) if first_seq > 1 else audit.GENESIS_HASH
    columns = [getattr(AuditEvent, name) for name in ROW_COLUMNS]
    for event in conn.execute(select(*columns).where(AuditEvent.seq >= first_seq).order_by(AuditEvent.seq)).all():
        new_hash = audit.event_hash(prev_hash, event)
        conn.execute(update(AuditEvent).where(AuditEvent.seq == event.seq).values(prev_hash=prev_hash, hash=new_hash))
        prev_hash = new_hash
    conn.execute(update(AuditChainHead).values(last_hash=prev_hash))


def as_attacker(engine: Engine, *steps: str | Callable[[Connection], None]) -> None:
    """Run SQL (strings, or functions of the connection) as someone with DDL rights on the ledger:
    the append-only triggers are switched off first, as such an attacker would."""
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql("ALTER TABLE audit_events DISABLE TRIGGER USER")
        else:
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS audit_events_no_update")
            conn.exec_driver_sql("DROP TRIGGER IF EXISTS audit_events_no_delete")
        for step in steps:
            if isinstance(step, str):
                conn.exec_driver_sql(step)
            else:
                step(conn)
