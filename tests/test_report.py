"""The generation record of a batch (``/report.json`` and the HTML page) on SQLite and PostgreSQL:
submitter key and team, model and weights, code version, parameters, counts, each reviewer's
decisions, the audit range with the chain head and the anchor that covers it."""
from __future__ import annotations

import pytest

from core import audit, keys
from core.audit.anchors import anchor_chain
from core.db import session_scope
from core.storage import get_store
from tests.apikit import ApiHarness
from tests.deliverykit import seed_delivered


@pytest.fixture(params=["sqlite", "postgresql"])
def api(request, configure, tmp_path) -> ApiHarness:
    configure(DATABASE_URL=request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))
    return ApiHarness.start()


def key_id(api: ApiHarness, who: str) -> str:
    with session_scope() as session:
        return keys.authenticate(session, api.keys[who]).key_id


def test_the_report_records_who_what_how_and_where_in_the_chain(api):
    seeded = seed_delivered(api.team, 6, verdicts=("pass", "review", "review"), submitted_by=key_id(api, "submitter"))
    with session_scope() as session:
        audit.record(session, "item.generated", actor="worker", batch_id=seeded.batch_id,
                     payload={"code_version": "c0ffee1", "model": "tiny-test"})
    rows = api.get("submitter", f"/v1/batches/{seeded.batch_id}/results", params={"verdict": "review"}).text
    image_ids = [line.split('"image_id":"')[1][:36] for line in rows.splitlines()]
    for image_id, decision in zip(image_ids, ("approve", "reject", "approve")):
        response = api.post("reviewer", f"/v1/images/{image_id}/review",
                             json={"decision": decision, "reason_code": "acceptable" if decision == "approve" else "blurry"})
        assert response.status_code == 200, response.text

    with session_scope() as session:
        anchored = anchor_chain(session, get_store())

    report = api.get("auditor", f"/v1/batches/{seeded.batch_id}/report.json").json()
    assert report["submitted_by"]["team"] == api.team and report["submitted_by"]["role"] == "submitter"
    assert report["submitted_by"]["name"] == "test submitter"
    assert report["models"] == [{"model_id": "tiny-test", "weights_sha256": "f" * 64, "images": 6, "refine": None}]
    assert report["code_versions"] == ["c0ffee1"]
    assert report["counts"]["succeeded"] == 6
    assert report["verdicts"] == {"pass": 2, "review": 4, "reject": 0, "unchecked": 0}
    assert report["decisions"] == {"awaiting_review": 1, "approved": 2, "rejected": 1, "regenerated": 0}
    assert [(r["reviewer"], r["approved"], r["rejected"]) for r in report["reviewers"]] == [("test reviewer", 2, 1)]
    log = report["decision_log"]
    assert [(r["decision"], r["reason_code"], r["reviewer"], r["verdict"]) for r in log] == [
        ("approved", "acceptable", "test reviewer", "review"), ("rejected", "blurry", "test reviewer", "review"),
        ("approved", "acceptable", "test reviewer", "review")]
    assert [r["image_id"] for r in log] == image_ids[:3] and log[0]["external_id"] == "sku-00001"
    trail = report["audit"]
    assert trail["events"] == 5 and trail["first_seq"] < trail["last_seq"] <= trail["chain_head_seq"]
    assert (trail["anchor_seq"], trail["anchor_hash"]) == (anchored.anchor.seq, anchored.anchor.hash)
    assert trail["covered"] is True and trail["verify_command"] == "instabatch audit verify"

    page = api.get("submitter", f"/v1/batches/{seeded.batch_id}/report")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src" not in page.headers["content-security-policy"]
    assert trail["last_hash"] in page.text and "c0ffee1" in page.text and "test reviewer" in page.text


def test_the_report_escapes_what_users_wrote_and_is_scoped(api):
    seeded = seed_delivered(api.team, 1, name="<script>alert(1)</script>")
    page = api.get("submitter", f"/v1/batches/{seeded.batch_id}/report")
    assert "<script>alert" not in page.text and "&lt;script&gt;" in page.text
    assert api.get("other_team", f"/v1/batches/{seeded.batch_id}/report").status_code == 404
    assert api.get("other_team", f"/v1/batches/{seeded.batch_id}/report.json").status_code == 404
