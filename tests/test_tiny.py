"""The tiny InstaFlow model: renderer, prompts, tokenizer, the --quick recipe end to end, judge, weights."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from instaflow.tiny import DEFAULT_2RF_DIR, DEFAULT_JUDGE_DIR, DEFAULT_MODEL_DIR
from instaflow.tiny.prompts import (
    BACKDROPS, COLOURS, HELD_OUT_COMBOS, KINDS, TRAIN_COMBOS, Attributes, parse_prompt, vocabulary,
)
from instaflow.tiny.render import make_dataset, render

REPO = Path(__file__).resolve().parent.parent


def _red_mask(pixels: np.ndarray) -> np.ndarray:
    """Pixels of a red (or darker red) product: no backdrop, table top or shadow is red."""
    p = pixels.astype(int)
    return (p[..., 0] - p[..., 2] > 50) & (p[..., 0] - p[..., 1] > 50)


@pytest.mark.parametrize("kind", KINDS)
def test_render_draws_the_requested_placement_colour_and_backdrop(kind: str) -> None:
    rng = np.random.default_rng(0)
    xs = {}
    for placement in ("left", "center", "right"):
        attrs = Attributes(kind, "red", "light blue", placement, "large")
        pixels = np.asarray(render(attrs, rng))
        assert pixels.shape == (64, 64, 3)
        # the top-left corner is backdrop
        assert np.abs(pixels[2, 2].astype(int) - BACKDROPS["light blue"]).max() < 25
        mask = _red_mask(pixels)
        assert mask.sum() > 30, "a red product should be visible"
        assert not _red_mask(np.asarray(render(Attributes(kind, "blue", "light blue", placement, "large"),
                                                rng))).any(), "a blue product has no red"
        xs[placement] = np.nonzero(mask)[1].mean()
    assert xs["left"] < xs["center"] < xs["right"]


def test_large_products_cover_more_than_small_ones() -> None:
    rng = np.random.default_rng(1)
    for kind in KINDS:
        areas = {size: _red_mask(np.asarray(render(Attributes(kind, "red", "white", "center", size), rng))).sum()
                 for size in ("small", "large")}
        assert areas["large"] > 1.5 * areas["small"], kind


def test_held_out_combinations_never_reach_the_training_data() -> None:
    assert len(HELD_OUT_COMBOS) >= 20 and not set(HELD_OUT_COMBOS) & set(TRAIN_COMBOS)
    for values, index in ((KINDS, 0), (tuple(COLOURS), 1), (tuple(BACKDROPS), 2)):
        assert {c[index] for c in TRAIN_COMBOS} == set(values)
    _, captions, attrs = make_dataset(64, seed=3, combos=TRAIN_COMBOS)
    assert all(a.combo in TRAIN_COMBOS for a in attrs)
    for caption, a in zip(captions, attrs):
        parsed = parse_prompt(caption)
        assert parsed is not None, caption
        assert (parsed["kind"], parsed["colour"], parsed["backdrop"]) == a.combo
        assert parsed["placement"] in (None, a.placement) and parsed["size"] in (None, a.size)


def test_parse_prompt_reads_captions_and_refuses_unknown_words() -> None:
    assert parse_prompt("a red ceramic mug on a light blue backdrop, centered") == {
        "kind": "mug", "colour": "red", "backdrop": "light blue", "placement": "center", "size": None}
    assert parse_prompt("Studio photo of a large orange running shoe, dark grey background, on the left") == {
        "kind": "sneaker", "colour": "orange", "backdrop": "dark grey", "placement": "left", "size": "large"}
    assert parse_prompt("a red mug on a turquoise backdrop") is None  # unknown word
    assert parse_prompt("a mug on a white backdrop") is None  # no product colour
    assert parse_prompt("an astronaut riding a horse") is None


def test_example_products_are_in_the_model_vocabulary() -> None:
    with open(REPO / "examples" / "products.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) >= 24
    assert len({r["external_id"] for r in rows}) == len(rows)
    for row in rows:
        assert parse_prompt(row["prompt"]) is not None, row["prompt"]
        int(row["seed"])


def test_tokenizer_round_trip(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    from instaflow.tiny.text import MAX_LENGTH, save_tokenizer, tokenize

    save_tokenizer(tmp_path / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"), local_files_only=True)
    assert all(len(tokenizer.tokenize(word)) == 1 for word in vocabulary()), "one token per word"
    caption = "product shot: an orange running shoe against a light grey wall, on the right"
    ids = tokenize(tokenizer, [caption, ""])
    assert ids.shape == (2, MAX_LENGTH)
    assert ids[0, 0] == tokenizer.bos_token_id and ids[1, 1] == tokenizer.eos_token_id
    decoded = tokenizer.decode(ids[0], skip_special_tokens=True)
    assert re.sub(r"\s+([,:])", r"\1", decoded).strip() == caption


# -- the --quick recipe, end to end ----------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from instaflow.tiny.recipe import train

    out = tmp_path_factory.mktemp("tiny-quick")
    summary = train(out, quick=True, log=lambda message: None)
    return out, summary


def test_quick_recipe_runs_every_stage_and_losses_fall(quick_run: tuple[Path, dict]) -> None:
    from instaflow.tiny.recipe import STAGES

    out, summary = quick_run
    assert list(summary) == [name for name, _ in STAGES]
    for name in ("vae", "teacher"):
        loss = summary[name]["loss"]
        assert loss["last"] < loss["first"], (name, loss)
    for name in ("rf2", "distill", "direct"):
        assert np.isfinite(summary[name]["loss"]["last"])
    assert 0 < summary["latents"]["scaling_factor"] < 100
    pairs = torch.load(out / "stages" / "reflow_pairs" / "pairs.pt")
    assert pairs["z"].shape == pairs["x1"].shape == (len(pairs["captions"]), 4, 16, 16)
    for folder in ("teacher", "tiny-2rf", "tiny-instaflow", "direct-distill"):
        index = json.loads((out / folder / "model_index.json").read_text())
        assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            assert (out / folder / part).is_dir()


def test_quick_recipe_resumes_without_redoing_finished_stages(quick_run: tuple[Path, dict]) -> None:
    from instaflow.tiny.recipe import train

    out, summary = quick_run
    marker = out / "stages" / "teacher" / "done.json"
    before = marker.stat().st_mtime_ns
    messages: list[str] = []
    again = train(out, quick=True, log=messages.append)
    assert again == summary and marker.stat().st_mtime_ns == before
    assert not any(m.startswith("== stage") for m in messages)


def test_quick_models_load_through_the_folder_layout(quick_run: tuple[Path, dict]) -> None:
    from instaflow.tiny import flow
    from instaflow.tiny.models import load_folder
    from instaflow.tiny.text import tokenize

    out, _ = quick_run
    unet, vae, text_encoder, tokenizer = load_folder(out / "tiny-instaflow")
    assert unet.dtype == torch.float32  # stored fp16, loaded fp32 for the CPU
    with torch.no_grad():
        embeds = text_encoder(tokenize(tokenizer, ["a red mug on a white backdrop"] * 2)).last_hidden_state
        latents = flow.sample(unet, torch.randn(2, 4, 16, 16), embeds, None, steps=1)
        images = vae.decode(latents / vae.config.scaling_factor).sample
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()


def test_quick_judge_loads_and_predicts(quick_run: tuple[Path, dict]) -> None:
    from instaflow.tiny.judge import AttributeJudge

    out, _ = quick_run
    judge = AttributeJudge.load(out / "judge")
    images = [render(Attributes("lamp", "green", "beige", "left", "small"), np.random.default_rng(i))
              for i in range(3)]
    predictions = judge.predict(images)
    assert len(predictions) == 3
    for p in predictions:
        assert set(p) == {"kind", "colour", "backdrop", "placement", "size"}
        assert all(0.0 <= v["prob"] <= 1.0 and isinstance(v["label"], str) for v in p.values())
    assert judge.features(images).shape == (3, 64)


def test_eval_prints_the_table_and_the_result_line(quick_run: tuple[Path, dict], capsys) -> None:
    from instaflow.tiny.evaluate import evaluate

    out, _ = quick_run
    report = evaluate(quick=True, run_dir=out, model_dir=out / "tiny-instaflow", rf2_dir=out / "tiny-2rf",
                      judge_dir=out / "judge", threads=1, max_prompts=6, sheet_out=out / "sheet.png")
    printed = capsys.readouterr().out
    assert len(report["rows"]) == 8  # two render floors + six models
    last = printed.strip().splitlines()[-1]
    assert re.fullmatch(r"RESULT onestep_accuracy=[\d.]+ teacher25_accuracy=[\d.]+ onestep_fd=[\d.]+ "
                        r"teacher25_fd=[\d.]+ direct_accuracy=[\d.]+ onestep_img_per_s=[\d.]+", last), last
    assert (out / "sheet.png").exists()


def test_frechet_distance_is_zero_for_equal_sets_and_grows_with_a_shift() -> None:
    from instaflow.tiny.evaluate import frechet_distance

    a = np.random.default_rng(0).normal(size=(500, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 1.0) == pytest.approx(8.0, rel=0.05)


# -- the committed weights -------------------------------------------------------------

needs_weights = pytest.mark.skipif(
    not (DEFAULT_MODEL_DIR / "model_index.json").exists(), reason="tiny weights not committed yet")


@needs_weights
def test_committed_one_step_model_makes_64px_images() -> None:
    from instaflow.pipeline import InstaFlowPipeline

    torch.set_num_threads(2)
    pipe = InstaFlowPipeline.from_pretrained(DEFAULT_MODEL_DIR, device="cpu")
    out = pipe(["a red ceramic mug on a light blue backdrop, centered"] * 2, [1, 2])
    assert [im.size for im in out.images] == [(64, 64), (64, 64)]
    assert np.asarray(out.images[0]).std() > 5, "not a flat image"
    refiner = InstaFlowPipeline.from_pretrained(DEFAULT_2RF_DIR, device="cpu")
    out = refiner(["a blue box on a white backdrop"], [3], num_inference_steps=4, guidance_scale=1.5)
    assert out.images[0].size == (64, 64)


@needs_weights
def test_committed_judge_reads_fresh_renders() -> None:
    from instaflow.tiny.judge import AttributeJudge
    from instaflow.tiny.prompts import all_combos

    pixels, _, attrs = make_dataset(96, seed=99, combos=tuple(all_combos()))
    accuracy = AttributeJudge.load().accuracy_on(pixels, attrs)
    assert accuracy["all"] >= 0.9, accuracy
    sizes = sum(f.stat().st_size for d in (DEFAULT_MODEL_DIR, DEFAULT_2RF_DIR, DEFAULT_JUDGE_DIR)
                for f in d.rglob("*") if f.is_file())
    assert sizes <= 25 * 2**20
