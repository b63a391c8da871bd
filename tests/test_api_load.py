"""50 concurrent clients against one real API process on PostgreSQL + Redis: no errors, and every
batch that was accepted can be read back. The figures (and the 60 s runs at 50 and 200 clients)
are ``make load``'s; this test never asserts a time.

Before the fix, 15+ concurrent submissions deadlocked the pool (each session held a connection
while its outbox publish waited for a second one) and this test saw read time-outs.
"""
from __future__ import annotations

import json
import socket
import time
import uuid

import httpx
import redis
from sqlalchemy import create_engine, func, select

from bench.load import api_server, create_submitter_key, run_level, server_counters
from core.db import normalize_url
from models import Batch
from tests.apikit import sample_batch

CLIENTS = 50
SECONDS = 5.0


def test_fifty_clients_submit_and_poll_without_errors(pg_url, redis_url, tmp_path):
    team = f"load-{uuid.uuid4().hex[:8]}"
    key = create_submitter_key(pg_url, team=team)
    try:
        with api_server(pg_url, redis_url, tmp_path) as (url, _process, log_path):
            result = run_level(url, key, CLIENTS, SECONDS, items=4, polls=2, timeout=60.0)
            counters = server_counters(url)
            assert result.errors == 0, (result.line(), log_path.read_text()[-3000:])
            assert result.submits >= CLIENTS  # every client got at least one batch through
            assert result.polls == 2 * result.submits
            assert counters == {"nested_checkouts": "0", "permit_timeouts": "0"}

            headers = {"Authorization": f"Bearer {key}"}
            with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
                for batch_id in result.batch_ids:
                    response = client.get(f"/v1/batches/{batch_id}")
                    assert response.status_code == 200, response.text
                    assert response.json()["total_items"] == 4
            assert "Traceback" not in log_path.read_text()

        engine = create_engine(normalize_url(pg_url))
        with engine.connect() as conn:
            stored = conn.scalar(select(func.count()).select_from(Batch).where(Batch.team == team))
        engine.dispose()
        assert stored == len(result.batch_ids) == result.submits
    finally:
        redis.Redis.from_url(redis_url).flushdb()  # no worker ran: drop the chunks the API published


def test_a_slow_upload_holds_no_database_permit(pg_url, redis_url, tmp_path):
    """With one database permit, a submission whose body is still arriving must not keep others out:
    the body is read before the session is opened (api/routes/batches.py). Before, the upload held
    the only permit and the read below waited DB_POOL_TIMEOUT for a 503 busy."""
    key = create_submitter_key(pg_url, team=f"slow-{uuid.uuid4().hex[:8]}")
    body = json.dumps(sample_batch(2)).encode()
    try:
        with api_server(pg_url, redis_url, tmp_path, extra_env={"DB_POOL_SIZE": "1", "DB_POOL_TIMEOUT": "3"}
                        ) as (url, _process, log_path):
            host, port = url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=30) as upload:
                upload.sendall((f"POST /v1/batches HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                               + body[:10])
                time.sleep(1.0)  # the request is in the app, its body half sent
                read = httpx.get(f"{url}/v1/batches", headers={"Authorization": f"Bearer {key}"}, timeout=30)
                assert read.status_code == 200, read.text
                upload.sendall(body[10:])
                answer = upload.recv(65536).decode()
            assert answer.startswith("HTTP/1.1 202"), answer[:500]
            assert server_counters(url)["permit_timeouts"] == "0", log_path.read_text()[-2000:]
    finally:
        redis.Redis.from_url(redis_url).flushdb()
