"""Catalogue batches (issue 16): templates over rows, variants, SKU seeds, preview, brand rules.

The expansion runs on its own first; then through the API on PostgreSQL, publishing to Redis:
a 500-row catalogue with 2 x 2 variants becomes 2,000 items with stable ids and seeds, a bad row
or a forbidden term is refused naming its line, column or rule with nothing queued, and a preview
queues nothing. The logo and the pixels a worker draws are in tests/test_catalogue_worker.py.
"""
from __future__ import annotations

import csv
import io
import json
import time

import pytest
from sqlalchemy import select

from core.catalogue import CatalogueError, TemplateSpec, expand, read_csv_rows
from core.db import session_scope
from core.params import MAX_SEED, catalogue_seed
from core.settings import REPO_ROOT
from models import AuditEvent, Batch, Item
from tests.apikit import ApiHarness, ledger_rows

PRODUCTS = ("ceramic mug", "water bottle", "gift box", "desk lamp", "dining chair", "canvas sneaker")
COLOURS = ("red", "blue", "green", "black", "yellow", "purple", "pink", "orange")
TEMPLATE = {
    "prompt": "studio photo of a {{ size }} {{ colour }} {{ product }}, {{ backdrop }} background, on the {{ view }}",
    "external_id": "{{ sku }}",
    "variants": {"backdrop": ["white", "light grey"], "view": ["left", "right"]},
}


def catalogue_csv(rows: int, start: int = 0) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["sku", "product", "colour", "size"])
    for n in range(start, start + rows):
        writer.writerow([f"SKU-{n:04d}", PRODUCTS[n % len(PRODUCTS)], COLOURS[n % len(COLOURS)],
                         ("small", "large")[n % 2]])
    return buffer.getvalue()


def spec(**overrides) -> TemplateSpec:
    data = {**TEMPLATE, **overrides}
    return TemplateSpec(prompt=data["prompt"], external_id=data.get("external_id"),
                        external_id_column=data.get("external_id_column"),
                        variants=tuple((k, tuple(v)) for k, v in data["variants"].items()),
                        combine=data.get("combine", "product"))


def expanded(text: str, **overrides):
    return expand(spec(**overrides), read_csv_rows(text)[1])


# -- the expansion on its own --------------------------------------------------------------

def test_rows_times_variants_give_items_whose_ids_carry_the_variant_and_whose_seeds_hash_sku_and_variant():
    result = expanded(catalogue_csv(3))
    assert not result.problems and len(result.items) == 12 and result.variants_per_row == 4
    first = result.items[:4]
    assert [item.external_id for item in first] == [
        "SKU-0000/white/left", "SKU-0000/white/right", "SKU-0000/light grey/left", "SKU-0000/light grey/right"]
    assert first[2].prompt == "studio photo of a small red ceramic mug, light grey background, on the left"
    assert first[2].seed == catalogue_seed("SKU-0000", ["light grey", "left"])
    assert len({item.seed for item in result.items}) == 12 and all(0 <= i.seed <= MAX_SEED for i in result.items)


def test_zip_pairs_the_lists_and_refuses_lists_of_unequal_length():
    result = expanded(catalogue_csv(2), combine="zip")
    assert [item.external_id for item in result.items] == [
        "SKU-0000/white/left", "SKU-0000/light grey/right", "SKU-0001/white/left", "SKU-0001/light grey/right"]
    with pytest.raises(CatalogueError, match="equal length"):
        expanded(catalogue_csv(2), combine="zip", variants={"backdrop": ["white"], "view": ["left", "right"]})


def test_a_sku_column_a_missing_cell_and_a_template_that_does_not_parse():
    text = "sku,product,colour,size\nA-1,mug,red,small\nA-2,mug,,large\n\n\"A-3\",lamp,blue,small\n"
    result = expanded(text, prompt="a {{ colour }} {{ product }}", external_id=None, external_id_column="sku",
                      variants={})
    assert [item.external_id for item in result.items] == ["A-1", "A-3"]
    (problem,) = result.problems  # the empty colour on line 3, named once
    assert (problem.row, problem.line, problem.column) == (2, 3, "colour") and "line 3" in problem.message
    with pytest.raises(CatalogueError, match="template line 1"):
        expanded(text, prompt="{{ colour ")


