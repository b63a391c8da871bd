"""The typed client and the remote CLI against a real uvicorn (SQLite ledger, local store): progress
as server-sent events, downloads that verify sha256 and resume without refetching, a submission
retried after network errors landing as one batch, and ``instabatch batches``."""
from __future__ import annotations

import csv
import hashlib
import threading
import time

import httpx
import pytest
from sqlalchemy import update
from typer.testing import CliRunner

from cli.main import app
from client import ApiError, DownloadInterrupted, InstaBatchClient
from core.db import session_scope
from models import Item, ItemState
from tests.apikit import create_role_keys
from tests.deliverykit import seed_delivered, served_api

TEAM = "mkt"


@pytest.fixture
def remote(configure, sqlite_url):
    configure(DATABASE_URL=sqlite_url)
    keys = create_role_keys(TEAM, "other")
    with served_api() as url:
        yield url, keys


def test_events_push_progress_until_the_batch_completes(remote):
    url, keys = remote
    seeded = seed_delivered(TEAM, 4)
    with session_scope() as session:  # two items back to running: the batch is not done
        session.execute(update(Item).where(Item.batch_id == seeded.batch_id, Item.seq >= 2)
                        .values(state=ItemState.RUNNING.value))

    def finish_later() -> None:
        for seq in (2, 3):
            time.sleep(0.6)
            with session_scope() as session:
                session.execute(update(Item).where(Item.batch_id == seeded.batch_id, Item.seq == seq)
                                .values(state=ItemState.SUCCEEDED.value))

    threading.Thread(target=finish_later, daemon=True).start()
    with InstaBatchClient(url, keys["submitter"]) as client:
        events = list(client.events(seeded.batch_id, interval=0.2))
    assert [event.done_items for event in events][0] == 2
    assert events[-1].finished and events[-1].done_items == 4 and events[-1].status == "succeeded"
    assert [e.done_items for e in events] == sorted(e.done_items for e in events) and len(events) >= 3
    assert events[-1].review["pass"] == 4


def test_waiting_reconnects_after_dropped_connections(remote):
    url, keys = remote
    seeded = seed_delivered(TEAM, 3)
    seen = []
    with InstaBatchClient(url, keys["submitter"], transport=FlakyTransport(3)) as client:
        final = client.wait(seeded.batch_id, on_progress=seen.append)
    assert final.finished and final.done_items == 3 and seen[-1] == final


def test_events_are_scoped_and_authenticated(remote):
    url, keys = remote
    seeded = seed_delivered(TEAM, 1)
    for key, status in ((keys["other_team"], 404), ("ib_nope", 401)):
        with InstaBatchClient(url, key) as client, pytest.raises(ApiError) as error:
            list(client.events(seeded.batch_id))
        assert error.value.status == status
    raw = httpx.get(f"{url}/v1/batches/{seeded.batch_id}/events", headers={
        "Authorization": f"Bearer {keys['reviewer']}"}, timeout=10)  # a reviewer sees every team
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert "event: progress" in raw.text and "event: completed" in raw.text


def test_an_interrupted_download_resumes_without_refetching(remote, tmp_path):
    url, keys = remote
    seeded = seed_delivered(TEAM, 10, failed_every=5)
    seen: list[str] = []

    def stop_after_four(row, new) -> None:
        seen.append(row.file_name)
        if len(seen) == 4:
            raise DownloadInterrupted("Ctrl-C")

    with InstaBatchClient(url, keys["submitter"]) as client:
        with pytest.raises(DownloadInterrupted):
            client.download(seeded.batch_id, tmp_path, on_file=stop_after_four)
        (tmp_path / seen[0]).write_bytes(b"torn")  # a damaged file is fetched again
        summary = client.download(seeded.batch_id, tmp_path)
    assert (summary.rows, summary.images, summary.fetched, summary.kept) == (10, 8, 5, 3)
    rows = list(csv.DictReader((tmp_path / "manifest.csv").open()))
    assert len(rows) == 10
    for row in rows:
        if row["file_name"]:
            assert hashlib.sha256((tmp_path / row["file_name"]).read_bytes()).hexdigest() == row["sha256"]
    assert not list(tmp_path.rglob("*.part"))


