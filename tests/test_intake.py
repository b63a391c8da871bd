"""Input the way users have it: CSV as Excel writes it (BOM, ';', CRLF, quoted newlines), JSON Lines,
a default name, and errors that name the line and column of the bad row."""
from __future__ import annotations

import re

import pytest

from api.schemas.batches import default_name
from tests.apikit import ApiHarness, ledger_rows

CSV = {"Content-Type": "text/csv"}
NDJSON = {"Content-Type": "application/x-ndjson"}


@pytest.fixture
def api(configure, sqlite_url) -> ApiHarness:
    configure(DATABASE_URL=sqlite_url)
    return ApiHarness.start()


def items_of(api: ApiHarness, batch: dict) -> list[dict]:
    return api.get("submitter", f"/v1/batches/{batch['id']}/items").json()["items"]


def upload(api: ApiHarness, body: bytes, headers: dict, query: str = "", status: int = 202) -> dict:
    response = api.post("submitter", f"/v1/batches{query}", content=body, headers=headers)
    assert response.status_code == status, response.text
    return response.json()


def test_an_excel_csv_with_bom_semicolons_crlf_and_a_quoted_newline(api):
    body = ("\ufeffprompt;external_id;seed\r\n"
            "\"a red mug; glossy\";sku-1;7\r\n"
            "\"a blue mug\r\non a table\";sku-2;\r\n").encode()
    batch = upload(api, body, CSV, "?name=excel")
    items = items_of(api, batch)
    assert [(i["prompt"], i["external_id"]) for i in items] == [
        ("a red mug; glossy", "sku-1"), ("a blue mug\r\non a table", "sku-2")]
    assert items[0]["seed"] == 7


def test_a_tab_separated_file_and_a_one_column_file(api):
    assert items_of(api, upload(api, b"external_id\tprompt\nsku-9\ta green mug\n", CSV, "?name=t"))[0][
        "external_id"] == "sku-9"
    assert items_of(api, upload(api, b"prompt\n\"a mug, white\"\n", CSV, "?name=one"))[0]["prompt"] == "a mug, white"


def test_csv_errors_name_the_line_and_the_column(api):
    body = b"prompt;external_id;seed\n\"two\nlines\";sku-1;1\na mug;sku-2;lots\n"
    error = upload(api, body, CSV, "?name=x", status=422)["error"]
    detail = error["details"][0]
    assert (detail["line"], detail["column"], detail["column_name"]) == (4, 3, "seed")
    assert detail["message"].startswith("line 4, column 3 (seed): ")
    extra = upload(api, b"prompt,seed\na mug,1\nb mug,2,3\n", CSV, "?name=x", status=400)["error"]
    assert extra["code"] == "bad_csv" and (extra["details"]["line"], extra["details"]["column"]) == (3, 3)
    assert "line 3, column 3" in extra["message"]


def test_json_lines_upload_with_the_batch_fields_as_query_parameters(api):
    body = b'{"prompt": "a red mug", "external_id": "sku-1", "seed": 3}\n\n{"prompt": "a blue mug", "num_images": 2}\n'
    batch = upload(api, body, NDJSON, "?name=lines&width=256&height=256")
    assert (batch["name"], batch["total_items"], batch["total_images"]) == ("lines", 2, 3)
    assert batch["params"]["width"] == 256
    assert [i["external_id"] for i in items_of(api, batch)] == ["sku-1", None]


@pytest.mark.parametrize("body, status, line, column", [
    (b'{"prompt": "a"}\n{"prompt": "b",}\n', 400, 2, 16),
    (b'{"prompt": "a"}\n["b"]\n', 400, 2, None),
    (b'{"prompt": "a"}\n{"prompt": "b", "seed": "5"}\n', 422, 2, None),
    (b'{"prompt": "a"}\n{"prompt": "b", "colour": "red"}\n', 422, 2, None),
    (b"\n\n", 400, 0, None),
])
def test_json_lines_errors_name_the_line(api, body, status, line, column):
    before = ledger_rows()
    error = upload(api, body, NDJSON, "?name=x", status=status)["error"]
    detail = error["details"][0] if isinstance(error["details"], list) else error["details"]
    assert detail["line"] == line and detail.get("column") == column
    assert ledger_rows() == before


def test_the_name_defaults_to_the_file_name_or_the_date(api):
    named = upload(api, b"prompt\na mug\n", {**CSV, "Content-Disposition": 'attachment; filename="spring 2027.csv"'})
    assert named["name"] == "spring 2027"
    dated = upload(api, b'{"prompt": "a mug"}\n', NDJSON)
    assert re.fullmatch(r"batch \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", dated["name"])
    body = api.submit(body={"items": [{"prompt": "a mug"}]})
    assert body["name"].startswith("batch ")
    assert default_name("C:\\Users\\me\\autumn.csv") == "autumn" and default_name("   ").startswith("batch ")


def test_unsupported_type_lists_what_is_supported(api):
    error = upload(api, b"x", {"Content-Type": "text/plain"}, status=415)["error"]
    assert "application/x-ndjson" in error["details"]["supported"]
