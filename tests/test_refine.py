"""The refine step (issue 6): rectified-flow img2img and the SDXL-Refiner wrapper, on tiny random checkpoints."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from instaflow.loading import ModelNotFoundError
from instaflow.pipeline import InstaFlowPipeline
from instaflow.refine import (
    RectifiedFlowRefiner,
    RefineParams,
    SDXLRefiner,
    img2img_schedule_length,
    load_refiner,
)
from instaflow.testing import make_random_sdxl_refiner

PROMPTS = ["a red mug on a table", "a blue running shoe"]
SEEDS = [21, 22]


@pytest.fixture(scope="module")
def base_images(random_checkpoint: Path) -> list:
    torch.set_num_threads(1)
    return InstaFlowPipeline.from_pretrained(random_checkpoint)(PROMPTS, SEEDS).images


@pytest.fixture(scope="module")
def refiner(random_checkpoint: Path) -> RectifiedFlowRefiner:
    loaded = load_refiner(random_checkpoint)
    assert isinstance(loaded, RectifiedFlowRefiner)
    return loaded


@pytest.fixture(scope="module")
def sdxl_refiner(tmp_path_factory: pytest.TempPathFactory) -> SDXLRefiner:
    loaded = load_refiner(make_random_sdxl_refiner(tmp_path_factory.mktemp("models") / "tiny-random-sdxl-refiner"))
    assert isinstance(loaded, SDXLRefiner)
    return loaded


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_refined_images_differ_from_base_and_keep_their_size(refiner: RectifiedFlowRefiner, base_images: list) -> None:
    out = refiner.refine(base_images, PROMPTS, SEEDS, strength=0.3, steps=3)
    assert [image.size for image in out.images] == [image.size for image in base_images]
    assert out.nsfw_flags == [False, False]
    for base, refined in zip(base_images, out.images):
        assert np.abs(pixels(base) - pixels(refined)).max() > 0


def test_upscale_2_doubles_the_size(refiner: RectifiedFlowRefiner, base_images: list) -> None:
    out = refiner.refine(base_images, PROMPTS, SEEDS, steps=1, upscale=2)
    assert [image.size for image in out.images] == [(128, 128), (128, 128)]


def test_refine_is_deterministic_per_seed(refiner: RectifiedFlowRefiner, base_images: list) -> None:
    first = refiner.refine(base_images, PROMPTS, SEEDS, strength=0.5, steps=2).images
    again = refiner.refine(base_images, PROMPTS, SEEDS, strength=0.5, steps=2).images
    assert [png_bytes(image) for image in first] == [png_bytes(image) for image in again]
    other = refiner.refine(base_images, PROMPTS, [121, 122], strength=0.5, steps=2).images
    assert all(np.abs(pixels(a) - pixels(b)).max() > 0 for a, b in zip(first, other))


def test_refine_renoises_to_t0_and_integrates_from_there(
    refiner: RectifiedFlowRefiner, base_images: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipe = refiner.pipe
    calls: list[tuple[torch.Tensor, list[float]]] = []
    real_forward = pipe.unet.forward

    def spy(sample, timestep, encoder_hidden_states, **kwargs):
        calls.append((sample.clone(), timestep.tolist()))
        return real_forward(sample, timestep, encoder_hidden_states, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", spy)
    refiner.refine(base_images, PROMPTS, SEEDS, strength=0.4, steps=2)

    # t0 = 0.6 -> timestep 1000 * (1 - 0.6) = 400, then t = 0.8 -> 200.
    assert [timesteps for _, timesteps in calls] == [[pytest.approx(400.0)] * 2, [pytest.approx(200.0)] * 2]
    with torch.inference_mode():
        expected_start = 0.6 * refiner.encode_images(base_images) + 0.4 * pipe.prepare_noise(SEEDS, 64, 64)
    torch.testing.assert_close(calls[0][0], expected_start)


def test_bad_refine_arguments_are_refused(refiner: RectifiedFlowRefiner, base_images: list) -> None:
    with pytest.raises(ValueError, match="one prompt and one seed per image"):
        refiner.refine(base_images, PROMPTS[:1], SEEDS)
    with pytest.raises(ValidationError):
        refiner.refine(base_images, PROMPTS, SEEDS, strength=0.95)


@pytest.mark.parametrize("path", ["/nowhere/refiner", "stabilityai/stable-diffusion-xl-refiner-1.0"])
def test_a_missing_refiner_path_is_a_clear_error(path: str) -> None:
    with pytest.raises(ModelNotFoundError, match=path):
        load_refiner(path)
    with pytest.raises(ModelNotFoundError, match=path):
        SDXLRefiner.from_pretrained(path)


def test_an_unknown_pipeline_class_is_not_a_refiner(random_checkpoint: Path, tmp_path: Path) -> None:
    other = shutil.copytree(random_checkpoint, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ModelNotFoundError, match="StableDiffusionPipeline"):
        load_refiner(other)


def test_refine_params_bounds() -> None:
    assert RefineParams() == RefineParams(enabled=False, strength=0.3, steps=4, upscale=1)
    assert RefineParams.model_validate({"enabled": True, "strength": 0.9, "steps": 50, "upscale": 2}).upscale == 2
    for bad in ({"strength": 0.05}, {"strength": 0.95}, {"steps": 0}, {"steps": 51}, {"upscale": 3}, {"extra": 1}):
        with pytest.raises(ValidationError):
            RefineParams.model_validate(bad)


@pytest.mark.parametrize("steps, strength", [(1, 0.1), (3, 0.3), (4, 0.3), (6, 0.6), (50, 0.9), (7, 0.7)])
def test_img2img_schedule_runs_exactly_the_asked_steps(steps: int, strength: float) -> None:
    total = img2img_schedule_length(steps, strength)
    assert min(int(total * strength), total) == steps


def test_sdxl_refiner_runs_the_asked_steps_and_upscales(
    sdxl_refiner: SDXLRefiner, base_images: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    unet = sdxl_refiner.pipeline.unet
    calls: list[int] = []
    real_forward = unet.forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", spy)
    out = sdxl_refiner.refine(base_images, PROMPTS, SEEDS, strength=0.3, steps=3, upscale=2)
    assert len(calls) == 3  # one batched (guided) UNet pass per step
    assert [image.size for image in out.images] == [(128, 128), (128, 128)]
    assert all(np.abs(pixels(a.resize((64, 64))) - pixels(b)).max() > 0 for a, b in zip(out.images, base_images))


def test_sdxl_refiner_is_deterministic_per_seed(sdxl_refiner: SDXLRefiner, base_images: list) -> None:
    first = sdxl_refiner.refine(base_images, PROMPTS, SEEDS, steps=2).images
    again = sdxl_refiner.refine(base_images, PROMPTS, SEEDS, steps=2).images
    assert [png_bytes(image) for image in first] == [png_bytes(image) for image in again]
    assert sdxl_refiner.model_id == "tiny-random-sdxl-refiner" and len(sdxl_refiner.weights_sha256) == 64