class FlakyTransport(httpx.HTTPTransport):
    """Drops the first ``failures`` connections, as a network blip would."""

    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures

    def handle_request(self, request):
        if self.failures:
            self.failures -= 1
            raise httpx.ConnectError("network is unreachable", request=request)
        return super().handle_request(request)


def test_a_submission_survives_network_errors_and_a_resubmit_is_the_same_batch(remote, tmp_path):
    url, keys = remote
    products = tmp_path / "spring.csv"
    products.write_text("prompt;external_id\na red mug;sku-1\na blue mug;sku-2\n")
    with InstaBatchClient(url, keys["submitter"], transport=FlakyTransport(2)) as client:
        first, created = client.submit_file(products, fields={"priority": "high"})
    assert created and first.name == "spring" and first.priority == "high" and first.total_items == 2
    with InstaBatchClient(url, keys["submitter"]) as client:
        again, created = client.submit_file(products, fields={"priority": "high"})
        other, other_created = client.submit_file(products, fields={"priority": "low"})
    assert (again.id, created) == (first.id, False)
    assert other.id != first.id and other_created


def test_batches_list_show_cancel_retry_from_the_cli(remote, tmp_path):
    url, keys = remote
    products = tmp_path / "autumn.jsonl"
    products.write_text('{"prompt": "a mug", "external_id": "a"}\n{"prompt": "a cup", "external_id": "b"}\n')
    runner = CliRunner()
    env = {"INSTABATCH_API": url, "INSTABATCH_API_KEY": keys["submitter"], "COLUMNS": "200"}
    submitted = runner.invoke(app, ["submit", str(products)], env=env)
    assert submitted.exit_code == 0, submitted.output
    batch_id = submitted.output.split("batch ", 1)[1].split()[0]
    listed = runner.invoke(app, ["batches", "list"], env=env)
    assert listed.exit_code == 0 and batch_id in listed.output and "autumn" in listed.output
    shown = runner.invoke(app, ["batches", "show", batch_id], env=env)
    assert shown.exit_code == 0 and '"total_items": 2' in shown.output
    cancelled = runner.invoke(app, ["batches", "cancel", batch_id], env=env)
    assert cancelled.exit_code == 0 and "cancelled=2" in cancelled.output
    retried = runner.invoke(app, ["batches", "retry", batch_id], env=env)
    assert retried.exit_code == 0 and "requeued=0" in retried.output
    missing = runner.invoke(app, ["batches", "show", "00000000-0000-0000-0000-000000000000"], env=env)
    assert missing.exit_code == 2 and "404" in missing.output
    whole = tmp_path / "whole.json"
    whole.write_text('{"items": [{"prompt": "a mug"}], "priority": "low"}')
    json_batch = runner.invoke(app, ["submit", str(whole)], env=env)
    assert json_batch.exit_code == 0 and "'whole'" in json_batch.output, json_batch.output
    mixed = runner.invoke(app, ["submit", str(whole), "--priority", "high"], env=env)
    assert mixed.exit_code == 2 and "put priority in the file itself" in mixed.output


def test_a_download_of_what_can_ship_takes_passed_or_approved_images_only(remote, tmp_path):
    url, keys = remote
    seeded = seed_delivered(TEAM, 6, verdicts=("pass", "review", "review"),
                            decisions=(None, "approved", "rejected"))
    with InstaBatchClient(url, keys["submitter"]) as client:
        summary = client.download(seeded.batch_id, tmp_path, verdict=["pass"], decision=["approved"])
    names = sorted(path.name for path in (tmp_path / "images").iterdir())
    assert names == ["sku-00000.png", "sku-00001.png", "sku-00003.png", "sku-00004.png"]
    assert (summary.rows, summary.fetched) == (4, 4)
