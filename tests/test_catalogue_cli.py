"""The catalogue path of the ``instabatch`` command on the embedded defaults, as real processes:
``preview`` and ``run --dry-run`` queue nothing, the team ``cli``'s brand rules refuse a row by
the rule's name, ``brand`` versions them, and ``run --template`` generates rows x variants."""
from __future__ import annotations

import json

from sqlalchemy import create_engine, text

from core.params import catalogue_seed
from core.settings import REPO_ROOT
from tests.test_cli import embedded_env, instabatch, read_results  # noqa: F401  (embedded_env is a fixture)

CATALOGUE = str(REPO_ROOT / "examples" / "catalogue.csv")
TEMPLATE = str(REPO_ROOT / "examples" / "catalogue-template.json")


def batches(env: dict[str, str]) -> int:
    engine = create_engine(f"sqlite:///{env['INSTABATCH_VAR_DIR']}/instabatch.db")
    with engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM batches")).scalar()
    engine.dispose()
    return count


def test_preview_and_dry_run_queue_nothing_and_brand_rules_refuse_a_row_by_name(tmp_path, embedded_env):
    preview = instabatch(embedded_env, "preview", CATALOGUE, "--template", TEMPLATE)
    assert preview.returncode == 0, preview.stdout + preview.stderr
    assert "48 items from 12 rows x 4 variants" in preview.stdout and "MUG-001/white/left" in preview.stdout
    assert "RESULT preview_items=48 preview_problems=0" in preview.stdout

    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps({"forbidden": [{"name": "no-sneakers", "terms": ["canvas sneaker"]}]}))
    saved = instabatch(embedded_env, "brand", "set", "cli", str(rules))
    assert saved.returncode == 0 and json.loads(saved.stdout)["version"] == 1, saved.stdout + saved.stderr
    dry = instabatch(embedded_env, "run", CATALOGUE, "--template", TEMPLATE, "--dry-run", "--out", str(tmp_path / "o"))
    assert dry.returncode == 2, dry.stdout + dry.stderr
    assert "line 10" in dry.stdout and "no-sneakers" in dry.stdout and "RESULT preview_items=44" in dry.stdout
    refused = instabatch(embedded_env, "run", CATALOGUE, "--template", TEMPLATE, "--out", str(tmp_path / "o"))
    assert refused.returncode == 2 and "no-sneakers" in refused.stdout + refused.stderr
    assert batches(embedded_env) == 0 and not (tmp_path / "o").exists()
    shown = instabatch(embedded_env, "brand", "show", "cli")
    assert json.loads(shown.stdout)["rules"]["forbidden"][0]["name"] == "no-sneakers"


def test_run_with_a_template_generates_every_row_times_every_variant(tmp_path, embedded_env):
    catalogue = tmp_path / "two.csv"
    catalogue.write_text("sku,product,colour,size\nMUG-9,mug,red,small\nLMP-9,desk lamp,blue,large\n")
    result = instabatch(embedded_env, "run", str(catalogue), "--template", TEMPLATE, "--out", str(tmp_path / "out"),
                        "--width", "64", "--height", "64")
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_results(tmp_path / "out")
    assert [row["external_id"] for row in rows] == [f"{sku}/{backdrop}/{view}" for sku in ("MUG-9", "LMP-9")
                                                    for backdrop in ("white", "light grey")
                                                    for view in ("left", "right")]
    assert rows[3]["prompt"] == "studio photo of a small red mug, light grey background, on the right"
    for row in rows:
        sku, *variant = row["external_id"].split("/")
        assert int(row["seed"]) == catalogue_seed(sku, variant) and row["state"] == "succeeded"
