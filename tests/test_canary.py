"""Canary roll-out on PostgreSQL (docs/models.md, "Canary roll-out"): a fraction of a batch's items run
a candidate model, chosen exactly and deterministically; a bad canary is a 422 that writes nothing;
an admin's start, promote and rollback (API and CLI) change what later batches get and are audit
events on an intact chain; responses and the report compare QC verdicts per model; and, end to
end through a real Celery worker, the candidate's items are made by the candidate.
"""
from __future__ import annotations

import json
from decimal import ROUND_HALF_UP, Decimal

import pytest
from sqlalchemy import insert, select
from typer.testing import CliRunner

from cli.main import app as cli
from core import canary, ledger
from core.audit.verify import verify_chain
from core.db import get_engine, session_scope
from core.dispatch import dispatch_pending
from core.params import GenerationParams
from core.registry import get_registry
from models import AuditEvent, Image, Item, Outbox, utcnow
from models.base import new_id
from tests.apikit import ApiHarness, ledger_rows, sample_batch
from tests.workerkit import Stack, running_worker

CANDIDATE = "2rf-4"


@pytest.fixture
def harness(configure, pg_url, redis_url) -> ApiHarness:
    # No worker: submissions stay queued; quotas off so the many submissions here are never 429.
    configure(DATABASE_URL=pg_url, BROKER_URL=redis_url, QUOTA_SUBMISSIONS_PER_MINUTE="0",
              QUOTA_MAX_QUEUED_IMAGES="0")
    return ApiHarness.start()


def items_of(batch_id: str) -> list[Item]:
    with session_scope() as session:
        return list(session.scalars(select(Item).where(Item.batch_id == batch_id).order_by(Item.seq)))


def canary_seqs(batch_id: str) -> list[int]:
    return [item.seq for item in items_of(batch_id) if item.model == CANDIDATE]


def events(action: str, team: str) -> list[AuditEvent]:
    with session_scope() as session:
        return [event for event in session.scalars(select(AuditEvent).where(AuditEvent.action == action)
                                                   .order_by(AuditEvent.seq)) if event.payload.get("team") == team]


# -- assignment ------------------------------------------------------------------------------

def test_assignment_takes_exactly_the_rounded_fraction_and_is_deterministic():
    for count in range(41):
        for fraction in (0.05, 0.1, 0.25, 0.3, 0.5, 1.0):
            chosen = canary.assign("batch-a", count, fraction)
            expected = int((Decimal(str(fraction)) * count).quantize(Decimal(1), rounding=ROUND_HALF_UP))
            assert len(chosen) == expected == len(set(chosen)), (count, fraction)
            assert chosen == canary.assign("batch-a", count, fraction)  # the same batch: the same items
            assert all(0 <= seq < count for seq in chosen)
    assert canary.assign("batch-a", 10, 0.3) != canary.assign("batch-b", 10, 0.3)  # spread per batch
    # A larger fraction of the same batch keeps the smaller one's items (ranked by one hash).
    assert set(canary.assign("batch-a", 100, 0.1)) <= set(canary.assign("batch-a", 100, 0.3))


