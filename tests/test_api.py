"""The batch API on SQLite and PostgreSQL, publishing to a real Redis broker.

Bad input must come back as a 4xx in the error shape and leave the ledger untouched.
"""
from __future__ import annotations

import base64
import json
import subprocess
import sys

import pytest
import redis
from sqlalchemy import func, select

from tests.apikit import ApiHarness, ledger_rows, sample_batch
from core.db import session_scope
from core.settings import REPO_ROOT
from models import AuditEvent, Batch, Item, Outbox
from tests.fixtures.services import free_port


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


@pytest.fixture
def api(configure, ledger_url, redis_url) -> ApiHarness:
    configure(DATABASE_URL=ledger_url, BROKER_URL=redis_url, MAX_ITEMS_PER_BATCH="50", MAX_PROMPT_CHARS="500")
    return ApiHarness.start()


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "details"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


# Submitting and reading back

def test_json_batch_is_accepted_published_and_read_back(api, redis_url):
    client = redis.Redis.from_url(redis_url)
    response = api.post("submitter", "/v1/batches", json=sample_batch(4, params={"width": 512, "height": 256}))
    assert response.status_code == 202
    batch = response.json()
    assert response.headers["location"] == f"/v1/batches/{batch['id']}"
    assert batch["team"] == api.team and batch["status"] == "queued"
    assert batch["counts"]["queued"] == 4 and batch["progress"] == 0.0
    assert batch["params"]["width"] == 512 and batch["params"]["guidance_scale"] == 0.0

    assert api.get("submitter", f"/v1/batches/{batch['id']}").json() == batch
    items = api.get("submitter", f"/v1/batches/{batch['id']}/items").json()["items"]
    assert [(i["seq"], i["external_id"], i["seed"]) for i in items] == [(n, f"sku-{n}", n) for n in range(4)]

    # The background publish sent every chunk of this batch to Redis and marked it dispatched.
    item_ids = {i["id"] for i in items}
    published = set()
    for raw in client.lrange("generate", 0, -1):
        message = json.loads(raw)
        if message["headers"]["task"] == "instabatch.generate_chunk":
            published |= item_ids & set(json.loads(base64.b64decode(message["body"]))[0][0])
    assert published == item_ids
    with session_scope() as session:
        pending = session.scalar(select(func.count()).select_from(Outbox).where(
            Outbox.batch_id == batch["id"], Outbox.dispatched_at.is_(None)))
        event = session.scalar(select(AuditEvent).where(AuditEvent.batch_id == batch["id"]))
    assert pending == 0
    assert event.action == "batch.submitted" and event.actor.startswith("key:")


def test_csv_upload_takes_the_rest_from_query_parameters(api):
    csv_body = (
        "\ufeffprompt,external_id,seed,num_images\n"
        "a red mug,sku-1,7,2\n"
        '"a blue mug, ""glossy""",sku-2,,\n'
        "\n"
        "a green mug,,9,1\n"
    ).encode()
    response = api.post(
        "submitter", "/v1/batches?name=csv%20upload&priority=high&width=512&refine=true&refine_strength=0.4",
        content=csv_body, headers={"Content-Type": "text/csv; charset=utf-8"},
    )
    assert response.status_code == 202, response.text
    batch = response.json()
    assert (batch["name"], batch["priority"], batch["total_items"], batch["total_images"]) == ("csv upload", "high", 3, 4)
    assert batch["params"]["width"] == 512 and batch["params"]["refine"] == {
        "enabled": True, "strength": 0.4, "steps": 4, "upscale": 1}
    items = api.get("submitter", f"/v1/batches/{batch['id']}/items").json()["items"]
    assert [i["prompt"] for i in items] == ["a red mug", 'a blue mug, "glossy"', "a green mug"]
    assert [i["external_id"] for i in items] == ["sku-1", "sku-2", None]
    assert items[0]["seed"] == 7 and items[2]["seed"] == 9


