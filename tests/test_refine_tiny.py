"""The refine step end to end through a real Celery worker, on the tiny model that ships in the repo.

Held-out prompts (attribute combinations the tiny model never trained on) run three times with
the same seeds: one-step only, refined (strength 0.3, 4 steps) and refined with a 2x upscale
(strength 0.4, 3 steps). The refined images must differ from the base ones, have the requested
size, carry the refiner in their provenance (PNG text chunks and the ledger's image row), and
keep the prompts' attributes: the attribute judge's accuracy on them no worse than on the base
images by more than the measured tolerances below. Skipped until the tiny weights are committed.

A missing refiner is checked on a random checkpoint (no tiny weights needed): the items fail
with an error that names the path, and the same worker goes on generating.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.refine import attribute_accuracy, held_out_sample, judge_readings
from core.provenance import read_png_provenance
from instaflow.tiny import WEIGHTS_DIR
from models import ItemState
from tests.workerkit import Stack, build_stack, running_worker

# TINY_WEIGHTS_DIR points the test at another run's folders (tiny-instaflow, tiny-2rf, judge).
WEIGHTS = Path(os.environ.get("TINY_WEIGHTS_DIR") or WEIGHTS_DIR)
MODEL, REFINER, JUDGE = WEIGHTS / "tiny-instaflow", WEIGHTS / "tiny-2rf", WEIGHTS / "judge"
PROMPTS = 16  # of 23 held-out combinations, in held_out_sample's balanced order
REFINE = {"enabled": True, "strength": 0.3, "steps": 4}
REFINE_UP2 = {"enabled": True, "strength": 0.4, "steps": 3, "upscale": 2}
# Judge accuracy over kind/colour/backdrop is 48 judgements here: one flipped attribute is FLIP.
# Measured on 240 held-out prompts in 15 samples of 16 with this test's seeds (0-15): refine
# (0.3, 4 steps) moved accuracy by -0.011 on average, -0.0625 (3 flips) in the worst sample;
# upscale 2 (0.4, 3 steps) by -0.033 on average, -0.083 (4 flips) at worst: the tiny 2-RF
# never trained at 128x128. On 200 prompts (bench/refine.py): base 0.943, refined 0.945.
# This test's own sample measured base 0.896, refined 0.917, upscaled 0.875.
FLIP = 1 / (3 * PROMPTS)
ACCURACY_TOLERANCE = 3 * FLIP
UPSCALE_ACCURACY_TOLERANCE = 4 * FLIP

needs_tiny_weights = pytest.mark.skipif(
    not all((folder / name).is_file() for folder, name in
            ((MODEL, "model_index.json"), (REFINER, "model_index.json"), (JUDGE, "judge.safetensors"))),
    reason=f"the tiny model, its 2-rectified-flow refiner or the judge is not in {WEIGHTS} yet")


@pytest.fixture(scope="module")
def held_out() -> list[tuple[str, dict]]:
    return held_out_sample(PROMPTS)


@pytest.fixture
def tiny_stack(configure) -> Stack:
    return build_stack(configure, INSTABATCH_MODEL=str(MODEL), INSTABATCH_REFINER=str(REFINER),
                       INSTABATCH_TORCH_THREADS="1")


def run_batches(stack: Stack, prompts: list[str], params: list[dict]) -> list[str]:
    """Each params' batch of the same prompts and seeds, through one worker; all must succeed."""
    with running_worker(stack):
        batch_ids = [stack.submit(prompts, params=p) for p in params]
        for batch_id in batch_ids:
            assert stack.wait_until_done(batch_id)["succeeded"] == len(prompts)
    return batch_ids


def stored_images(stack: Stack, batch_id: str) -> list[tuple[object, Image.Image, dict[str, str]]]:
    """(Image row, picture, PNG provenance) per item, in the order the prompts were submitted."""
    seq_of = {item.id: item.seq for item in stack.items(batch_id)}
    out = []
    for row in sorted(stack.images(batch_id), key=lambda image: seq_of[image.item_id]):
        png = stack.store.get(row.storage_key)
        out.append((row, Image.open(io.BytesIO(png)).convert("RGB"), read_png_provenance(png)))
    return out