def test_a_batch_canary_sends_exactly_its_fraction_in_chunks_of_one_model(harness: ApiHarness):
    body = sample_batch(10, canary={"model": CANDIDATE, "fraction": 0.3})
    batch = harness.submit(body=body)
    seqs = canary_seqs(batch["id"])
    assert len(seqs) == 3 and seqs == canary.assign(batch["id"], 10, 0.3)
    assert all(item.model is None for item in items_of(batch["id"]) if item.seq not in seqs)
    recorded = batch["canary"]
    assert recorded["model"] == CANDIDATE and recorded["fraction"] == 0.3 and recorded["items"] == 3
    assert recorded["source"] == "request" and recorded["base_model"] == get_registry().default
    # The candidate's items run with its own steps and guidance; the rest of the params are the batch's.
    spec = get_registry().get(CANDIDATE)
    assert recorded["params"]["model"] == CANDIDATE
    candidate = recorded["params"]
    assert (candidate["num_inference_steps"], candidate["guidance_scale"]) == (spec.steps, spec.guidance)
    assert batch["params"]["model"] == "default" and batch["params"]["num_inference_steps"] == 1
    with session_scope() as session:
        chunks = list(session.scalars(select(Outbox.item_ids).where(Outbox.batch_id == batch["id"])))
    models = {item.id: item.model for item in items_of(batch["id"])}
    assert all(len({models[item_id] for item_id in chunk}) == 1 for chunk in chunks)
    assert sorted(item_id for chunk in chunks for item_id in chunk) == sorted(models)
    submitted = [e for e in events("batch.submitted", harness.team) if e.batch_id == batch["id"]]
    assert submitted[0].payload["canary"]["items"] == 3 and "params" not in submitted[0].payload["canary"]


@pytest.mark.parametrize("bad, field, words", [
    ({"model": "no-such-model", "fraction": 0.3}, "body.canary.model", CANDIDATE),  # the message lists the names
    ({"model": "instaflow", "fraction": 0.3}, "body.canary.model", "anyway"),  # the batch's own model
    ({"model": "default", "fraction": 0.3}, "body.canary.model", "anyway"),
    ({"model": CANDIDATE, "fraction": 0}, "body.canary.fraction", "greater than 0"),
    ({"model": CANDIDATE, "fraction": 1.5}, "body.canary.fraction", "less than or equal to 1"),
])
def test_a_bad_canary_is_a_422_in_the_error_shape_that_writes_nothing(harness: ApiHarness, bad, field, words):
    before = ledger_rows()
    response = harness.post("submitter", "/v1/batches", json=sample_batch(4, canary=bad))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert set(response.json()) == {"error"} and {d["field"] for d in error["details"]} == {field}
    assert words in json.dumps(error["details"])
    assert ledger_rows() == before


def test_steps_and_guidance_the_batch_chose_stay_with_the_candidate(harness: ApiHarness):
    # Only the base model's own defaults follow the model: a negative prompt with guidance 2 keeps both.
    params = {"guidance_scale": 2.0, "negative_prompt": "blurry", "num_inference_steps": 2, "model": "instaflow"}
    response = harness.post("submitter", "/v1/batches", json=sample_batch(
        2, params=params, canary={"model": CANDIDATE, "fraction": 0.5}))
    assert response.status_code == 202, response.text
    candidate = response.json()["canary"]["params"]
    kept = (candidate["guidance_scale"], candidate["num_inference_steps"], candidate["negative_prompt"])
    assert kept == (2.0, 2, "blurry")


# -- the team's canary: start, promote, roll back ----------------------------------------------

