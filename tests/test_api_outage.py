"""A database outage is not the request's fault: while PostgreSQL is down every route that needs
it answers 503 in the error shape (not a 500, not a hang), /readyz names the database, and when
it is back the same API serves again by itself.

The test stops and starts a PostgreSQL cluster of its own (initdb in a temporary folder, a free
port on loopback): the shared one on 5432 is never touched.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from core.migrate import upgrade
from tests.apikit import ApiHarness, sample_batch
from tests.fixtures.services import free_port

PG_CTL = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


class PrivatePostgres:
    """A throwaway cluster: ``start()``/``stop()`` at will. PostgreSQL refuses to run as root, so
    as root it runs as ``postgres`` in a folder that user owns."""

    def __init__(self, port: int):
        self.port = port
        self.bin = PG_CTL[-1].parent
        self.root = Path(tempfile.mkdtemp(prefix="instabatch-pg-", dir="/tmp"))
        self.data = self.root / "data"
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run(self.bin / "initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")

    def _run(self, *args: object) -> None:
        command = [str(arg) for arg in args]
        if self.as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-l", self.root / "log", "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run(self.bin / "pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def remove(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    if not PG_CTL:
        pytest.skip("no PostgreSQL server binaries (pg_ctl) on this machine")
    cluster = PrivatePostgres(free_port())
    try:
        cluster.start()
        admin = create_engine(cluster.url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text("CREATE DATABASE instabatch"))
        admin.dispose()
        upgrade(cluster.url("instabatch"))
        yield cluster
    finally:
        cluster.remove()


def assert_unavailable(response) -> None:
    assert response.status_code == 503, (response.request.url, response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == "database_unavailable"
    assert int(response.headers["Retry-After"]) >= 1


def test_database_outage_is_503_and_the_api_recovers_by_itself(private_pg, configure, redis_url):
    configure(DATABASE_URL=private_pg.url("instabatch"), BROKER_URL=redis_url)
    harness = ApiHarness.start(raise_server_exceptions=False)
    batch = harness.submit(body=sample_batch(2))
    item_id = harness.get("submitter", f"/v1/batches/{batch['id']}/items").json()["items"][0]["id"]

    private_pg.stop()
    calls = [
        ("submitter", "POST", "/v1/batches", {"json": sample_batch(2)}),
        ("submitter", "GET", "/v1/batches", {}),
        ("submitter", "GET", f"/v1/batches/{batch['id']}", {}),
        ("submitter", "GET", f"/v1/batches/{batch['id']}/items", {}),
        ("submitter", "POST", f"/v1/batches/{batch['id']}/cancel", {}),
        ("submitter", "POST", f"/v1/batches/{batch['id']}/retry", {}),
        ("submitter", "GET", f"/v1/items/{item_id}", {}),
        ("reviewer", "GET", "/v1/review", {}),
        ("auditor", "GET", "/v1/audit/events", {}),
        ("auditor", "GET", "/v1/audit/verify", {}),
        ("admin", "GET", "/v1/keys", {}),
    ]
    for who, method, path, kwargs in calls:
        assert_unavailable(harness.request(who, method, path, **kwargs))

    ready = harness.get(None, "/readyz")
    assert ready.status_code == 503
    assert ready.json()["error"]["details"]["failed"] == ["database"]
    assert harness.get(None, "/healthz").status_code == 200  # alive: restarting it would not help
    assert harness.get(None, "/metrics").status_code == 200

    private_pg.start()
    deadline = time.monotonic() + 60
    while True:  # the same app and engine: pre-ping replaces the connections the restart broke
        response = harness.get("submitter", f"/v1/batches/{batch['id']}")
        if response.status_code == 200 or time.monotonic() > deadline:
            break
        assert_unavailable(response)
        time.sleep(0.2)
    assert response.status_code == 200, response.text
    assert response.json()["id"] == batch["id"]
    assert harness.submit(body=sample_batch(2))["total_items"] == 2
    assert harness.get(None, "/readyz").status_code == 200
