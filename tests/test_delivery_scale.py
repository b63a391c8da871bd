"""A 10,000-item batch's results out of a real uvicorn process on PostgreSQL and S3 (moto over HTTP):
the API's resident memory grows by less than 50 MB while it streams the JSONL, the CSV and the zip
archive, and every row's sha256 matches the bytes of its object.

The rows and the 8x8 PNGs are written straight to the ledger and the bucket (tests/deliverykit.py):
generating 10,000 images with the model would take the shared CPU far longer than the stream does.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from core.settings import REPO_ROOT
from tests.apikit import create_role_keys
from tests.deliverykit import seed_delivered
from tests.fixtures.services import free_port

ITEMS = 10_000
MAX_GROWTH_MB = 50

pytestmark = pytest.mark.slow


class RssSampler:
    """The peak resident memory of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int):
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def start_api(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    handle = log.open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"], env=env, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the API did not come up"
        time.sleep(0.3)


@pytest.fixture
def api_process(configure, pg_url, s3_server, s3_bucket, tmp_path) -> Iterator[tuple[psutil.Process, str]]:
    configure(DATABASE_URL=pg_url, S3_BUCKET=s3_bucket, S3_ENDPOINT_URL=s3_server)
    env = {**os.environ, "DATABASE_URL": pg_url, "S3_BUCKET": s3_bucket, "S3_ENDPOINT_URL": s3_server,
           "INSTABATCH_VAR_DIR": str(tmp_path / "var")}
    process, url = start_api(env, tmp_path / "api.log")
    try:
        yield psutil.Process(process.pid), url
    finally:
        process.terminate()
        process.wait(timeout=20)


def streamed(client: httpx.Client, path: str, sink: io.RawIOBase | None = None, **params) -> int:
    size = 0
    with client.stream("GET", path, params=params, timeout=600) as response:
        assert response.status_code == 200, response.read()[:500]
        for chunk in response.iter_bytes():
            size += len(chunk)
            if sink is not None:
                sink.write(chunk)
    return size


def test_ten_thousand_item_results_stream_with_flat_api_memory(api_process, tmp_path):
    process, url = api_process
    keys = create_role_keys("scale", "scale-other")
    started = time.monotonic()
    seeded = seed_delivered("scale", ITEMS, verdicts=("pass", "pass", "review"))
    print(f"RESULT delivery_seed_seconds={time.monotonic() - started:.1f}")
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {keys['submitter']}"})
    path = f"/v1/batches/{seeded.batch_id}"
    streamed(client, f"{path}/results", external_id="sku-00001")  # warm up: imports, pools, first presign
    baseline = process.memory_info().rss

    figures = {}
    jsonl = io.BytesIO()
    for name, route, sink, params in (("jsonl", "results", jsonl, {}), ("csv", "results", None, {"format": "csv"}),
                                      ("zip", "archive.zip", None, {})):
        archive = (tmp_path / "batch.zip").open("wb") if name == "zip" else None
        began = time.monotonic()
        with RssSampler(process.pid) as sampler:
            size = streamed(client, f"{path}/{route}", sink or archive, **params)
        if archive:
            archive.close()
        growth = (sampler.peak - baseline) / 2**20
        figures[name] = growth
        print(f"RESULT delivery_{name}_items={ITEMS} delivery_{name}_mb={size / 2**20:.1f} "
              f"delivery_{name}_seconds={time.monotonic() - began:.1f} delivery_{name}_rss_growth_mb={growth:.1f}")

    rows = [json.loads(line) for line in jsonl.getvalue().splitlines()]
    assert len(rows) == ITEMS and len({row["file_name"] for row in rows}) == ITEMS
    assert all(row["sha256"] == seeded.sha256[row["object_key"]] for row in rows)
    with zipfile.ZipFile(tmp_path / "batch.zip") as archive:
        manifest = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
        assert len(manifest) == ITEMS
        for row in manifest:  # each member's bytes came from S3 through the API
            assert hashlib.sha256(archive.read(row["file_name"])).hexdigest() == seeded.sha256[row["object_key"]]
    assert all(growth < MAX_GROWTH_MB for growth in figures.values()), figures
