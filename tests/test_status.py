"""``instabatch status --once`` against real Redis, PostgreSQL and a Celery worker (issue 12)."""
from __future__ import annotations

import re

import os
from collections.abc import Iterator

import pytest
from typer.testing import CliRunner

from cli.main import app
from core.status import snapshot
from tests.faults.services import REDIS_SERVER, PrivateRedis
from tests.workerkit import Stack, build_stack, quiet_outbox, running_worker
from worker.app import WORKER_QUEUES


@pytest.fixture
def own_stack(configure, random_checkpoint, pg_url, s3_server, s3_bucket, tmp_path) -> Iterator[Stack]:
    """PostgreSQL, S3 and a Redis of this test's own: the worker count and the queue depths it
    asserts are exact, and another session's worker on a shared Redis db would take messages."""
    if not os.path.exists(REDIS_SERVER):
        pytest.skip("needs redis-server on PATH for a Redis of the test's own")
    broker = PrivateRedis(tmp_path, dict(os.environ))
    try:
        yield build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), DATABASE_URL=pg_url,
                          BROKER_URL=broker.url, S3_BUCKET=s3_bucket, S3_ENDPOINT_URL=s3_server)
    finally:
        broker.close()


def status_frame() -> str:
    result = CliRunner().invoke(app, ["status", "--once", "--batches", "3"])
    assert result.exit_code == 0, result.output
    return result.output


def depth_of(frame: str, queue: str) -> int:
    match = re.search(rf"│ {re.escape(queue)}\s+│\s+(\d+) │", frame)
    assert match, f"no row for queue {queue} in:\n{frame}"
    return int(match.group(1))


def batch_row(frame: str, batch_id: str) -> str:
    return next(line for line in frame.splitlines() if batch_id[:8] in line)


def test_status_shows_queue_depth_then_the_worker_throughput_and_progress(own_stack: Stack) -> None:
    real = own_stack
    quiet_outbox(real.sessions)  # the session-wide ledger's other chunks stay out of the broker
    prompts = [f"a teapot, colour {i}" for i in range(6)]
    batch_id = real.submit(prompts, chunk_images=2)

    waiting = status_frame()
    assert depth_of(waiting, "generate") == 3, waiting  # 6 images in chunks of 2, no worker yet
    assert "none answered" in waiting
    assert re.search(r"0/6\s+│ 6 queued", batch_row(waiting, batch_id)), waiting

    with running_worker(real) as worker:
        real.wait_until_done(batch_id)
        with real.sessions() as session:
            snap = snapshot(session, real.app, WORKER_QUEUES, batches=3, inspect_timeout=3.0)
        frame = status_frame()
    assert worker.hostname in [view.name for view in snap.workers], snap.workers
    assert snap.queues["generate"] == 0
    assert snap.images_per_second >= 6 / 60
    assert depth_of(frame, "generate") == 0
    assert re.search(r"6/6 finished\s+│ 6 succeeded", batch_row(frame, batch_id)), frame
    assert float(re.search(r"([\d.]+) images/s", frame).group(1)) >= 0.1


def test_status_reports_a_broker_that_does_not_answer_and_still_shows_the_ledger(configure, pg_url) -> None:
    from tests.fixtures.services import free_port

    configure(DATABASE_URL=pg_url, BROKER_URL=f"redis://127.0.0.1:{free_port()}/0")
    frame = status_frame()
    assert "not answering" in frame and "broker:" in frame, frame
    assert "newest batches" in frame