def test_the_sandbox_keeps_templates_away_from_python_objects_and_bounds_their_work():
    result = expanded(catalogue_csv(1), prompt="{{ colour.__class__.__mro__ }}", variants={})
    assert not result.items and result.problems
    result = expanded(catalogue_csv(1), prompt="{{ colour * 1000000000 }}", variants={})
    assert not result.items and "'*' is not allowed" in result.problems[0].message
    for heavy, message in (("{% for i in range(9) %}{{ i }}{% endfor %}", "for is not supported"),
                           ("{{ colour | center(1000000000) }}", "No filter named 'center'")):
        with pytest.raises(CatalogueError, match=message):
            expanded(catalogue_csv(1), prompt=heavy, variants={})
    conditional = "a {{ colour | title }} {% if size == 'small' %}compact{% else %}roomy{% endif %} {{ product }}"
    assert expanded(catalogue_csv(1), prompt=conditional, variants={}).items[0].prompt == "a Red compact ceramic mug"


# -- through the API on PostgreSQL + Redis -------------------------------------------------

@pytest.fixture
def api(configure, pg_url, redis_url) -> ApiHarness:
    configure(DATABASE_URL=pg_url, BROKER_URL=redis_url, DEVICE_IMAGES_PER_SECOND="40")
    return ApiHarness.start()


def catalogue_body(text: str, name: str = "spring catalogue", **extra) -> dict:
    return {"name": name, "template": TEMPLATE, "catalogue_csv": text, "params": {"width": 64, "height": 64},
            **extra}


def items_of(batch_id: str) -> dict[str, int]:
    with session_scope() as session:
        return dict(session.execute(select(Item.external_id, Item.seed).where(Item.batch_id == batch_id)
                                    .order_by(Item.seq)).all())


def test_a_500_row_catalogue_with_2x2_variants_is_2000_items_with_stable_ids_and_seeds(api):
    started = time.perf_counter()
    preview = api.post("submitter", "/v1/batches:preview", json=catalogue_body(catalogue_csv(500))).json()
    previewed = time.perf_counter()
    first = api.submit(body=catalogue_body(catalogue_csv(500)))
    submitted = time.perf_counter()
    assert preview["ok"] and preview["items"] == 2000
    print(f"RESULT catalogue_items=2000 catalogue_preview_seconds={previewed - started:.2f} "
          f"catalogue_submit_seconds={submitted - previewed:.2f}")
    assert first["total_items"] == 2000 and first["status"] == "queued"
    items = items_of(first["id"])
    assert len(items) == 2000 and len(set(items.values())) == 2000
    assert items["SKU-0499/light grey/right"] == catalogue_seed("SKU-0499", ["light grey", "right"])

    # The same catalogue again: the same ids and seeds. With a row added in front and one at the end:
    # the 2,000 items keep their seeds, the new SKU's four are the only new ones.
    again = items_of(api.submit(body=catalogue_body(catalogue_csv(500), name="again"))["id"])
    assert again == items
    grown = items_of(api.submit(body=catalogue_body(catalogue_csv(502, start=-1), name="grown"))["id"])
    assert len(grown) == 2008 and {key: grown[key] for key in items} == items
    assert sorted(set(grown) - set(items))[0] == "SKU--001/light grey/left"


def test_a_bad_row_is_refused_with_its_line_and_column_and_nothing_is_queued(api):
    text = catalogue_csv(5).replace("SKU-0003,desk lamp,black,large", "SKU-0003,desk lamp,,large")
    before = ledger_rows()  # batches, items, outbox chunks (what reaches the broker), events
    response = api.post("submitter", "/v1/batches", json=catalogue_body(text))
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "bad_rows" and "nothing was queued" in error["message"]
    assert [(p["line"], p["column"], p["row"]) for p in error["details"]] == [(5, "colour", 4)]
    assert ledger_rows() == before


