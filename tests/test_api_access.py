"""API keys (hash-only storage, revoke, bootstrap admin) and image access (signed and presigned URLs)."""
from __future__ import annotations

import time

import httpx
import pytest
from sqlalchemy import select

from api.signing import signed_object_path
from tests.apikit import ApiHarness, sample_batch
from core import keys
from core.db import session_scope
from core.storage import get_store
from models import ApiKey, AuditEvent, Image, Item, QcResult, Review


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request) -> str:
    return request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")


# Keys

def test_keys_are_stored_as_sha256_only_and_revocation_is_audited(configure, ledger_url):
    configure(DATABASE_URL=ledger_url)
    with session_scope() as session:
        key, plaintext = keys.create_key(session, "marketing bot", "submitter", "mkt", actor="cli:alice")
    assert plaintext.startswith("ib_") and len(plaintext) == 3 + 43
    with session_scope() as session:
        row = session.get(ApiKey, key.id)
        stored = [str(getattr(row, column)) for column in ApiKey.__table__.columns.keys()]
        assert plaintext not in " ".join(stored) and row.key_hash == keys.hash_key(plaintext)
        assert keys.lookup(session, plaintext).id == key.id
        assert keys.lookup(session, plaintext + "x") is None
        principal = keys.authenticate(session, plaintext)
        assert (principal.role, principal.team, principal.actor) == ("submitter", "mkt", f"key:{key.id}")
    with session_scope() as session:
        keys.revoke_key(session, key.prefix, actor="cli:alice")
        keys.revoke_key(session, key.id, actor="cli:alice")  # idempotent: no second event
    with session_scope() as session:
        assert keys.lookup(session, plaintext) is None
        events = session.scalars(select(AuditEvent).where(AuditEvent.action.in_(["key.created", "key.revoked"]))
                                 .order_by(AuditEvent.seq)).all()
        mine = [e for e in events if e.payload.get("key_id") == key.id]
        assert [e.action for e in mine] == ["key.created", "key.revoked"]
        assert all(e.actor == "cli:alice" and plaintext not in str(e.payload) for e in mine)
        with pytest.raises(keys.InvalidKeySpec):
            keys.create_key(session, "x", "superuser", "mkt")
        with pytest.raises(keys.UnknownKey):
            keys.revoke_key(session, "ib_nothing")


