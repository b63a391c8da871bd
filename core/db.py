"""Database engine and sessions for the ledger (PostgreSQL in production, SQLite embedded).

The pool is sized from ``DB_POOL_SIZE``, the same number the API admits requests to the database
with (``api/deps.py``): a request never waits for a connection while holding one or a thread, so
the pool cannot deadlock; the few overflow connections are for callers outside those permits
(``/readyz``, ``/metrics``). A checkout that still waits ``DB_POOL_TIMEOUT`` raises instead of
hanging (the API answers 503), and ``pool_pre_ping`` replaces connections a database restart broke.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache

from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.orm import Session, sessionmaker

from core.settings import Settings, get_settings
from models.base import as_utc, utcnow


def normalize_url(url: str) -> str:
    """Use psycopg 3 for plain ``postgresql://`` URLs (SQLAlchemy would pick psycopg2)."""
    for plain in ("postgresql://", "postgres://"):
        if url.startswith(plain):
            return "postgresql+psycopg://" + url[len(plain):]
    return url


# Connections beyond DB_POOL_SIZE, for the callers that take no request permit (health, metrics).
POOL_OVERFLOW = 2


def make_engine(url: str) -> Engine:
    url = normalize_url(url)
    settings = get_settings()
    pool = {"pool_size": settings.db_pool_size, "max_overflow": POOL_OVERFLOW,
            "pool_timeout": settings.db_pool_timeout}
    if url.startswith("sqlite"):
        in_memory = url in ("sqlite://", "sqlite:///:memory:") or "mode=memory" in url
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                               **({} if in_memory else pool))
        event.listen(engine, "connect", _tune_sqlite)
        return engine
    connect_args = {"connect_timeout": settings.db_connect_timeout, "options": _session_options(settings)}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args, **pool)


# The server probes an idle connection after 30 s, every 10 s, 3 times: a vanished host's
# connection (and its slot) is gone within about a minute.
TCP_KEEPALIVES = {"tcp_keepalives_idle": 30, "tcp_keepalives_interval": 10, "tcp_keepalives_count": 3}


def _session_options(settings: Settings) -> str:
    """Server settings for each session (libpq ``options``): what frees the locks of a host cut off
    mid-transaction (docs/architecture.md, "Several hosts")."""
    values = {**TCP_KEEPALIVES,
              "idle_in_transaction_session_timeout": int(settings.db_idle_in_transaction_seconds * 1000)}
    return " ".join(f"-c {name}={value}" for name, value in values.items())


def _tune_sqlite(dbapi_connection, _record) -> None:
    # WAL lets the API read while a worker writes; the busy timeout absorbs the short write locks
    # that the API, the worker and the broker (also SQLite when embedded) take in turn.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


_ENGINES_LOCK = threading.Lock()


@lru_cache(maxsize=8)
def _cached_engine(url: str) -> Engine:
    return make_engine(url)


def engine_for(url: str) -> Engine:
    """The process's one engine for ``url``. Under a lock: lru_cache alone lets a burst of first
    requests each build an engine (and a pool) of its own, each keeping connections past the budget."""
    with _ENGINES_LOCK:
        return _cached_engine(url)


engine_for.cache_clear = _cached_engine.cache_clear  # type: ignore[attr-defined]
engine_for.cache_info = _cached_engine.cache_info  # type: ignore[attr-defined]


def get_engine() -> Engine:
    return engine_for(get_settings().database_url)


def session_factory(engine: Engine | None = None) -> sessionmaker[Session]:
    return sessionmaker(bind=engine or get_engine(), expire_on_commit=False)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """One unit of work: commits on success, rolls back on any error."""
    session = session_factory(engine)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def ledger_now(session: Session) -> datetime:
    """The ledger's clock: lease expiries, claims and sends written by one host are compared by
    another, so on PostgreSQL they all read the database server's clock, never a host's own (a
    host whose clock is behind by a lease would lose every lease it takes; docs/architecture.md,
    "Several hosts"). SQLite is a file on one host: that host's clock."""
    if session.get_bind().dialect.name == "postgresql":
        return as_utc(session.scalar(select(func.clock_timestamp())))
    return utcnow()