def test_preview_counts_prices_and_lists_problems_and_queues_nothing(api):
    text = catalogue_csv(30) + "SKU-9999,mug,red\n"  # no size
    before = ledger_rows()  # batches, items, outbox chunks (what reaches the broker), events
    response = api.post("submitter", "/v1/batches:preview", json=catalogue_body(text))
    assert response.status_code == 200, response.text
    preview = response.json()
    assert (preview["ok"], preview["items"], preview["images"], preview["rows"]) == (False, 120, 120, 31)
    assert preview["variants_per_row"] == 4 and len(preview["prompts"]) == 10
    assert preview["prompts"][0]["external_id"] == "SKU-0000/white/left"
    assert preview["device_images_per_second"] == 40 and preview["estimated_device_seconds"] == 3.0
    assert [(p["line"], p["column"]) for p in preview["problems"]] == [(32, "size")]
    # A list of prompts previews too; guidance doubles the passes.
    plain = api.post("submitter", "/v1/batches:preview", json={
        "name": "plain", "params": {"guidance_scale": 4.0}, "items": [{"prompt": "a red mug"}] * 8}).json()
    assert plain["ok"] and plain["items"] == 8 and plain["estimated_device_seconds"] == 0.4
    assert ledger_rows() == before


def test_brand_rules_are_versioned_audited_and_refuse_a_forbidden_term_by_the_rules_name(api):
    path = f"/v1/teams/{api.team}/brand-rules"
    rules = {"forbidden": [{"name": "no-competitors", "terms": ["acme"]}],
             "required": [{"name": "studio-look", "terms": ["studio photo", "product shot"]}],
             "negative_prompt": "blurry, watermark", "width": 64, "height": 64}
    assert api.request("submitter", "PUT", path, json=rules).status_code == 403
    bad_size = api.request("admin", "PUT", path, json={**rules, "width": 65})
    assert bad_size.status_code == 422 and "multiple of 8" in bad_size.text
    first = api.request("admin", "PUT", path, json=rules)
    assert first.status_code == 200 and first.json()["version"] == 1
    rules["forbidden"][0]["terms"].append("globex")
    assert api.request("admin", "PUT", path, json=rules).json()["version"] == 2
    assert api.get("submitter", path).json()["rules"]["forbidden"][0]["terms"] == ["acme", "globex"]
    assert api.get("submitter", path + "?version=1").json()["rules"]["forbidden"][0]["terms"] == ["acme"]
    assert api.get("other_team", path).status_code == 404
    with session_scope() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.action == "brand_rules.updated")
                                 .order_by(AuditEvent.seq)).all()
    assert [e.payload["version"] for e in events if e.payload["team"] == api.team] == [1, 2]

    before = ledger_rows()  # batches, items, outbox chunks (what reaches the broker), events
    bad = {"name": "x", "items": [{"prompt": "studio photo of a red mug"},
                                  {"prompt": "studio photo of a Globex mug"}, {"prompt": "a blue mug"}]}
    error = api.post("submitter", "/v1/batches", json=bad).json()["error"]
    assert [(p["row"], p["rule"]) for p in error["details"]] == [(2, "no-competitors"), (3, "studio-look")]
    assert "'no-competitors' forbids the term 'globex'" in error["details"][0]["message"]
    text = catalogue_csv(3).replace("ceramic mug", "ACME mug")
    error = api.post("submitter", "/v1/batches", json=catalogue_body(text)).json()["error"]
    assert [(p["line"], p["rule"]) for p in error["details"]] == [(2, "no-competitors")]
    assert ledger_rows() == before

    # Accepted under version 2, with the rules' size; the negative prompt only with guidance on.
    body = catalogue_body(catalogue_csv(2), params={})
    preview = api.post("submitter", "/v1/batches:preview", json=body).json()
    assert preview["params"]["negative_prompt"] is None and "no negative prompt" in preview["notes"][0]
    batch = api.submit(body={**body, "params": {"guidance_scale": 3.0}})
    assert batch["brand_rules_version"] == 2 and batch["params"]["width"] == 64
    assert batch["params"]["negative_prompt"] == "blurry, watermark"
    with session_scope() as session:
        assert session.get(Batch, batch["id"]).brand_rules_version == 2
    response = api.post("submitter", "/v1/batches", json={
        "name": "y", "params": {"negative_prompt": "blurry"}, "items": [{"prompt": "studio photo of a mug"}]})
    assert "one-step InstaFlow has no negative prompt" in json.dumps(response.json())


