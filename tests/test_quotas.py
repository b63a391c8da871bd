"""Quotas per team on PostgreSQL + Redis through the API and the CLI (docs/quotas.md).

Over a limit a submission is a 429 in the error shape with Retry-After, and writes nothing;
an admin's override (API or CLI) takes effect at once and is an audit event.
"""
from __future__ import annotations

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from cli.main import app as cli
from core.db import session_scope
from models import AuditEvent
from tests.apikit import ApiHarness, ledger_rows, sample_batch


@pytest.fixture
def harness(configure, pg_url, redis_url) -> ApiHarness:
    # Redis keeps the submission counts (the broker by default); no worker: submissions stay queued.
    configure(DATABASE_URL=pg_url, BROKER_URL=redis_url, QUOTA_SUBMISSIONS_PER_MINUTE="3",
              QUOTA_MAX_QUEUED_IMAGES="1000", QUOTA_RETRY_AFTER_SECONDS="45")
    return ApiHarness.start()


def limit_events(team: str) -> list[dict]:
    with session_scope() as session:
        return [event.payload for event in session.scalars(
            select(AuditEvent).where(AuditEvent.action == "team.limits_changed").order_by(AuditEvent.seq))
            if event.payload["team"] == team]


def assert_429(response, code: str) -> dict:
    assert response.status_code == 429, response.text
    body = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60 and body["error"]["details"]["retry_after_s"] == retry_after
    return body["error"]


def test_submissions_over_the_rate_are_429_with_retry_after_and_a_replay_is_free(harness: ApiHarness):
    for n in range(3):
        harness.submit(body=sample_batch(1, name=f"b{n}"), headers={"Idempotency-Key": f"k{n}"})
    before = ledger_rows()
    error = assert_429(harness.post("submitter", "/v1/batches", json=sample_batch(1, name="b3")), "rate_limited")
    assert error["details"]["limit_per_minute"] == 3
    assert ledger_rows() == before  # nothing half-written
    replay = harness.post("submitter", "/v1/batches", json=sample_batch(1, name="b0"), headers={"Idempotency-Key": "k0"})
    assert replay.status_code == 200  # the same request again is not a new submission
    assert harness.post("other_team", "/v1/batches", json=sample_batch(1)).status_code == 202  # per team


def test_an_admin_override_of_queued_images_applies_at_once_and_is_audited(harness: ApiHarness):
    team = harness.team
    changed = harness.request("admin", "PATCH", f"/v1/teams/{team}/limits",
                              json={"max_queued_images": 5, "submissions_per_minute": 0})
    assert changed.status_code == 200, changed.text
    assert changed.json()["overrides"] == {"max_queued_images": 5, "submissions_per_minute": 0}
    harness.submit(body=sample_batch(4))
    before = ledger_rows()
    error = assert_429(harness.post("submitter", "/v1/batches", json=sample_batch(2)), "queued_images_quota")
    assert error["details"] == {"limit": 5, "queued": 4, "requested": 2, "retry_after_s": 45}
    assert ledger_rows() == before
    assert harness.submit(body=sample_batch(1))["total_items"] == 1
    read = harness.get("submitter", f"/v1/teams/{team}/limits").json()
    assert (read["max_queued_images"], read["queued_images"]) == (5, 5)
    reset = harness.request("admin", "PATCH", f"/v1/teams/{team}/limits", json={"max_queued_images": None})
    assert reset.json()["max_queued_images"] == 1000 and reset.json()["overrides"] == {"submissions_per_minute": 0}
    assert [event["after"] for event in limit_events(team)] == [
        {"max_queued_images": 5, "submissions_per_minute": 0}, {"submissions_per_minute": 0}]
    bad = harness.request("admin", "PATCH", f"/v1/teams/{team}/limits", json={"max_queued_images": -1})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"


def test_the_cli_overrides_and_resets_a_limit_with_an_audit_event(harness: ApiHarness):
    runner = CliRunner()
    team = harness.team
    result = runner.invoke(cli, ["teams", "limits", team, "--submissions-per-minute", "1"])
    assert result.exit_code == 0, result.output
    assert "submissions_per_minute\t1\toverride" in result.output
    harness.submit(body=sample_batch(1))
    assert_429(harness.post("submitter", "/v1/batches", json=sample_batch(1)), "rate_limited")
    result = runner.invoke(cli, ["teams", "limits", team, "--submissions-per-minute", "default"])
    assert "submissions_per_minute\t3\tdefault" in result.output
    assert [event["changes"] for event in limit_events(team)] == [
        {"submissions_per_minute": 1}, {"submissions_per_minute": None}]
    assert runner.invoke(cli, ["teams", "limits", team, "--max-queued-images", "lots"]).exit_code == 2
