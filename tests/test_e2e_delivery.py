"""Done when (issue 13), on the real stack: PostgreSQL, Redis, a Celery worker, S3 (moto over HTTP)
and the API under uvicorn. A CSV submitted with ``instabatch submit --wait --download`` (a separate
process that knows only the API's URL and a key) comes back as a folder whose manifest lists every
image with a matching sha256; a Ctrl-C while waiting and a download interrupted midway both resume
with the same command, on the same batch, without refetching what is there."""
from __future__ import annotations

import csv
import hashlib
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis

from client import DownloadInterrupted, InstaBatchClient
from core.settings import REPO_ROOT
from tests.apikit import create_role_keys
from tests.deliverykit import served_api
from tests.workerkit import build_stack, running_worker

ITEMS = 8
pytestmark = pytest.mark.slow


def cli_env() -> dict[str, str]:
    """Nothing in the CLI's environment but the shell's: it knows only the API's URL and a key."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("DATABASE_", "BROKER_", "S3_", "INSTABATCH_", "AWS_"))}
    return {**env, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}


def as_in_a_terminal() -> None:
    """Ctrl-C as a terminal delivers it. A suite started in the background by a non-interactive shell
    (`cmd &`) inherits SIGINT ignored, and an ignored signal stays ignored across exec: the CLI would
    never see the user's Ctrl-C (seen in CI runs launched that way)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def instabatch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, in its own process."""
    return subprocess.run([sys.executable, "-m", "cli.main", *args], cwd=REPO_ROOT, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)


def result_line(output: str) -> dict[str, str]:
    line = [line for line in output.splitlines() if line.startswith("RESULT download_")][-1]
    return dict(re.findall(r"(\w+)=(\S+)", line))


def test_a_csv_comes_back_as_a_verified_folder_and_a_broken_download_resumes(
        configure, random_checkpoint, pg_url, redis_url, s3_server, s3_bucket, tmp_path):
    redis.Redis.from_url(redis_url).flushdb()
    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), DATABASE_URL=pg_url,
                        BROKER_URL=redis_url, S3_BUCKET=s3_bucket, S3_ENDPOINT_URL=s3_server)
    keys = create_role_keys("marketing", "other")
    products = tmp_path / "spring-mugs.csv"
    products.write_bytes("\ufeffprompt;external_id;seed\r\n".encode() + "".join(
        f'"a ceramic mug, colour {i}\r\nproduct photo";mug-{i};{100 + i}\r\n' for i in range(ITEMS)).encode())
    out = tmp_path / "delivered"

    with served_api() as url:
        # No worker yet: the batch waits in the queue, and the user presses Ctrl-C.
        waiting = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "submit", str(products), "--api", url, "--key", keys["submitter"],
             "--width", "64", "--height", "64", "--wait"], cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, preexec_fn=as_in_a_terminal)
        first_line = _read_line(waiting, timeout=120)
        assert "(new)" in first_line, first_line
        time.sleep(1.0)  # following the event stream now
        waiting.send_signal(signal.SIGINT)
        rest = waiting.communicate(timeout=60)[0]
        assert waiting.returncode == 130 and "run the same command again to resume" in rest, rest

    with served_api() as url, running_worker(stack):
        done = instabatch("submit", str(products), "--api", url, "--key", keys["submitter"], "--width", "64",
                          "--height", "64", "--wait", "--download", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        assert "spring-mugs" in done.stdout and "(resumed)" in done.stdout and "succeeded" in done.stdout
        assert _batch_id(done.stdout) == _batch_id(first_line)
        figures = result_line(done.stdout)
        assert (figures["download_images"], figures["download_fetched"]) == (str(ITEMS), str(ITEMS))

        manifest = list(csv.DictReader((out / "manifest.csv").open(encoding="utf-8")))
        assert sorted(row["external_id"] for row in manifest) == sorted(f"mug-{i}" for i in range(ITEMS))
        for row in manifest:
            assert row["file_name"] == f"images/{row['external_id']}.png"
            assert hashlib.sha256((out / row["file_name"]).read_bytes()).hexdigest() == row["sha256"]
        stored = {image.storage_key: image.sha256 for image in stack.images(_batch_id(done.stdout))}
        assert {row["object_key"]: row["sha256"] for row in manifest} == stored

        # A second folder, cut off after three files (a dropped connection, a Ctrl-C) ...
        partial = tmp_path / "partial"
        taken: list[str] = []

        def cut_after_three(row, new) -> None:
            taken.append(row.file_name)
            if len(taken) == 3:
                raise DownloadInterrupted("cut")

        with InstaBatchClient(url, keys["submitter"]) as client, pytest.raises(DownloadInterrupted):
            client.download(_batch_id(done.stdout), partial, on_file=cut_after_three)
        # ... resumes with the same command: the same batch (Idempotency-Key), only the missing files.
        resumed = instabatch("submit", str(products), "--api", url, "--key", keys["submitter"], "--width", "64",
                             "--height", "64", "--download", str(partial))
        assert resumed.returncode == 0, resumed.stdout + resumed.stderr
        assert "resumed" in resumed.stdout and _batch_id(resumed.stdout) == _batch_id(done.stdout)
        figures = result_line(resumed.stdout)
        assert (figures["download_kept"], figures["download_fetched"]) == ("3", str(ITEMS - 3))
    for row in csv.DictReader((partial / "manifest.csv").open(encoding="utf-8")):
        assert hashlib.sha256((partial / row["file_name"]).read_bytes()).hexdigest() == row["sha256"]


def _batch_id(output: str) -> str:
    return re.search(r"batch ([0-9a-f-]{36})", output).group(1)


def _read_line(process: subprocess.Popen, timeout: float) -> str:
    """The process's first line of output, or a failure (not a hang) if none comes in time."""
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines:
        process.kill()
        raise AssertionError(f"no output from the CLI within {timeout}s")
    return lines[0]
