"""Results out of the API: the results file (CSV, JSONL) and the zip archive, streamed and filtered,
and lookup by external id, on SQLite with the local store (the 10,000-item run on PostgreSQL and
S3 is in tests/test_delivery_scale.py)."""
from __future__ import annotations

import csv
import hashlib
import io
import json
import zipfile

import pytest

from core.storage import get_store
from tests.apikit import ApiHarness
from tests.deliverykit import seed_delivered


@pytest.fixture
def api(configure, sqlite_url) -> ApiHarness:
    configure(DATABASE_URL=sqlite_url)
    return ApiHarness.start()


def jsonl_rows(response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines()]


def test_results_as_jsonl_list_every_image_with_a_matching_sha256_and_a_working_url(api):
    seeded = seed_delivered(api.team, 12, verdicts=("pass", "review", "reject"), failed_every=5)
    response = api.get("submitter", f"/v1/batches/{seeded.batch_id}/results")
    assert response.headers["content-type"] == "application/x-ndjson"
    rows = jsonl_rows(response)
    assert [row["seq"] for row in rows] == list(range(12))
    failed = [row for row in rows if row["state"] == "failed"]
    assert [row["seq"] for row in failed] == [4, 9] and all(row["image_id"] is None for row in failed)
    store = get_store()
    for row in rows:
        if row["image_id"]:
            assert hashlib.sha256(store.get(row["object_key"])).hexdigest() == row["sha256"]
            assert row["file_name"] == f"images/{row['external_id']}.png" and row["format"] == "png"
    fetched = api.client.get(rows[0]["url"])  # a signed /v1/objects URL: no key needed
    assert hashlib.sha256(fetched.content).hexdigest() == rows[0]["sha256"]


def test_results_filter_by_verdict_decision_and_state_and_csv_opens_in_excel(api):
    seeded = seed_delivered(api.team, 9, verdicts=("pass", "review", "pass"), decisions=(None, "approved", "approved"))
    path = f"/v1/batches/{seeded.batch_id}/results"
    approved = api.get("submitter", path, params={"decision": ["approved"]})
    assert [row["seq"] for row in jsonl_rows(approved)] == [1, 2, 4, 5, 7, 8]
    # verdict 'review' on seq 1, 4, 7; 'approved' on all but 0, 3, 6: shippable = passed or approved
    shippable = api.get("submitter", path, params={"verdict": ["pass"], "decision": ["approved"]})
    assert [row["seq"] for row in jsonl_rows(shippable)] == list(range(9))
    seeded = seed_delivered(api.team, 6, verdicts=("pass", "review", "reject"), decisions=(None, None, None, None,
                                                                                            "approved", "rejected"))
    shippable = api.get("submitter", f"/v1/batches/{seeded.batch_id}/results",
                        params={"verdict": "pass", "decision": "approved"})
    assert [row["seq"] for row in jsonl_rows(shippable)] == [0, 3, 4]
    path = f"/v1/batches/{seeded.batch_id}/results"
    assert jsonl_rows(api.get("submitter", path, params={"state": "failed"})) == []

    response = api.get("submitter", path, params={"format": "csv", "verdict": "review"})
    assert response.headers["content-type"].startswith("text/csv")
    assert response.content.startswith("\ufeff".encode())  # so Excel reads UTF-8
    rows = list(csv.DictReader(io.StringIO(response.content.decode("utf-8-sig"))))
    assert [row["external_id"] for row in rows] == ["sku-00001", "sku-00004"]
    assert rows[0]["verdict"] == "review" and rows[0]["url"].startswith("http")


def test_lookup_by_external_id_within_a_batch(api):
    seeded = seed_delivered(api.team, 6)
    items = api.get("submitter", f"/v1/batches/{seeded.batch_id}/items",
                    params={"external_id": ["sku-00003", "sku-00005", "nope"]}).json()["items"]
    assert [item["external_id"] for item in items] == ["sku-00003", "sku-00005"]
    assert items[0]["images"][0]["sha256"] == seeded.sha256[items[0]["images"][0]["storage_key"]]
    rows = jsonl_rows(api.get("submitter", f"/v1/batches/{seeded.batch_id}/results",
                              params={"external_id": "sku-00004"}))
    assert [row["external_id"] for row in rows] == ["sku-00004"]
    too_many = api.get("submitter", f"/v1/batches/{seeded.batch_id}/results",
                       params={"external_id": [f"x{i}" for i in range(101)]})
    assert too_many.status_code == 422 and too_many.json()["error"]["details"][0]["field"] == "query.external_id"


def test_archive_holds_images_named_by_external_id_and_a_manifest_with_their_sha256(api):
    seeded = seed_delivered(api.team, 7, failed_every=4, external_id="SKU {i}/ä")
    response = api.get("submitter", f"/v1/batches/{seeded.batch_id}/archive.zip")
    assert response.status_code == 200 and response.headers["content-type"] == "application/zip"
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    assert archive.testzip() is None
    manifest = list(csv.DictReader(io.StringIO(archive.read("manifest.csv").decode())))
    assert len(manifest) == 7
    images = [row for row in manifest if row["image_id"]]
    assert len(images) == 6 and sorted(archive.namelist()) == sorted([r["file_name"] for r in images] + ["manifest.csv"])
    assert images[0]["file_name"] == "images/SKU_0.png"  # unsafe characters replaced, trailing ones trimmed
    for row in images:
        data = archive.read(row["file_name"])
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and int(row["bytes"]) == len(data)
    assert [row["state"] for row in manifest if not row["image_id"]] == ["failed"]


def test_duplicate_external_ids_get_distinct_file_names(api):
    seeded = seed_delivered(api.team, 3, external_id="same")
    names = [row["file_name"] for row in jsonl_rows(api.get("submitter", f"/v1/batches/{seeded.batch_id}/results"))]
    assert names == ["images/same.png", "images/same-000001.png", "images/same-000002.png"]


def test_results_are_scoped_to_the_team_and_validated(api):
    seeded = seed_delivered(api.team, 2)
    for path in ("results", "archive.zip"):
        assert api.get("other_team", f"/v1/batches/{seeded.batch_id}/{path}").status_code == 404
        assert api.get(None, f"/v1/batches/{seeded.batch_id}/{path}").status_code == 401
    bad = api.get("submitter", f"/v1/batches/{seeded.batch_id}/results", params={"verdict": "great"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "validation_error"
    assert api.get("submitter", f"/v1/batches/{seeded.batch_id}/results", params={"format": "xml"}).status_code == 422
    assert api.get("auditor", f"/v1/batches/{seeded.batch_id}/results").status_code == 200


def test_an_object_that_does_not_match_its_sha256_stops_the_archive(api):
    from sqlalchemy import update

    from api.results import ArchiveError
    from core.db import session_scope
    from models import Image

    seeded = seed_delivered(api.team, 3)
    with session_scope() as session:
        session.execute(update(Image).where(Image.batch_id == seeded.batch_id,
                                            Image.storage_key == sorted(seeded.sha256)[1]).values(sha256="0" * 64))
    with pytest.raises(ArchiveError, match="the ledger says 0000"):
        api.get("submitter", f"/v1/batches/{seeded.batch_id}/archive.zip")