@needs_tiny_weights
def test_refined_images_differ_keep_attributes_and_name_the_refiner(tiny_stack, held_out):
    from instaflow.tiny.judge import AttributeJudge

    prompts, wants = [p for p, _ in held_out], [w for _, w in held_out]
    base_id, refined_id, up2_id = run_batches(tiny_stack, prompts, [{}, {"refine": REFINE}, {"refine": REFINE_UP2}])
    base, refined, up2 = (stored_images(tiny_stack, b) for b in (base_id, refined_id, up2_id))

    for row, picture, png in base:
        assert row.refine is None and "refine" not in row.timings and "refiner_model" not in png
    for runs, asked, factor in ((refined, REFINE, 1), (up2, REFINE_UP2, 2)):
        for (base_row, base_picture, _), (row, picture, png) in zip(base, runs):
            assert row.seed == base_row.seed
            assert picture.resize(base_picture.size, Image.BILINEAR).tobytes() != base_picture.tobytes()
            assert picture.size == (base_picture.width * factor, base_picture.height * factor)
            assert (row.width, row.height) == picture.size
            assert_names_the_refiner(row, png, asked)
            assert row.timings["generate"] > 0 and row.timings["refine"] > 0
            assert row.qc_verdict in ("pass", "review", "reject")  # refined images are QC'd like base ones
        assert changed_levels(base, runs) > 1.0, "refining left the images as they were"

    judge = AttributeJudge.load(JUDGE)
    accuracy = {name: attribute_accuracy(judge_readings(judge, [picture for _, picture, _ in runs]), wants)
                for name, runs in (("base", base), ("refined", refined), ("refined_up2", up2))}
    print("RESULT " + " ".join(f"{name}_accuracy={value:.4f}" for name, value in accuracy.items()))
    assert accuracy["refined"] >= accuracy["base"] - ACCURACY_TOLERANCE - 1e-9, accuracy
    assert accuracy["refined_up2"] >= accuracy["base"] - UPSCALE_ACCURACY_TOLERANCE - 1e-9, accuracy


def assert_names_the_refiner(row, png: dict[str, str], asked: dict) -> None:
    """The ledger row and the PNG both say which refiner ran, with which strength and steps."""
    refiner_name = json.loads((REFINER / "model_index.json").read_text()).get("_name_or_path") or REFINER.name
    assert row.refine["refiner_model"] == png["refiner_model"] == refiner_name
    assert row.refine["refiner_weights_sha256"] == png["refiner_weights_sha256"]
    assert len(png["refiner_weights_sha256"]) == 64 and png["refiner_weights_sha256"] != row.weights_sha256
    recorded = json.loads(png["params"])["refine"]
    for key in ("strength", "steps", "upscale"):
        assert row.refine[key] == recorded[key] == asked.get(key, 1)


def changed_levels(base: list, refined: list) -> float:
    """Mean |refined - base| in 0-255 levels, the refined image brought back to the base size."""
    return float(np.mean([
        np.abs(np.asarray(b, np.float32) - np.asarray(r.resize(b.size, Image.BILINEAR), np.float32)).mean()
        for (_, b, _), (_, r, _) in zip(base, refined)]))


def test_a_missing_refiner_fails_the_items_not_the_worker(configure, random_checkpoint, tmp_path):
    missing = tmp_path / "nowhere"
    stack = build_stack(configure, INSTABATCH_MODEL=str(random_checkpoint), INSTABATCH_REFINER=str(missing))
    with running_worker(stack):
        refined_id = stack.submit(["a red mug", "a blue box"], params={"refine": {"enabled": True}})
        counts = stack.wait_until_done(refined_id)
        plain_id = stack.submit(["a green lamp"])  # the same worker, still generating
        assert stack.wait_until_done(plain_id)["succeeded"] == 1
    assert counts["failed"] == 2 and counts["succeeded"] == 0
    for item in stack.items(refined_id):
        assert item.state == ItemState.FAILED.value
        assert str(missing) in item.error and "INSTABATCH_REFINER" in item.error, item.error
    assert len(stack.events(refined_id, "item.failed")) == 2 and not stack.images(refined_id)


def test_a_refined_image_has_the_same_bytes_alone_as_in_a_full_pass(configure, random_checkpoint):
    """With INSTABATCH_PAD_MICRO_BATCH (the default) an image's bytes never depend on its neighbours:
    a retry regenerates an item alone and must store what the first run would have. The refine
    pass is padded like the one-step pass; unpadded, these images came out up to a level apart."""
    from core.settings import get_settings
    from core.params import GenerationParams
    from worker.model_runner import ModelRunner

    configure(INSTABATCH_MODEL=str(random_checkpoint), INSTABATCH_REFINER=str(random_checkpoint),
              INSTABATCH_MICRO_BATCH="4", INSTABATCH_TORCH_THREADS="1")
    engine = ModelRunner(get_settings())
    params = GenerationParams.from_batch({"refine": {"enabled": True, "upscale": 2}})
    prompts, seeds = ["a red mug", "a blue box on white", "a green lamp", "a pink sneaker"], [0, 1, 2, 3]
    together = engine.generate(prompts, seeds, params).images
    alone = [engine.generate([prompt], [seed], params).images[0] for prompt, seed in zip(prompts, seeds)]
    assert [image.size for image in together] == [(128, 128)] * 4
    assert [image.tobytes() for image in alone] == [image.tobytes() for image in together]