def test_start_rollback_and_promote_change_later_batches_and_are_audited(harness: ApiHarness, pg_url):
    team, url = harness.team, f"/v1/teams/{harness.team}/canary"
    assert harness.request("submitter", "PUT", url, json={"model": CANDIDATE, "fraction": 0.3}).status_code == 403
    assert harness.request("admin", "PUT", url, json={"model": "instaflow", "fraction": 0.3}).status_code == 422
    assert harness.request("admin", "PUT", url, json={"model": CANDIDATE, "fraction": 0.6}).status_code == 422
    started = harness.request("admin", "PUT", url, json={"model": CANDIDATE, "fraction": 0.5})
    assert started.status_code == 200, started.text
    assert started.json()["active"]["model"] == CANDIDATE and started.json()["default_model"] == "instaflow"
    again = harness.request("admin", "PUT", url, json={"model": CANDIDATE, "fraction": 0.1})
    assert again.status_code == 409 and again.json()["error"]["code"] == "canary_active"

    under = harness.submit(body=sample_batch(10, name="under canary"))
    assert under["canary"]["source"] == "team" and len(canary_seqs(under["id"])) == 5
    named = harness.submit(body=sample_batch(10, name="names its model", params={"model": "instaflow"}))
    assert named["canary"] is None and canary_seqs(named["id"]) == []  # a batch's own choice stands
    assert harness.get("submitter", url).json()["active"]["batches"] == 1

    rolled = harness.post("admin", f"{url}/rollback")
    assert rolled.status_code == 200 and rolled.json()["active"] is None
    assert rolled.json()["history"][0]["state"] == "rolled_back"
    assert canary_seqs(under["id"]) == []  # its queued candidate items went back to the batch's model
    after = harness.submit(body=sample_batch(10, name="after rollback"))
    assert after["canary"] is None and after["params"]["model"] == "default"
    nothing = harness.post("admin", f"{url}/rollback")
    assert nothing.status_code == 404 and nothing.json()["error"]["code"] == "no_canary"

    runner = CliRunner()
    result = runner.invoke(cli, ["canary", "start", team, "--model", CANDIDATE, "--fraction", "0.3"])
    assert result.exit_code == 0, result.output
    status = runner.invoke(cli, ["canary", "status", team])
    assert status.exit_code == 0 and f"{CANDIDATE} on 0.3 of items" in status.output
    result = runner.invoke(cli, ["canary", "promote", team])
    assert result.exit_code == 0, result.output
    promoted = harness.submit(body=sample_batch(4, name="after promote"))
    spec = get_registry().get(CANDIDATE)
    assert promoted["params"]["model"] == CANDIDATE and promoted["canary"] is None
    params = promoted["params"]
    assert (params["num_inference_steps"], params["guidance_scale"]) == (spec.steps, spec.guidance)
    assert harness.get("admin", url).json()["default_model"] == CANDIDATE
    assert runner.invoke(cli, ["canary", "rollback", team]).exit_code == 2  # nothing active

    actions = [(e.action, e.payload["model"], e.payload["base_model"], e.payload["fraction"])
               for e in events("canary.started", team) + events("canary.rolled_back", team)
               + events("canary.promoted", team)]
    assert actions == [("canary.started", CANDIDATE, "instaflow", 0.5),
                       ("canary.started", CANDIDATE, "instaflow", 0.3),
                       ("canary.rolled_back", CANDIDATE, "instaflow", 0.5),
                       ("canary.promoted", CANDIDATE, "instaflow", 0.3)]
    # Who: the admin's API key, then the OS account of the CLI.
    assert [e.actor.split(":")[0] for e in events("canary.started", team)] == ["key", "cli"]
    assert events("canary.rolled_back", team)[0].payload["queued_items_returned"] == 5
    assert events("canary.promoted", team)[0].payload["default_model"] == CANDIDATE
    result = verify_chain(get_engine())
    assert result.ok, result.problems


# -- the comparison ------------------------------------------------------------------------

def write_images(batch_id: str, verdicts: dict[str | None, list[str]], base_model_id: str) -> None:
    """Image rows as a worker would record them: the items' model (or the base model) with these verdicts."""
    rows, used = [], {model: 0 for model in verdicts}
    for item in items_of(batch_id):
        verdict = verdicts[item.model][used[item.model]]
        used[item.model] += 1
        rows.append({"id": new_id(), "item_id": item.id, "batch_id": batch_id, "index": 0, "seed": item.seed,
                     "storage_key": f"batches/{batch_id}/{item.seq}.png", "sha256": "0" * 64, "width": 64,
                     "height": 64, "model_id": item.model or base_model_id, "weights_sha256": "1" * 64,
                     "qc_verdict": verdict, "qc_reasons": [], "created_at": utcnow()})
    with session_scope() as session:
        session.execute(insert(Image), rows)


