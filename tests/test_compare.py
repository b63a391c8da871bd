"""``instabatch compare`` as a real process on the shipped tiny models (instaflow/weights), named by a
registry file of the test's own (INSTABATCH_MODELS): the report's files, its RESULT lines, the same
images for the same seeds on a second run, the worker's QC verdicts, and the errors for bad input."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from core.registry import load_registry
from core.settings import REPO_ROOT, TINY_MODEL_DIR, TINY_REFINER_DIR
from qc.checker import QualityChecker
from qc.compare import CompareError, ModelSummary, choose_models, recommend
from qc.phash import HashIndex

MODELS = ("one", "few")  # any registry names: not the shipped registry's
PROMPT_ROWS = 4
BATCH = 4


def write_registry(path: Path) -> Path:
    path.write_text(f"""default = "one"
[models.one]
path = "{TINY_MODEL_DIR}"
kind = "one-step"
steps = 1
guidance = 0.0
[models.few]
path = "{TINY_REFINER_DIR}"
kind = "few-step"
steps = 2
guidance = 1.0
""")
    return path


def write_prompts(path: Path, rows: int = PROMPT_ROWS) -> Path:
    lines = (REPO_ROOT / "examples" / "products.csv").read_text().splitlines()
    path.write_text("\n".join(lines[:rows + 1]) + "\n")
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("compare")
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("QC_", "INSTABATCH_"))}
    env.update(INSTABATCH_MODELS=str(write_registry(folder / "models.toml")), INSTABATCH_TORCH_THREADS="1")
    return folder, env


def instabatch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli.main", "compare", *args], check=False, cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def two_runs(setup) -> list[tuple[Path, subprocess.CompletedProcess]]:
    folder, env = setup
    prompts = write_prompts(folder / "prompts.csv")
    runs = []
    for name in ("first", "second"):
        out = folder / name
        done = instabatch(env, str(prompts), "--models", ",".join(MODELS), "--batch-size", str(BATCH),
                          "--out", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        runs.append((out, done))
    return runs


def result_lines(stdout: str) -> list[dict[str, str]]:
    return [dict(field.split("=", 1) for field in line.split()[1:])
            for line in stdout.splitlines() if line.startswith("RESULT ")]


def test_the_report_its_files_and_result_lines(two_runs):
    out, done = two_runs[0]
    lines = result_lines(done.stdout)
    assert [line["model"] for line in lines[:-1]] == list(MODELS)
    for line in lines[:-1]:
        assert float(line["images_per_s"]) > 0
        assert int(line["images"]) == PROMPT_ROWS
        rates = [float(line[key]) for key in ("pass_rate", "review_rate", "reject_rate")]
        assert sum(rates) == pytest.approx(1.0, abs=1e-3)
        assert 0 <= float(line["alignment"]) <= 100  # the tiny domain: the attribute judge grades every prompt
    assert lines[-1]["recommendation"] in MODELS

    document = json.loads((out / "results.json").read_text())
    assert [model["name"] for model in document["models"]] == list(MODELS)
    assert document["recommendation"]["name"] == lines[-1]["recommendation"]
    assert "within 2 percentage points" in document["recommendation"]["rule"]
    html = (out / "report.html").read_text()
    assert document["recommendation"]["rule"] in html and all(f'data-model="{name}"' in html for name in MODELS)
    assert len(document["images"]) == PROMPT_ROWS
    for row in document["images"]:
        assert (out / row["sheet"]).is_file()
        assert [cell["model"] for cell in row["models"]] == list(MODELS)
        assert all((out / cell["image"]).is_file() for cell in row["models"])
    with open(REPO_ROOT / "examples" / "products.csv", newline="") as handle:
        seeds = [int(row["seed"]) for row in list(csv.DictReader(handle))[:PROMPT_ROWS]]
    assert [row["seed"] for row in document["images"]] == seeds  # the file's own seeds


def test_same_seeds_give_the_same_images_and_models_differ(two_runs):
    (first, _), (second, _) = two_runs
    for model in MODELS:
        names = sorted(path.name for path in (first / "images" / model).glob("*.png"))
        assert len(names) == PROMPT_ROWS
        for name in names:
            assert (first / "images" / model / name).read_bytes() == (second / "images" / model / name).read_bytes()
    one, few = (sorted((first / "images" / model).glob("*.png")) for model in MODELS)
    assert any(a.read_bytes() != b.read_bytes() for a, b in zip(one, few))


def test_verdicts_are_the_workers_quality_checker_on_the_images(two_runs):
    """The rates are the service's: QualityChecker.check (what worker/steps.py calls) on the stored
    images, one micro-batch at a time with the model's earlier images as known hashes."""
    out, _ = two_runs[0]
    document = json.loads((out / "results.json").read_text())
    checker = QualityChecker()
    for model_index, model in enumerate(MODELS):
        known = HashIndex()
        rows = document["images"]
        images = [Image.open(out / row["models"][model_index]["image"]).convert("RGB") for row in rows]
        outcomes = checker.check(images, [row["prompt"] for row in rows], known_hashes=known)
        assert [o.verdict for o in outcomes] == [row["models"][model_index]["verdict"] for row in rows]
        summary = document["models"][model_index]
        assert summary["rates"]["pass"] == pytest.approx(sum(o.verdict == "pass" for o in outcomes) / len(rows))


