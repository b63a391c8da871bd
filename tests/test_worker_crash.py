"""A prompt that kills the worker process: real Celery worker subprocesses (prefork) on Redis + PostgreSQL + S3.

The child dies (os._exit), Celery requeues the chunk (task_reject_on_worker_lost), the next run
takes the items one at a time, and after MAX_ATTEMPTS the killer prompt is ``dead`` while
every other item of its chunk and batch succeeds.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis

from core.settings import REPO_ROOT
from tests.worker_fault_app import CRASH_MARKER
from tests.workerkit import Stack, build_stack
from worker.app import WORKER_QUEUES


@pytest.fixture
def real(configure, random_checkpoint, pg_url, redis_url, s3_server, s3_bucket) -> Stack:
    redis.Redis.from_url(redis_url).flushdb()
    return build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), DATABASE_URL=pg_url,
                       BROKER_URL=redis_url, S3_BUCKET=s3_bucket, S3_ENDPOINT_URL=s3_server, MAX_ATTEMPTS="3",
                       INSTABATCH_CHUNK_IMAGES="8", INSTABATCH_TORCH_THREADS="1")


def start_celery_worker(app_module: str, log_path, pool: str = "prefork") -> subprocess.Popen:
    command = [sys.executable, "-m", "celery", "-A", app_module, "worker", "--pool", pool, "--concurrency", "1",
               "-Q", ",".join(WORKER_QUEUES), "--loglevel", "INFO", "--without-heartbeat", "--without-mingle",
               "--without-gossip"]
    return subprocess.Popen(command, cwd=REPO_ROOT, env=dict(os.environ), stdout=open(log_path, "wb"),
                            stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def test_a_prompt_that_kills_the_worker_ends_dead_and_its_neighbours_succeed(real: Stack, tmp_path):
    prompts = ["a red mug", "a blue cup", f"a {CRASH_MARKER} vase", "a green lamp", "a grey chair"]
    batch_id = real.submit(prompts)  # one chunk: the killer shares it with four innocent items
    worker = start_celery_worker("tests.worker_fault_app", tmp_path / "worker.log")
    try:
        counts = real.wait_until_done(batch_id, timeout=300)
    except TimeoutError:
        print((tmp_path / "worker.log").read_text()[-5000:])
        raise
    finally:
        stop(worker)

    assert counts["succeeded"] == 4 and counts["dead"] == 1, counts
    items = {item.prompt: item for item in real.items(batch_id)}
    killer = items[prompts[2]]
    assert killer.state == "dead" and killer.attempts == 3 and "dead after 3 attempts" in killer.error
    assert all(item.attempts <= 2 for item in items.values() if item is not killer)  # never blamed for it
    assert len(real.images(batch_id)) == 4
    assert len(real.events(batch_id, "item.dead")) == 1
    log = (tmp_path / "worker.log").read_text()
    assert "WorkerLostError" in log or "exited with 'exitcode 13'" in log


@pytest.fixture
def short_limits(configure, random_checkpoint, pg_url, redis_url, s3_server, s3_bucket) -> Stack:
    redis.Redis.from_url(redis_url).flushdb()
    return build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), DATABASE_URL=pg_url,
                       BROKER_URL=redis_url, S3_BUCKET=s3_bucket, S3_ENDPOINT_URL=s3_server, MAX_ATTEMPTS="3",
                       INSTABATCH_CHUNK_IMAGES="8", INSTABATCH_TORCH_THREADS="1", TASK_SOFT_TIME_LIMIT="4",
                       TASK_TIME_LIMIT="40", VISIBILITY_TIMEOUT="60", LEASE_SECONDS="90")


def test_an_item_that_outlasts_the_soft_time_limit_is_given_back_then_dead_its_neighbours_succeed(
        short_limits: Stack, tmp_path):
    from tests.worker_fault_app import SLOW_MARKER

    prompts = ["a red mug", f"a {SLOW_MARKER} vase", "a green lamp"]
    batch_id = short_limits.submit(prompts)
    worker = start_celery_worker("tests.worker_fault_app", tmp_path / "worker.log")
    try:
        counts = short_limits.wait_until_done(batch_id, timeout=300)
    except TimeoutError:
        print((tmp_path / "worker.log").read_text()[-5000:])
        raise
    finally:
        stop(worker)

    assert counts["succeeded"] == 2 and counts["dead"] == 1, counts
    slow = next(item for item in short_limits.items(batch_id) if SLOW_MARKER in item.prompt)
    assert slow.state == "dead" and "SoftTimeLimitExceeded" in slow.error
    assert not short_limits.events(batch_id, "item.failed")  # a deadline is not the item's fault