def test_a_logo_must_be_a_png_with_alpha_and_rules_may_name_only_an_uploaded_logo(api, configure, tmp_path):
    from PIL import Image

    path = f"/v1/teams/{api.team}/logo"
    rgb = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(rgb, format="PNG")
    gif = api.request("admin", "PUT", path, content=b"GIF89a", headers={"Content-Type": "image/gif"})
    assert gif.status_code == 415
    response = api.request("admin", "PUT", path, content=rgb.getvalue(), headers={"Content-Type": "image/png"})
    assert response.status_code == 422 and "alpha" in response.json()["error"]["message"]
    response = api.request("admin", "PUT", f"/v1/teams/{api.team}/brand-rules", json={"logo": {"sha256": "ab" * 32}})
    assert response.status_code == 422 and response.json()["error"]["code"] == "unknown_logo"
    response = api.post("submitter", "/v1/batches", json={
        "name": "z", "params": {"logo": {"sha256": "ab" * 32}}, "items": [{"prompt": "a mug"}]})
    assert response.status_code == 422 and "brand rules" in response.text


def test_the_example_catalogue_stays_within_the_tiny_models_vocabulary():
    from instaflow.tiny.prompts import parse_prompt

    template = json.loads((REPO_ROOT / "examples" / "catalogue-template.json").read_text())
    result = expand(TemplateSpec(prompt=template["prompt"], external_id=template["external_id"],
                                 variants=tuple((k, tuple(v)) for k, v in template["variants"].items())),
                    read_csv_rows((REPO_ROOT / "examples" / "catalogue.csv").read_text())[1])
    assert not result.problems and len(result.items) == 48
    for item in result.items:
        parsed = parse_prompt(item.prompt)
        assert parsed is not None and None not in parsed.values(), item.prompt


def test_json_rows_name_the_row_and_a_malformed_catalogue_request_is_a_422(api):
    rows = [{"sku": "A-1", "product": "mug", "colour": "red", "size": "small"},
            {"sku": "A-2", "product": "mug", "colour": None, "size": "large"}]
    body = {"name": "rows", "template": TEMPLATE, "rows": rows}
    before = ledger_rows()
    preview = api.post("submitter", "/v1/batches:preview", json=body).json()
    assert preview["items"] == 4 and [(p["row"], p["line"], p["column"]) for p in preview["problems"]] == [
        (2, None, "colour")]
    for bad, code in (({**body, "catalogue_csv": "sku\nA\n"}, "validation_error"),  # rows and a CSV
                      ({**body, "template": {**TEMPLATE, "external_id_column": "sku"}}, "validation_error"),
                      ({**body, "template": {**TEMPLATE, "prompt": "{{ colour"}}, "bad_catalogue"),
                      ({**body, "template": {**TEMPLATE, "variants": {"a/b": ["x"]}}}, "validation_error")):
        response = api.post("submitter", "/v1/batches", json=bad)
        assert response.status_code == 422 and response.json()["error"]["code"] == code, response.text
    response = api.post("submitter", "/v1/batches?name=x", json=body)
    assert response.status_code == 422 and "query parameters" in response.json()["error"]["message"]
    assert ledger_rows() == before
