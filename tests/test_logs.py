"""Structured JSON logs (core/logs.py) of the API and of a real worker, on PostgreSQL + Redis + S3.

Each line is one JSON object; a request's lines carry its request id and the batch it acts on,
a task's lines its task id, batch and items.
"""
from __future__ import annotations

import json
import re

import pytest
import redis

from core.logs import configure_logging, remove_logging
from tests.apikit import ApiHarness, sample_batch
from tests.workerkit import Stack, build_stack, quiet_outbox, running_worker


@pytest.fixture
def json_logs():
    """Call it in the test body: the handler takes the stderr of that moment, capfd's."""
    yield lambda: configure_logging("INFO", "json")
    remove_logging()


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_api_lines_carry_the_request_and_batch_ids(configure, pg_url, redis_url, json_logs, capfd):
    configure(DATABASE_URL=pg_url, BROKER_URL=redis_url)
    json_logs()
    api = ApiHarness.start()
    response = api.post("submitter", "/v1/batches", json=sample_batch(1), headers={"X-Request-ID": "req-42"})
    assert response.headers["X-Request-ID"] == "req-42"
    [accepted] = [line for line in json_lines(capfd.readouterr().err) if line["event"] == "batch accepted"]
    assert (accepted["request_id"], accepted["batch_id"], accepted["items"]) == ("req-42", response.json()["id"], 1)
    assert accepted["level"] == "info" and accepted["logger"] == "api.routes.batches" and accepted["timestamp"]
    other = api.get("submitter", "/v1/batches", headers={"X-Request-ID": "bad id with spaces"})
    assert re.fullmatch(r"[0-9a-f]{32}", other.headers["X-Request-ID"])  # not echoed: a fresh one


def test_worker_lines_carry_the_task_batch_and_item_ids(configure, random_checkpoint, pg_url, redis_url, s3_server,
                                                        s3_bucket, json_logs, capfd):
    redis.Redis.from_url(redis_url).flushdb()
    stack: Stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), DATABASE_URL=pg_url,
                               BROKER_URL=redis_url, S3_BUCKET=s3_bucket, S3_ENDPOINT_URL=s3_server)
    quiet_outbox(stack.sessions)
    with running_worker(stack):
        json_logs()  # after the test worker's own logging setup, as worker/celery_app.py's signal does
        batch_id = stack.submit(["a red mug", "a blue cup"])
        stack.wait_until_done(batch_id)
    done = [line for line in json_lines(capfd.readouterr().err) if line["event"].startswith("chunk done")]
    assert done and all(line["batch_id"] == batch_id and line["task_id"] for line in done)
    assert sorted(i for line in done for i in line["item_ids"]) == sorted(item.id for item in stack.items(batch_id))
    assert done[0]["task"] == "instabatch.generate_chunk"
