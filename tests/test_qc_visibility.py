"""Subject visibility on dark backdrops (docs/qc.md, "Subject visibility").

The demo's three dark-grey images a person rejects (a green smudge for a bottle, a red blob for a
lamp, a barely visible chair) used to pass QC. They are generated here the way the demo does
(the committed one-step model, examples/products.csv's seeds) and checked by the worker's checker;
correct renders on every backdrop must pass the visibility check, and good images still pass.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from qc import QcSettings, QualityChecker, rejudge
from qc.images import ImageView
from qc.scorers import ScoringBatch, VisibilityScorer

REPO = Path(__file__).resolve().parent.parent
DEMO_CSV = REPO / "examples" / "products.csv"
DEMO_FAILURES = ("sku-bottle-04", "sku-lamp-04", "sku-chair-04")
# Good demo images: a blue mug on beige and an orange sneaker on dark grey (the rule is not "dark = bad").
DEMO_GOOD = ("sku-mug-02", "sku-sneaker-04")


@pytest.fixture(scope="module")
def demo_images() -> dict[str, tuple[str, Image.Image]]:
    """external_id -> (prompt, image) for the demo rows the tests look at, generated as the demo does."""
    import torch

    from instaflow.pipeline import InstaFlowPipeline
    from instaflow.tiny import DEFAULT_MODEL_DIR

    torch.set_num_threads(1)
    with DEMO_CSV.open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["external_id"] in DEMO_FAILURES + DEMO_GOOD]
    pipe = InstaFlowPipeline.from_pretrained(DEFAULT_MODEL_DIR, device="cpu")
    out = pipe([r["prompt"] for r in rows], seeds=[int(r["seed"]) for r in rows], output_type="pil")
    return {r["external_id"]: (r["prompt"], image.convert("RGB")) for r, image in zip(rows, out.images)}


@pytest.fixture(scope="module")
def checker() -> QualityChecker:
    return QualityChecker()  # what the worker builds: default settings, the bundled judge


def check(checker: QualityChecker, prompt: str, image: Image.Image):
    return checker.check([image], [prompt])[0]


@pytest.mark.parametrize("sku", DEMO_FAILURES)
def test_demo_dark_failures_are_flagged(checker, demo_images, sku):
    prompt, image = demo_images[sku]
    outcome = check(checker, prompt, image)
    assert outcome.verdict == "review", (sku, outcome.reasons)
    assert "unsure_on_dark" in outcome.reasons
    # Recorded like every other reason: on the judge's record with the threshold it applied.
    alignment = outcome.result("attribute_alignment")
    assert "unsure_on_dark" in alignment.reasons
    assert alignment.thresholds["dark_attribute_min_prob"] == QcSettings().dark_attribute_min_prob
    # The stored record re-judged without the rule passes again: nothing else caught it.
    assert rejudge(outcome.to_dict(), QcSettings(dark_attribute_min_prob=0.0)).verdict == "pass"


@pytest.mark.parametrize("sku", DEMO_GOOD)
def test_good_demo_images_still_pass(checker, demo_images, sku):
    prompt, image = demo_images[sku]
    outcome = check(checker, prompt, image)
    assert outcome.verdict == "pass", (sku, outcome.reasons)
    visibility = outcome.result("visibility")
    assert visibility.metrics["subject_contrast"] > 3 * QcSettings().visibility_min


def test_renders_on_every_backdrop_pass_the_visibility_check():
    from instaflow.tiny.prompts import BACKDROPS, all_combos, random_attributes
    from instaflow.tiny.render import render

    rng = np.random.default_rng(2026)
    checker = QualityChecker(QcSettings(alignment="none"))
    per_backdrop = 12
    for backdrop in BACKDROPS:
        combos = tuple(c for c in all_combos() if c[2] == backdrop)
        # Black products included on purpose: on dark grey they are the faintest correct renders.
        images = [render(random_attributes(rng, combos), rng) for _ in range(per_backdrop)]
        for outcome in checker.check(images):
            visibility = outcome.result("visibility")
            assert visibility.reasons == [], (backdrop, visibility.metrics)
            assert visibility.metrics["subject_contrast"] >= QcSettings().visibility_min


def backdrop_only(backdrop=(68, 70, 76), product=None, size=64) -> np.ndarray:
    """A wall, a table top a shade darker, and optionally a product of ``product`` colour."""
    image = np.empty((size, size, 3), np.uint8)
    image[:] = backdrop
    image[int(size * 0.7):] = [int(c * 0.92) for c in backdrop]
    if product is not None:
        image[int(size * 0.4):int(size * 0.8), int(size * 0.4):int(size * 0.6)] = product
    return image


def test_a_vanished_product_is_low_visibility_and_a_faint_one_is_measured():
    checker = QualityChecker(QcSettings(alignment="none"))
    light_blue = (165, 205, 240)  # on dark grey an empty frame is flat enough to be low_contrast too
    empty, faint, clear = checker.check([
        backdrop_only(light_blue),
        backdrop_only(light_blue, product=(160, 200, 234)),  # about 2 Delta E from the wall: invisible
        backdrop_only(product=(28, 28, 30)),  # a black product on dark grey: about 18 Delta E
    ])
    for outcome in (empty, faint):
        assert outcome.verdict == "review" and outcome.reasons == ["low_visibility"], outcome.reasons
    assert clear.verdict == "pass", clear.reasons
    assert clear.result("visibility").metrics["subject_contrast"] == pytest.approx(18, abs=3)
    assert clear.result("visibility").metrics["backdrop_luma"] == pytest.approx(0.27, abs=0.02)
    # Re-judged from the stored metrics with another bar, no image needed.
    assert rejudge(clear.to_dict(), QcSettings(visibility_min=25.0)).reasons == ["low_visibility"]


def test_low_contrast_hides_low_visibility():
    flat = np.full((64, 64, 3), 120, np.uint8)
    flat[::2, ::2] = 126  # not blank (luma std 0.010, above 1.5/255), but flat
    outcome = QualityChecker(QcSettings(alignment="none")).check([flat])[0]
    assert outcome.reasons == ["low_contrast"]
    assert "low_visibility" in outcome.result("visibility").reasons


def test_visibility_reads_large_images_at_about_64_px():
    small = backdrop_only(product=(205, 30, 35))
    large = np.asarray(Image.fromarray(small).resize((512, 512), Image.Resampling.NEAREST))
    scorer = VisibilityScorer()
    metrics = [scorer.score(ScoringBatch([ImageView(image)], [None]))[0] for image in (small, large)]
    assert ImageView(large).small_rgb.shape[:2] == (64, 64)
    assert metrics[1]["subject_contrast"] == pytest.approx(metrics[0]["subject_contrast"], rel=0.02)
    assert metrics[1]["subject_area"] == pytest.approx(metrics[0]["subject_area"], abs=0.01)


def test_unsure_on_dark_only_where_the_judge_reads_a_dark_backdrop():
    def stored(backdrop: str, p_colour: float) -> dict:
        attributes = {
            "kind": {"wanted": "lamp", "seen": "lamp", "p_wanted": 0.999, "p_seen": 0.999},
            "colour": {"wanted": "red", "seen": "red", "p_wanted": p_colour, "p_seen": p_colour},
            "backdrop": {"wanted": backdrop, "seen": backdrop, "p_wanted": 0.999, "p_seen": 0.999},
        }
        score = sum(a["p_wanted"] for a in attributes.values()) / 3
        return {"verdict": "pass", "reasons": [], "results": [
            {"scorer": "attribute_alignment", "version": "1", "metrics": {"checked": True, "score": score,
                                                                           "attributes": attributes}}]}

    assert rejudge(stored("dark grey", 0.83)).reasons == ["unsure_on_dark"]
    assert rejudge(stored("dark grey", 0.99)).verdict == "pass"
    assert rejudge(stored("white", 0.83)).verdict == "pass"  # light backdrops keep the 0.5 bar
    assert rejudge(stored("white", 0.83), QcSettings(dark_backdrops={"white"})).reasons == ["unsure_on_dark"]
    # A wrong reading is reported as the mismatch, not twice.
    wrong = stored("dark grey", 0.3)
    wrong["results"][0]["metrics"]["attributes"]["colour"].update(seen="pink", p_seen=0.7)
    assert rejudge(wrong).reasons == ["wrong_color"]


def test_evaluation_reports_accuracy_per_backdrop():
    """instaflow/tiny/evaluate.py's per-backdrop block: renders of the held-out prompts, graded by the judge."""
    from instaflow.tiny.evaluate import attribute_scores, eval_prompts, print_backdrop_table, reference_renders
    from instaflow.tiny.judge import AttributeJudge
    from instaflow.tiny.prompts import BACKDROPS

    prompts = eval_prompts(quick=True)
    renders = reference_renders(prompts, 1, seed=8)
    scores = attribute_scores(AttributeJudge.load(), renders, prompts)
    per_backdrop = scores["per_backdrop"]
    assert set(per_backdrop) == set(BACKDROPS)
    assert sum(row["n"] for row in per_backdrop.values()) == len(prompts)
    weighted = sum(row["accuracy"] * row["n"] for row in per_backdrop.values()) / len(prompts)
    assert weighted == pytest.approx(scores["accuracy"])
    assert all(row["accuracy"] > 0.9 for row in per_backdrop.values())  # the judge reads renders right
    # A wrong colour on every dark-grey prompt shows in that backdrop's row alone.
    dark = [i for i, (_, want) in enumerate(prompts) if want["backdrop"] == "dark grey"]
    recoloured = renders.copy()
    recoloured[dark] = reference_renders([(p, {**w, "colour": "pink" if w["colour"] != "pink" else "blue"})
                                          for p, w in (prompts[i] for i in dark)], 1, seed=9)
    wrong = attribute_scores(AttributeJudge.load(), recoloured, prompts)["per_backdrop"]
    assert wrong["dark grey"]["colour"] < 0.2 and wrong["white"]["colour"] > 0.9
    print_backdrop_table({"renders": scores, "dark recoloured": {"per_backdrop": wrong}})