def test_an_unknown_model_exits_2_listing_the_names(setup):
    folder, env = setup
    done = instabatch(env, str(write_prompts(folder / "p.csv")), "--models", "one,teacher-99",
                      "--out", str(folder / "unknown"))
    assert done.returncode == 2
    assert "teacher-99" in done.stderr and "one, few" in done.stderr
    assert not (folder / "unknown").exists()


def test_a_prompt_file_with_a_bad_row_exits_2_saying_where(setup):
    folder, env = setup
    bad = folder / "bad.csv"
    bad.write_text("external_id,prompt,seed\nsku-1,a red mug on white,1\nsku-2,,2\n")
    done = instabatch(env, str(bad), "--models", "one", "--out", str(folder / "bad"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "error:" in done.stderr and "bad.csv" in done.stderr and "prompt" in done.stderr
    assert not (folder / "bad").exists()


# -- the rule and the overrides, in process ------------------------------------------------------

def summary(name: str, images_per_s: float, pass_rate: float, alignment: float | None) -> ModelSummary:
    return ModelSummary(name=name, kind="one-step", steps=1, guidance=0.0, model_id=name, images=100, seconds=1.0,
                        images_per_s=images_per_s, seconds_per_image=1 / images_per_s,
                        rates={"pass": pass_rate, "review": 1 - pass_rate, "reject": 0.0}, alignment=alignment,
                        alignment_scorer="attribute_alignment", alignment_checked=100, attribute_accuracy={},
                        top_reasons=[], qc_seconds_per_image=0.0)


def test_the_recommendation_is_the_fastest_model_within_both_tolerances():
    models = [summary("fast", 100, 0.90, 80.0), summary("mid", 20, 0.95, 85.5), summary("slow", 2, 0.96, 86.0)]
    assert recommend(models).name == "mid"  # fast trails by 6 points of pass rate
    assert recommend(models).excluded == {"fast": "pass rate 6.0 points under the best, alignment 6.0 points "
                                                  "under the best"}
    assert recommend(models, pass_tolerance=10, alignment_tolerance=10).name == "fast"
    assert recommend(models, pass_tolerance=10).name == "mid"  # fast trails by 6 alignment points
    assert recommend(models, pass_tolerance=0, alignment_tolerance=0).name == "slow"
    unaligned = [summary("fast", 100, 0.95, None), summary("slow", 2, 0.96, 90.0)]
    assert recommend(unaligned).name == "fast" and "not part of the rule" in recommend(unaligned).rule


def test_overrides_apply_to_one_model_or_all(tmp_path):
    registry = load_registry(write_registry(tmp_path / "models.toml"))
    one, few = choose_models(registry, ["one", "few"], steps={"few": 8})
    assert (one.params.num_inference_steps, few.params.num_inference_steps) == (1, 8)
    assert few.params.guidance_scale == 1.0  # the registry's, not overridden
    assert {c.params.guidance_scale for c in choose_models(registry, ["one", "few"], guidance={None: 3.0})} == {3.0}
    with pytest.raises(CompareError, match="not among the compared models"):
        choose_models(registry, ["one"], steps={"few": 8})
    with pytest.raises(CompareError, match="named twice"):
        choose_models(registry, ["one", "one"])
