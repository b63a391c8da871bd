"""``instabatch serve`` and ``instabatch worker`` started from the same folder share the embedded
defaults (./var: SQLite ledger, SQLite broker, local objects): a batch posted over HTTP is generated
by the worker process, and its images come back through the API."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import httpx
import pytest

from tests.fixtures.services import free_port, wait_for_port


def start(args: list[str], cwd, env, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], cwd=cwd, env=env,
                            stdout=open(log, "wb"), stderr=subprocess.STDOUT)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture
def folder_env(tmp_path, random_checkpoint) -> dict[str, str]:
    """A clean environment: nothing but the model points anywhere, so ./var holds every part."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("DATABASE_URL", "BROKER_URL", "S3_", "INSTABATCH_"))}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env.update(INSTABATCH_MODEL=str(random_checkpoint), PYTHONPATH=repo, INSTABATCH_TORCH_THREADS="1")
    return env


def test_serve_and_worker_from_one_folder_share_the_embedded_defaults(tmp_path, folder_env):
    created = subprocess.run([sys.executable, "-m", "cli.main", "keys", "create", "--role", "submitter",
                              "--team", "mkt", "--name", "e2e"], cwd=tmp_path, env=folder_env,
                             capture_output=True, text=True, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    key = created.stdout.strip().splitlines()[-1]
    port = free_port()
    api = start(["serve", "--port", str(port)], tmp_path, folder_env, tmp_path / "api.log")
    worker = start(["worker", "--loglevel", "WARNING"], tmp_path, folder_env, tmp_path / "worker.log")
    try:
        wait_for_port(port, timeout=60)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                              timeout=30)
        body = {"name": "embedded", "items": [{"prompt": f"a mug, variant {i}", "seed": i} for i in range(3)]}
        response = client.post("/v1/batches", json=body)
        assert response.status_code == 202, response.text
        batch_id = response.json()["id"]
        deadline = time.monotonic() + 180
        while (status := client.get(f"/v1/batches/{batch_id}").json())["status"] not in ("succeeded",):
            assert time.monotonic() < deadline, (status, (tmp_path / "worker.log").read_text()[-3000:])
            assert status["status"] in ("queued", "running"), status
            time.sleep(0.5)
        items = client.get(f"/v1/batches/{batch_id}/items").json()["items"]
        assert len(items) == 3
        image = items[0]["images"][0]
        assert hashlib.sha256(client.get(image["url"]).content).hexdigest() == image["sha256"]
    finally:
        stop(api)
        stop(worker)
    assert (tmp_path / "var" / "instabatch.db").is_file() and (tmp_path / "var" / "broker.db").is_file()
    assert len(list((tmp_path / "var" / "objects").rglob("*.png"))) == 3
