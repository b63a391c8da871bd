"""Authorization matrix: every route × every principal → the expected status, from one table.

Principals: no key, a revoked key, a submitter of the batch's team, a submitter of another team,
a reviewer, an auditor, an admin. A route in the OpenAPI schema that is missing from the table
fails ``test_every_route_is_in_the_matrix``: a new router must add its rows here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from api.main import create_app
from api.signing import signed_object_path
from tests.apikit import ApiHarness, sample_batch
from core import brand, keys, webhooks
from core.db import session_scope
from core.storage import get_store
from tests.reviewkit import seed_batch

PRINCIPALS = ("none", "revoked", "submitter", "other_team", "reviewer", "auditor", "admin")


def expect(default: int | None = None, **by_principal: int) -> dict[str, int]:
    """Statuses per principal; without a key (none, revoked) it is 401 unless given."""
    statuses = {"none": 401, "revoked": 401}
    statuses.update({p: default for p in PRINCIPALS if p not in statuses and default is not None})
    statuses.update(by_principal)
    assert set(statuses) == set(PRINCIPALS), f"incomplete row: {statuses}"
    return statuses


@dataclass(frozen=True)
class Row:
    method: str
    path: str  # OpenAPI template; {batch_id}, {item_id}, {key_id}, {key} are filled in per row
    statuses: dict[str, int]
    body: dict[str, Any] | None = field(default=None, hash=False)
    params: dict[str, Any] | None = field(default=None, hash=False)


# Submitters act on their own team's batches; reviewers and auditors read every team's;
# admins do everything; another team's batch is 404, not 403.
READ = expect(200, other_team=404)
SUBMIT_ONLY = expect(403, submitter=200, other_team=404, admin=200)
ANYONE = expect(200, none=200, revoked=200)

MATRIX: list[Row] = [
    Row("GET", "/healthz", ANYONE),
    Row("GET", "/readyz", ANYONE),
    Row("GET", "/metrics", ANYONE),
    Row("POST", "/v1/batches", expect(403, submitter=202, other_team=202, admin=202), body=sample_batch(1)),
    Row("POST", "/v1/batches:preview", expect(403, submitter=200, other_team=200, admin=200), body=sample_batch(1)),
    # Brand rules: admins write; the team's submitters and the other roles read; the logo is a PNG body.
    Row("GET", "/v1/teams/{team}/brand-rules", READ),
    Row("PUT", "/v1/teams/{team}/brand-rules", expect(403, admin=200), body={"forbidden": []}),
    Row("PUT", "/v1/teams/{team}/logo", expect(403, admin=415), body={}),
    Row("GET", "/v1/batches", expect(200)),
    Row("GET", "/v1/batches/{batch_id}", READ),
    Row("GET", "/v1/batches/{batch_id}/items", READ),
    Row("POST", "/v1/batches/{batch_id}/cancel", SUBMIT_ONLY),
    Row("POST", "/v1/batches/{batch_id}/retry", SUBMIT_ONLY),
    Row("GET", "/v1/items/{item_id}", READ),
    # The model registry: any key (no team's data in it).
    Row("GET", "/v1/models", expect(200)),
    # Any key may verify a file; the matrix sends no upload, so a caller who passed auth gets 422.
    Row("POST", "/v1/verify", expect(422)),
    # The signed URL is the credential: an <img> tag sends no Authorization header.
    Row("GET", "/v1/objects/{key}", ANYONE),
    Row("POST", "/v1/keys", expect(403, admin=201), body={"name": "new", "role": "reviewer", "team": "qa"}),
    Row("GET", "/v1/keys", expect(403, admin=200)),
    Row("GET", "/v1/audit/events", expect(403, auditor=200, admin=200)),
    Row("GET", "/v1/audit/verify", expect(403, auditor=200, admin=200)),
    Row("POST", "/v1/keys/{key_id}/revoke", expect(403, admin=200)),
    # QA review: reviewers decide; auditors may read the queue. The admin reaches the image after
    # the reviewer decided it, so it gets 409 (already decided) rather than 403.
    Row("GET", "/v1/review", expect(403, reviewer=200, auditor=200, admin=200)),
    Row("POST", "/v1/images/{image_id}/review", expect(403, reviewer=200, admin=409),
        body={"decision": "approve", "reason_code": "acceptable"}),
    Row("GET", "/v1/batches/{batch_id}/contact-sheet.png", READ),
    # Delivery: results, archive, progress events (cut short: the batch is still queued), the report.
    Row("GET", "/v1/batches/{batch_id}/results", READ),
    Row("GET", "/v1/batches/{batch_id}/archive.zip", READ),
    Row("GET", "/v1/batches/{batch_id}/events", READ, params={"interval": 0.2, "max_seconds": 0.5}),
    Row("GET", "/v1/batches/{batch_id}/report", READ),
    Row("GET", "/v1/batches/{batch_id}/report.json", READ),
    # The page and its assets hold no data: the page asks for a key and sends it with each call.
    Row("GET", "/review", ANYONE),
    Row("GET", "/review/assets/{name}", ANYONE),
    # Team settings: limits are read by whoever sees the team, changed by admins; the webhook
    # endpoint and secret belong to the team's submitters (and admins).
    Row("GET", "/v1/teams/{team}/limits", READ),
    Row("PATCH", "/v1/teams/{team}/limits", expect(403, admin=200), body={"max_queued_images": 1000}),
    Row("GET", "/v1/teams/{team}/webhook", SUBMIT_ONLY),
    Row("PUT", "/v1/teams/{team}/webhook", SUBMIT_ONLY, body={"url": "https://hooks.example.com/instabatch"}),
    Row("POST", "/v1/teams/{team}/webhook/rotate-secret", SUBMIT_ONLY),
    Row("GET", "/v1/webhooks/deliveries", expect(403, submitter=200, other_team=200, admin=200)),
    Row("POST", "/v1/webhooks/deliveries/{delivery_id}/resend", SUBMIT_ONLY),
    # Canary roll-out: read by whoever sees the team; admins start, promote and roll back (no canary
    # is active in the fixture, so promote and rollback are 404 for them).
    Row("GET", "/v1/teams/{team}/canary", READ),
    Row("PUT", "/v1/teams/{team}/canary", expect(403, admin=200), body={"model": "2rf-4", "fraction": 0.1}),
    Row("POST", "/v1/teams/{team}/canary/promote", expect(403, admin=404)),
    Row("POST", "/v1/teams/{team}/canary/rollback", expect(403, admin=404)),
]


@pytest.fixture
def harness(configure, sqlite_url, redis_url) -> ApiHarness:
    configure(DATABASE_URL=sqlite_url, BROKER_URL=redis_url)
    return ApiHarness.start()


def test_every_route_is_in_the_matrix():
    schema = create_app().openapi()
    routes = {(method.upper(), path) for path, operations in schema["paths"].items() for method in operations}
    covered = {(row.method, row.path) for row in MATRIX}
    assert routes - covered == set(), "routes missing from the authorization matrix"
    assert covered - routes == set(), "matrix rows for routes that no longer exist"


@pytest.mark.parametrize("row", MATRIX, ids=lambda row: f"{row.method} {row.path}")
def test_authorization(harness, row):
    url = fill(row.path, resources(harness))
    got = {}
    for principal in PRINCIPALS:
        who = {"none": None}.get(principal, principal)
        response = harness.request(who, row.method, url, json=row.body, params=row.params)
        got[principal] = response.status_code
        if response.status_code >= 400:
            assert set(response.json()) == {"error"}, response.text
    assert got == row.statuses


def resources(harness: ApiHarness) -> dict[str, str]:
    """A fresh batch of the submitter's team (with an item and a stored object) and a throwaway key."""
    batch = harness.submit(body=sample_batch(2))
    item_id = harness.get("submitter", f"/v1/batches/{batch['id']}/items").json()["items"][0]["id"]
    object_key = f"test/{batch['id']}/0.png"
    get_store().put(object_key, b"\x89PNG fake bytes", {"item_id": item_id})
    with session_scope() as session:
        key, _ = keys.create_key(session, "throwaway", "submitter", harness.team, actor="test")
        brand.set_rules(session, harness.team, brand.BrandRules(), actor="test")
        delivery = webhooks.enqueue(session, webhooks.BATCH_COMPLETED, team=harness.team, batch_id=batch["id"],
                                    url="https://hooks.example.com/instabatch", data={})
    image_id = seed_batch(harness.team, [("review", ["blurry"])]).image_ids[0]
    return {"batch_id": batch["id"], "item_id": item_id, "key_id": key.id, "object_key": object_key,
            "image_id": image_id, "name": "review.js", "team": harness.team, "delivery_id": delivery.id}


def fill(template: str, ids: dict[str, str]) -> str:
    if template == "/v1/objects/{key}":
        return signed_object_path(ids["object_key"])
    names = ("batch_id", "item_id", "key_id", "image_id", "name", "team", "delivery_id")
    return template.format(**{name: ids[name] for name in names if "{" + name + "}" in template})