def test_idempotency_key_replays_or_conflicts(api):
    body = sample_batch(3)
    first = api.post("submitter", "/v1/batches", json=body, headers={"Idempotency-Key": "order-42"})
    again = api.post("submitter", "/v1/batches", json=body, headers={"Idempotency-Key": "order-42"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["idempotency-replayed"] == "true"
    before = ledger_rows()
    other = api.post("submitter", "/v1/batches", json=sample_batch(4), headers={"Idempotency-Key": "order-42"})
    assert assert_error(other, 409, "idempotency_conflict")["details"] == {"batch_id": first.json()["id"]}
    assert ledger_rows() == before
    # Keys are per team: another team's same key is a new batch.
    theirs = api.post("other_team", "/v1/batches", json=body, headers={"Idempotency-Key": "order-42"})
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def test_a_concurrent_twin_with_the_same_key_resolves_to_one_batch(api, monkeypatch):
    """The twin committed between our lookup and our insert: the unique constraint catches it."""
    from core import ledger

    first = api.submit(body=sample_batch(2), headers={"Idempotency-Key": "race"})
    real_lookup = ledger.find_by_idempotency_key
    calls = []

    def blind_first_lookup(session, team, key):
        calls.append(key)
        return None if len(calls) == 1 else real_lookup(session, team, key)

    monkeypatch.setattr(ledger, "find_by_idempotency_key", blind_first_lookup)
    before = ledger_rows()
    again = api.post("submitter", "/v1/batches", json=sample_batch(2), headers={"Idempotency-Key": "race"})
    assert again.status_code == 200 and again.json()["id"] == first["id"]
    assert len(calls) == 2 and ledger_rows() == before


def test_cancel_and_retry(api):
    batch = api.submit(body=sample_batch(4))
    cancel = api.post("submitter", f"/v1/batches/{batch['id']}/cancel")
    assert cancel.status_code == 200
    assert cancel.json()["items_cancelled"] == 4 and cancel.json()["batch"]["status"] == "cancelled"
    assert api.post("submitter", f"/v1/batches/{batch['id']}/cancel").json()["items_cancelled"] == 0

    with session_scope() as session:  # two items die on a worker
        for item in session.scalars(select(Item).where(Item.batch_id == batch["id"], Item.seq < 2)):
            item.state = "dead"
    retry = api.post("submitter", f"/v1/batches/{batch['id']}/retry")
    assert retry.status_code == 200 and retry.json()["items_requeued"] == 2
    assert retry.json()["batch"]["counts"]["queued"] == 2 and retry.json()["batch"]["status"] == "running"
    with session_scope() as session:
        actions = session.scalars(select(AuditEvent.action).where(AuditEvent.batch_id == batch["id"])
                                  .order_by(AuditEvent.seq)).all()
    assert actions == ["batch.submitted", "batch.cancelled", "batch.retried"]


def test_cancelling_a_finished_batch_is_a_conflict(api):
    batch = api.submit(body=sample_batch(2))
    with session_scope() as session:
        for item in session.scalars(select(Item).where(Item.batch_id == batch["id"])):
            item.state = "succeeded"
    assert_error(api.post("submitter", f"/v1/batches/{batch['id']}/cancel"), 409, "batch_finished")
    assert api.get("submitter", f"/v1/batches/{batch['id']}").json()["status"] == "succeeded"


def test_paging_batches_and_items_with_filters(api):
    ids = [api.submit(body=sample_batch(1, name=f"b{n}"))["id"] for n in range(5)]
    seen, cursor = [], None
    while True:
        page = api.get("submitter", "/v1/batches", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += [b["id"] for b in page["batches"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]  # newest first, each once, only this team's

    batch = api.submit(body=sample_batch(7))
    with session_scope() as session:
        for item in session.scalars(select(Item).where(Item.batch_id == batch["id"], Item.seq.in_([1, 4]))):
            item.state = "failed"
    items, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = api.get("submitter", f"/v1/batches/{batch['id']}/items", params=params).json()
        items += [i["seq"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert items == list(range(7))
    failed = api.get("submitter", f"/v1/batches/{batch['id']}/items", params={"state": "failed"}).json()
    assert [i["seq"] for i in failed["items"]] == [1, 4]
    both = api.get("submitter", f"/v1/batches/{batch['id']}/items?state=failed&state=queued").json()
    assert len(both["items"]) == 7
    assert_error(api.get("submitter", "/v1/batches", params={"cursor": "bm9wZQ"}), 422, "validation_error")
    assert_error(api.get("submitter", f"/v1/batches/{batch['id']}/items", params={"state": "exploded"}), 422)


# Bad requests: the right 4xx, the error shape, nothing written

def bad_bodies() -> list[tuple[str, object, int, str]]:
    good = sample_batch(2)
    item = good["items"][0]
    return [
        ("prompt is a number", {**good, "items": [{"prompt": 5}]}, 422, "body.items.0.prompt"),
        ("seed is a string", {**good, "items": [{**item, "seed": "5"}]}, 422, "body.items.0.seed"),
        ("seed above 2^32-1", {**good, "items": [{**item, "seed": 2**32}]}, 422, "body.items.0.seed"),
        ("items is not a list", {**good, "items": "a mug"}, 422, "body.items"),
        ("empty items", {**good, "items": []}, 422, "body.items"),
        ("too many items", {**good, "items": [item] * 51}, 422, "body.items"),
        ("100k-character prompt", {**good, "items": [{"prompt": "x" * 100_000}]}, 422, "body.items.0.prompt"),
        ("blank prompt", {**good, "items": [{"prompt": "   "}]}, 422, "body.items.0.prompt"),
        ("NUL in prompt", {**good, "items": [{"prompt": "a mug\x00"}]}, 422, "body.items.0.prompt"),
        ("width 513", {**good, "params": {"width": 513}}, 422, "body.params.width"),
        ("height too large", {**good, "params": {"height": 4096}}, 422, "body.params.height"),
        # 512.0 is the integer 512 in JSON (and in the published JSON Schema); a fraction is not.
        ("width with a fraction", {**good, "params": {"width": 512.5}}, 422, "body.params.width"),
        ("guidance above 20", {**good, "params": {"guidance_scale": 25}}, 422, "body.params.guidance_scale"),
        ("negative prompt without guidance", {**good, "params": {"negative_prompt": "blurry"}}, 422, "body.params"),
        ("refine strength 1.5", {**good, "params": {"refine": {"enabled": True, "strength": 1.5}}}, 422,
         "body.params.refine.strength"),
        ("unknown model", {**good, "params": {"model": "sdxl"}}, 422, "body.params.model"),
        ("unknown output format", {**good, "params": {"output": {"format": "gif"}}}, 422, "body.params.output.format"),
        ("jpeg quality 0", {**good, "params": {"output": {"format": "jpeg", "quality": 0}}}, 422,
         "body.params.output.quality"),
        ("upscaled past the largest side", {**good, "params": {"width": 1024, "refine": {"enabled": True, "upscale": 2}}},
         422, "body.params"),
        ("unknown top-level field", {**good, "colour": "red"}, 422, "body.colour"),
        ("unknown item field", {**good, "items": [{**item, "style": "x"}]}, 422, "body.items.0.style"),
        ("unknown params field", {**good, "params": {"sampler": "euler"}}, 422, "body.params.sampler"),
        ("bad priority", {**good, "priority": "urgent"}, 422, "body.priority"),
        ("ftp webhook", {**good, "webhook_url": "ftp://example.com/hook"}, 422, "body.webhook_url"),
        ("empty name", {**good, "name": "  "}, 422, "body.name"),
        ("webhook with a newline", {**good, "webhook_url": "https://example.com/hook\n"}, 422, "body.webhook_url"),
        ("webhook with a space", {**good, "webhook_url": "https://example.com/a hook"}, 422, "body.webhook_url"),
        ("name too long", {**good, "name": "n" * 201}, 422, "body.name"),
        ("body is a list", [good], 422, "body"),
    ]


@pytest.mark.parametrize("case", bad_bodies(), ids=lambda case: case[0])
def test_bad_json_bodies_are_422_with_field_details_and_write_nothing(api, case):
    _name, body, status, field = case
    before = ledger_rows()
    error = assert_error(api.post("submitter", "/v1/batches", json=body), status, "validation_error")
    assert field in [detail["field"] for detail in error["details"]], error
    assert ledger_rows() == before


def test_a_huge_prompt_is_not_echoed_back(api):
    response = api.post("submitter", "/v1/batches", json={**sample_batch(1), "items": [{"prompt": "y" * 100_000}]})
    assert response.status_code == 422 and len(response.content) < 2_000


BAD_RAW = [
    ("malformed JSON", b'{"name": "x", "items": [', "application/json", 400, "bad_json"),
    ("NaN is not JSON", b'{"name": "x", "items": [{"prompt": "a"}], "params": {"guidance_scale": NaN}}',
     "application/json", 400, "bad_json"),
    ("empty JSON body", b"", "application/json", 400, "bad_json"),
    ("JSON nested too deep", b"[" * 100_000, "application/json", 400, "bad_json"),
    ("integer with 5000 digits", b'{"name": "x", "items": [{"prompt": "a", "seed": ' + b"9" * 5000 + b"}]}",
     "application/json", 400, "bad_json"),
    ("lone surrogate in prompt", b'{"name": "x", "items": [{"prompt": "a mug \\ud800"}]}', "application/json",
     422, "validation_error"),
    ("infinite guidance", b'{"name": "x", "items": [{"prompt": "a"}], "params": {"guidance_scale": 1e400}}',
     "application/json", 422, "validation_error"),
    ("not UTF-8 JSON", b'{"name": "\xff"}', "application/json", 400, "bad_json"),
    ("plain text", b"a red mug", "text/plain", 415, "unsupported_media_type"),
    ("form upload", b"name=x", "application/x-www-form-urlencoded", 415, "unsupported_media_type"),
    ("CSV without prompt column", b"title,seed\na mug,1\n", "text/csv", 400, "bad_csv"),
    ("CSV with unknown column", b"prompt,colour\na mug,red\n", "text/csv", 400, "bad_csv"),
    ("CSV row with extra fields", b"prompt,seed\na mug,1,2\n", "text/csv", 400, "bad_csv"),
    ("empty CSV", b"", "text/csv", 400, "bad_csv"),
    ("CSV not UTF-8", b"prompt\n\xff\xfe mug\n", "text/csv", 400, "bad_csv"),
    ("CSV header only", b"prompt,seed\n", "text/csv", 422, "validation_error"),
]


@pytest.mark.parametrize("case", BAD_RAW, ids=lambda case: case[0])
def test_bad_raw_bodies_and_content_types(api, case):
    _name, body, content_type, status, code = case
    before = ledger_rows()
    path = "/v1/batches?name=x" if content_type == "text/csv" else "/v1/batches"
    assert_error(api.post("submitter", path, content=body, headers={"Content-Type": content_type}), status, code)
    assert ledger_rows() == before


def test_missing_content_type_is_415(api):
    response = api.client.post("/v1/batches", content=b'{"name": "x"}', headers=api.headers("submitter"))
    assert_error(response, 415, "unsupported_media_type")


def test_csv_errors_point_at_the_line_or_the_query_parameter(api):
    before = ledger_rows()
    csv_body = b"prompt,seed\na mug,1\n\n\"two\nline prompt\",abc\n"
    error = assert_error(api.post("submitter", "/v1/batches?name=x", content=csv_body,
                                  headers={"Content-Type": "text/csv"}), 422)
    assert error["details"][0]["field"] == "body.items.1.seed" and error["details"][0]["csv_line"] == 5
    error = assert_error(api.post("submitter", "/v1/batches?width=513&sampler=x", content=b"prompt\na mug\n",
                                  headers={"Content-Type": "text/csv"}), 422)
    assert [d["field"] for d in error["details"]] == ["query.sampler"]
    error = assert_error(api.post("submitter", "/v1/batches?width=513", content=b"prompt\na mug\n",
                                  headers={"Content-Type": "text/csv"}), 422)
    assert [d["field"] for d in error["details"]] == ["query.width"]  # name defaults to the date
    error = assert_error(api.post("submitter", "/v1/batches?name=x", json=sample_batch(1)), 422)
    assert error["details"][0]["field"] == "query.name"
    assert ledger_rows() == before


def test_bad_idempotency_key_header_is_422(api):
    before = ledger_rows()
    response = api.post("submitter", "/v1/batches", json=sample_batch(1), headers={"Idempotency-Key": "a b"})
    assert assert_error(response, 422)["details"][0]["field"] == "header.Idempotency-Key"
    assert ledger_rows() == before


def test_bodies_over_the_limit_are_413_by_header_and_by_stream(configure, sqlite_url, redis_url):
    configure(DATABASE_URL=sqlite_url, BROKER_URL=redis_url, MAX_BODY_BYTES="2000")
    api = ApiHarness.start()
    before = ledger_rows()
    big = sample_batch(40)
    assert_error(api.post("submitter", "/v1/batches", json=big), 413, "payload_too_large")
    raw = json.dumps(big).encode()

    def chunks():  # no Content-Length: the limit is enforced on the stream as it is read
        for start in range(0, len(raw), 500):
            yield raw[start:start + 500]

    streamed = api.post("submitter", "/v1/batches", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(streamed, 413, "payload_too_large")
    assert ledger_rows() == before
    assert api.post("submitter", "/v1/batches", json=sample_batch(2)).status_code == 202


# Errors outside the batch body

def test_unknown_routes_methods_and_ids(api):
    assert_error(api.get("submitter", "/v1/nothing-here"), 404, "not_found")
    assert_error(api.client.delete("/v1/batches", headers=api.headers("submitter")), 405, "method_not_allowed")
    for bad_id in ("not-a-uuid", "00000000-0000-0000-0000-000000000000", "%00"):
        assert_error(api.get("submitter", f"/v1/batches/{bad_id}"), 404, "not_found")
        assert_error(api.get("submitter", f"/v1/items/{bad_id}"), 404, "not_found")
    assert_error(api.get("submitter", "/v1/batches", params={"limit": "lots"}), 422, "validation_error")


def test_unexpected_errors_are_500_in_the_error_shape_without_a_traceback(api, monkeypatch):
    from api import queries

    def explode(*_args, **_kwargs):
        raise RuntimeError("database password is hunter2")

    monkeypatch.setattr(queries, "page_batches", explode)
    harness = ApiHarness.start(raise_server_exceptions=False)
    response = harness.get("submitter", "/v1/batches")
    assert_error(response, 500, "internal_error")
    assert "hunter2" not in response.text and "Traceback" not in response.text


# Auth basics (the full matrix is in test_api_authz.py)

def test_auth_rules(api):
    batch = api.submit(body=sample_batch(1))
    item_id = api.get("submitter", f"/v1/batches/{batch['id']}/items").json()["items"][0]["id"]
    assert_error(api.get(None, "/v1/batches"), 401, "unauthorized")
    assert_error(api.client.get("/v1/batches", headers={"Authorization": "Basic abc"}), 401)
    assert_error(api.client.get("/v1/batches", headers={"Authorization": "Bearer ib_unknown"}), 401)
    assert_error(api.get("revoked", "/v1/batches"), 401)
    assert_error(api.post("reviewer", "/v1/batches", json=sample_batch(1)), 403, "forbidden")
    assert_error(api.post("auditor", f"/v1/batches/{batch['id']}/cancel"), 403)
    # Another team's resources do not exist for a submitter; reviewers and auditors read every team.
    assert_error(api.get("other_team", f"/v1/batches/{batch['id']}"), 404)
    assert_error(api.get("other_team", f"/v1/batches/{batch['id']}/items"), 404)
    assert_error(api.get("other_team", f"/v1/items/{item_id}"), 404)
    assert_error(api.post("other_team", f"/v1/batches/{batch['id']}/cancel"), 404)
    assert batch["id"] not in [b["id"] for b in api.get("other_team", "/v1/batches").json()["batches"]]
    for reader in ("reviewer", "auditor", "admin"):
        assert api.get(reader, f"/v1/batches/{batch['id']}").status_code == 200
        assert api.get(reader, f"/v1/items/{item_id}").status_code == 200
    listed = api.get("auditor", "/v1/batches", params={"team": api.team}).json()["batches"]
    assert [b["id"] for b in listed] == [batch["id"]]


# Readiness and the broker

def test_readyz_is_ok_when_everything_answers(api):
    response = api.client.get("/readyz")
    assert response.status_code == 200, response.text
    assert response.json()["checks"] == {"database": {"ok": True}, "broker": {"ok": True}, "storage": {"ok": True}}
    assert api.client.get("/healthz").json() == {"status": "ok"}


def test_broker_down_readyz_503_and_submissions_still_accepted(configure, ledger_url):
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    configure(DATABASE_URL=ledger_url, BROKER_URL=dead_broker)
    api = ApiHarness.start()
    error = assert_error(api.client.get("/readyz"), 503, "not_ready")
    assert error["details"]["failed"] == ["broker"] and "broker" in error["message"]

    response = api.post("submitter", "/v1/batches", json=sample_batch(3))
    assert response.status_code == 202, response.text
    with session_scope() as session:
        pending = session.scalar(select(func.count()).select_from(Outbox).where(
            Outbox.batch_id == response.json()["id"], Outbox.dispatched_at.is_(None)))
        assert session.get(Batch, response.json()["id"]) is not None
    assert pending >= 1  # left for the sweeper
    assert "instabatch_outbox_publish_failures_total" in api.client.get("/metrics").text


def test_embedded_broker_receives_the_chunks(configure, sqlite_url, tmp_path):
    configure(DATABASE_URL=sqlite_url, BROKER_URL=f"sqla+sqlite:///{tmp_path / 'broker.db'}")
    api = ApiHarness.start()
    batch = api.submit(body=sample_batch(2))
    with session_scope() as session:
        pending = session.scalar(select(func.count()).select_from(Outbox).where(
            Outbox.batch_id == batch["id"], Outbox.dispatched_at.is_(None)))
    assert pending == 0
    assert api.client.get("/readyz").status_code == 200


def test_metrics_count_submissions_and_items_by_state(api):
    api.submit(body=sample_batch(2))
    text = api.client.get("/metrics").text
    assert 'instabatch_batches_submitted_total{priority="normal"}' in text
    assert 'instabatch_items{state="queued"}' in text
    assert 'instabatch_http_requests_total{method="POST",route="/v1/batches",status="202"}' in text


def test_the_api_never_imports_torch():
    code = "import sys, api.main; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


def test_refine_params_match_the_engines():
    """api.schemas.RefineParams mirrors instaflow.refine.RefineParams (which the API cannot import)."""
    from api.schemas import RefineParams
    from instaflow.refine import RefineParams as EngineRefineParams

    def fields(model) -> dict:
        properties = model.model_json_schema()["properties"]
        return {name: {k: v for k, v in spec.items() if k not in ("title", "description")}
                for name, spec in properties.items()}

    assert fields(RefineParams) == fields(EngineRefineParams)