def test_the_batch_response_the_report_and_the_status_compare_verdicts_per_model(harness: ApiHarness):
    team, url = harness.team, f"/v1/teams/{harness.team}/canary"
    assert harness.request("admin", "PUT", url, json={"model": CANDIDATE, "fraction": 0.3}).status_code == 200
    batch = harness.submit(body=sample_batch(10))
    write_images(batch["id"], {None: ["pass"] * 5 + ["review"] * 2, CANDIDATE: ["pass", "review", "reject"]},
                 "instaflow")

    view = harness.get("submitter", f"/v1/batches/{batch['id']}").json()
    by_model = {row["model"]: row for row in view["by_model"]}
    assert by_model["instaflow"] == {"model": "instaflow", "images": 7, "pass": 5, "review": 2, "reject": 0,
                                     "unchecked": 0, "pass_rate": 0.7143, "review_rate": 0.2857, "reject_rate": 0.0}
    assert by_model[CANDIDATE] == {"model": CANDIDATE, "images": 3, "pass": 1, "review": 1, "reject": 1,
                                   "unchecked": 0, "pass_rate": 0.3333, "review_rate": 0.3333, "reject_rate": 0.3333}
    assert [row["model"] for row in view["by_model"]] == ["instaflow", CANDIDATE]  # most images first
    listed = harness.get("submitter", "/v1/batches").json()["batches"]
    assert next(b for b in listed if b["id"] == batch["id"])["by_model"] == view["by_model"]

    report = harness.get("auditor", f"/v1/batches/{batch['id']}/report.json").json()
    assert report["verdicts_by_model"] == view["by_model"]
    page = harness.get("submitter", f"/v1/batches/{batch['id']}/report").text
    assert 'id="verdicts-by-model"' in page and "33.3%" in page and "71.4%" in page

    status = harness.get("submitter", url).json()["active"]
    assert status["batches"] == 1 and status["by_model"] == view["by_model"]
    plain = harness.submit(body=sample_batch(2, params={"model": "instaflow"}))
    assert plain["by_model"] is None  # one model: no comparison to show
    cli_status = CliRunner().invoke(cli, ["canary", "status", team])
    assert f"{CANDIDATE}\t3\t1\t1\t1\t0.3333" in cli_status.output


# -- end to end ------------------------------------------------------------------------------


def test_a_canary_batch_through_a_real_worker_makes_the_candidates_items_with_the_candidate(real: Stack):
    """End to end: 10 items, a 0.3 canary to 2rf-4 -> the 3 chosen items run with the candidate's params
    and their images are made by 2rf-4 (images.model_id), the 7 others' by the default model."""
    with real.sessions() as session:
        planned = canary.plan(session, "t", GenerationParams.model_validate({"width": 64, "height": 64}),
                              (CANDIDATE, 0.3))
        spec = ledger.BatchSpec(name="canary e2e", params=planned.params.model_dump(mode="json"), canary=planned.canary,
                                items=[ledger.ItemSpec(prompt=f"a red mug, variant {i}", seed=i) for i in range(10)])
        batch, _ = ledger.submit_batch(session, spec, team="t", actor="test", chunk_images=4)
        session.commit()
    with running_worker(real):
        dispatch_pending(real.sessions, real.app)
        counts = real.wait_until_done(batch.id, timeout=600)
    assert counts["succeeded"] == 10
    items = {item.id: item for item in real.items(batch.id)}
    ran = {image.item_id: image.model_id for image in real.images(batch.id)}
    canary_items = {item_id for item_id, item in items.items() if item.model == CANDIDATE}
    assert len(canary_items) == 3
    # The worker hands each item its model's params (worker/steps.py ImageSteps.batch): the audit says what ran.
    ran_with = {event.item_id: event.payload["params"] for event in real.events(batch.id, "item.generated")}
    spec = get_registry().get(CANDIDATE)
    assert {item_id for item_id, params in ran_with.items() if params["model"] == CANDIDATE} == canary_items
    assert all((params["num_inference_steps"], params["guidance_scale"]) == (spec.steps, spec.guidance)
               for item_id, params in ran_with.items() if item_id in canary_items)
    assert {item_id for item_id, model_id in ran.items() if model_id == CANDIDATE} == canary_items
