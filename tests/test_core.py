"""The shared core on real parts: migrations, the audit chain, object storage over HTTP."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import select

from core import audit
from core.db import make_engine, session_scope
from core.migrate import downgrade, upgrade
from core.provenance import encode_png, read_png_provenance
from core.storage import LocalObjectStore, S3ObjectStore
from models import AuditEvent


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


def test_migrations_go_down_and_up_on_sqlite(sqlite_url):
    downgrade(sqlite_url)
    upgrade(sqlite_url)
    with session_scope(make_engine(sqlite_url)) as session:
        assert audit.record(session, "probe", actor="test").seq >= 1


def test_concurrent_writers_build_one_linear_chain(ledger_url):
    engine = make_engine(ledger_url)
    errors: list[BaseException] = []

    def write(worker: int) -> None:
        try:
            for n in range(10):
                with session_scope(engine) as session:
                    audit.record(session, "probe", actor=f"w{worker}", payload={"n": n})
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with session_scope(engine) as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.seq)).all()
    assert len(events) >= 40
    assert [e.seq for e in events] == list(range(events[0].seq, events[0].seq + len(events)))
    for previous, event in zip(events, events[1:]):
        assert event.prev_hash == previous.hash
        assert event.hash == audit.event_hash(previous.hash, event)
    engine.dispose()


def test_s3_store_is_write_once_and_keeps_metadata(s3_server, s3_bucket):
    store = S3ObjectStore(s3_bucket, endpoint_url=s3_server)
    first = store.put("b/1.png", b"first", {"prompt": "un café, rouge", "seed": "7"})
    again = store.put("b/1.png", b"second", {"prompt": "other"})
    assert first.created and not again.created
    assert again.sha256 == first.sha256
    assert store.get("b/1.png") == b"first"
    meta = store.head("b/1.png")
    assert meta["prompt"] == "un café, rouge" and meta["seed"] == "7"
    assert store.head("missing.png") is None
    assert store.presigned_url("b/1.png").startswith(s3_server)
    public = S3ObjectStore(s3_bucket, endpoint_url=s3_server, public_endpoint_url="https://images.example.com")
    assert public.presigned_url("b/1.png").startswith(f"https://images.example.com/{s3_bucket}/b/1.png?")


def test_local_store_is_write_once_and_refuses_escaping_keys(tmp_path):
    store = LocalObjectStore(tmp_path / "objects")
    assert store.put("a/x.png", b"one", {"seed": "1"}).created
    assert not store.put("a/x.png", b"two", {}).created
    assert store.get("a/x.png") == b"one"
    assert store.head("a/x.png")["seed"] == "1"
    with pytest.raises(Exception, match="escapes"):
        store.put("../evil.png", b"x", {})


def test_png_provenance_round_trips_and_is_deterministic():
    from PIL import Image

    image = Image.new("RGB", (16, 16), (200, 10, 10))
    provenance = {"prompt": "une tasse rouge ☕", "seed": 42, "model": "tiny"}
    data = encode_png(image, provenance)
    assert data == encode_png(image, dict(reversed(provenance.items())))
    assert read_png_provenance(data) == {"prompt": "une tasse rouge ☕", "seed": "42", "model": "tiny"}


def test_migrations_build_exactly_the_models_tables(ledger_url):
    """A model change without its migration (or the reverse) fails here, on both databases."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from models import Base

    engine = make_engine(ledger_url)
    with engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    engine.dispose()
    assert differences == []


def test_both_stores_list_the_keys_that_put_takes(tmp_path, s3_server, s3_bucket):
    stores = [LocalObjectStore(tmp_path / "objects"), S3ObjectStore(s3_bucket, endpoint_url=s3_server, prefix="pre")]
    for store in stores:
        for key in ("audit/anchors/2.json", "audit/anchors/1.json", "batches/x/0.png"):
            store.put(key, b"x", {"k": "v"})
        assert store.list_keys("audit/anchors/") == ["audit/anchors/1.json", "audit/anchors/2.json"]
        assert len(store.list_keys()) == 3