def test_bootstrap_admin_creates_and_revokes_keys_over_http(configure, ledger_url, redis_url):
    configure(DATABASE_URL=ledger_url, BROKER_URL=redis_url, INSTABATCH_ADMIN_KEY="boot-secret-123")
    api = ApiHarness.start()
    admin = {"Authorization": "Bearer boot-secret-123"}
    assert api.client.get("/v1/keys", headers={"Authorization": "Bearer boot-secret-124"}).status_code == 401

    created = api.client.post("/v1/keys", json={"name": "spring campaign", "role": "submitter", "team": "mkt"},
                              headers=admin)
    assert created.status_code == 201, created.text
    new_key = created.json()["key"]
    assert created.json()["prefix"] == new_key[:11]
    mine = {"Authorization": f"Bearer {new_key}"}
    batch = api.client.post("/v1/batches", json=sample_batch(1), headers=mine)
    assert batch.status_code == 202 and batch.json()["team"] == "mkt"
    listed = api.client.get("/v1/keys", headers=admin).json()
    assert created.json()["id"] in [k["id"] for k in listed] and all("key" not in k for k in listed)

    revoked = api.client.post(f"/v1/keys/{created.json()['id']}/revoke", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert api.client.get("/v1/batches", headers=mine).status_code == 401
    with session_scope() as session:
        actors = session.scalars(select(AuditEvent.actor).where(AuditEvent.action.in_(["key.created", "key.revoked"]))
                                 .order_by(AuditEvent.seq.desc()).limit(2)).all()
    assert actors == ["bootstrap-admin", "bootstrap-admin"]


def test_key_requests_with_bad_bodies(configure, sqlite_url):
    configure(DATABASE_URL=sqlite_url, INSTABATCH_ADMIN_KEY="boot-secret-123")
    api = ApiHarness.start()
    admin = {"Authorization": "Bearer boot-secret-123"}
    cases = [
        ({"content": b'{"name": "a", "role": "admin", "team": "t"}', "headers": {"Content-Type": "text/plain"}}, 415),
        ({"content": b'{"name": ', "headers": {"Content-Type": "application/json"}}, 400),
        ({"json": {"name": "a", "role": "boss", "team": "t"}}, 422),
        ({"json": {"name": " ", "role": "admin", "team": "t"}}, 422),
        ({"json": {"name": "a", "role": "admin", "team": "t", "scopes": []}}, 422),
    ]
    for kwargs, status in cases:
        headers = {**admin, **kwargs.pop("headers", {})}
        response = api.client.post("/v1/keys", headers=headers, **kwargs)
        assert response.status_code == status, (kwargs, response.text)
        assert set(response.json()["error"]) == {"code", "message", "details"}
    assert api.client.post("/v1/keys/not-a-key/revoke", headers=admin).status_code == 404


# Images: item detail, verdict filter, URLs

def add_image(item_id: str, batch_id: str, verdict: str, png: bytes) -> str:
    """What a worker records for one image: the object, the image row, a QC result, maybe a review."""
    key = f"batches/{batch_id}/{item_id}/0.png"
    put = get_store().put(key, png, {"item_id": item_id})
    with session_scope() as session:
        item = session.get(Item, item_id)
        image = Image(item_id=item_id, batch_id=batch_id, index=0, seed=item.seed, storage_key=key,
                      sha256=put.sha256, width=64, height=64, model_id="tiny-instaflow", weights_sha256="ab" * 32,
                      qc_verdict=verdict, qc_reasons=["blurry"] if verdict != "pass" else [])
        session.add(image)
        session.flush()
        session.add(QcResult(image_id=image.id, scorer="sharpness", scorer_version="1", metrics={"laplacian": 3.5},
                             thresholds={"min": 10}, verdict=verdict, reasons=image.qc_reasons))
        if verdict == "review":
            session.add(Review(image_id=image.id, decision="approved", reason_code="ok", reviewer_name="qa"))
        item.state = "succeeded"
        return image.id


def test_items_show_images_qc_and_reviews_with_working_local_urls(configure, ledger_url, redis_url):
    configure(DATABASE_URL=ledger_url, BROKER_URL=redis_url)
    api = ApiHarness.start()
    batch = api.submit(body=sample_batch(3))
    items = api.get("submitter", f"/v1/batches/{batch['id']}/items").json()["items"]
    png = b"\x89PNG\r\n\x1a\n pretend pixels"
    add_image(items[0]["id"], batch["id"], "pass", png)
    review_image = add_image(items[1]["id"], batch["id"], "review", png + b"2")

    flagged = api.get("reviewer", f"/v1/batches/{batch['id']}/items", params={"verdict": "review"}).json()["items"]
    assert [i["id"] for i in flagged] == [items[1]["id"]]
    image = flagged[0]["images"][0]
    assert flagged[0]["verdict"] == "review" and image["scores"] == {"sharpness": {"laplacian": 3.5}}

    detail = api.get("auditor", f"/v1/items/{items[1]['id']}").json()
    assert detail["batch_name"] == batch["name"] and detail["team"] == api.team
    assert detail["images"][0]["id"] == review_image
    assert detail["images"][0]["qc_results"][0]["thresholds"] == {"min": 10}
    assert detail["images"][0]["reviews"][0]["decision"] == "approved"

    # The URL works without an API key (an <img> tag), and only as signed.
    url = httpx.URL(image["url"])
    fetched = api.client.get(url.raw_path.decode())
    assert fetched.status_code == 200 and fetched.content == png + b"2"
    assert fetched.headers["content-type"] == "image/png"
    tampered = api.client.get(url.raw_path.decode().replace("sig=", "sig=0"))
    assert tampered.status_code in (403, 422) and "error" in tampered.json()
    other_key = url.copy_with(path=url.path.replace("/0.png", "/1.png"))
    assert api.client.get(other_key.raw_path.decode()).status_code == 403
    expired = signed_object_path(image["storage_key"], expires_in=60, now=time.time() - 3600)
    assert api.client.get(expired).json()["error"]["code"] == "bad_signature"
    missing = signed_object_path(f"batches/{batch['id']}/nothing.png")
    assert api.client.get(missing).status_code == 404


def test_s3_images_get_presigned_urls_that_download(configure, pg_url, redis_url, s3_server, s3_bucket):
    configure(DATABASE_URL=pg_url, BROKER_URL=redis_url, S3_BUCKET=s3_bucket, S3_ENDPOINT_URL=s3_server)
    api = ApiHarness.start()
    batch = api.submit(body=sample_batch(1))
    item = api.get("submitter", f"/v1/batches/{batch['id']}/items").json()["items"][0]
    png = b"\x89PNG\r\n\x1a\n s3 pixels"
    add_image(item["id"], batch["id"], "pass", png)
    image = api.get("submitter", f"/v1/items/{item['id']}").json()["images"][0]
    assert image["url"].startswith(s3_server) and "Signature" in image["url"]
    assert httpx.get(image["url"]).content == png
    assert api.client.get("/readyz").status_code == 200
