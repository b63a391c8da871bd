"""The shipped checkpoints load correctly in InstaFlow's reference pipeline, not only in ours.

The reference (gnobitab/InstaFlow, code/pipeline_rf.py) is a Stable Diffusion pipeline whose
`__call__` keeps diffusers' `prepare_latents` (noise times `scheduler.init_noise_sigma`) and then
runs the Euler loop over timesteps ``(1 - i / N) * 1000``. Its code is not vendored here: the test
drives diffusers' real `StableDiffusionPipeline` building blocks with the scheduler the folder
declares, re-states the four-line Euler loop, and compares the pixels with our engine's.
"""
from __future__ import annotations

import json

import diffusers
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from core.settings import WEIGHTS_DIR
from instaflow.compact import export_standard, is_compact
from instaflow.pipeline import InstaFlowPipeline
from instaflow.tiny.models import SCHEDULER_CONFIG

SHIPPED = ["tiny-instaflow", "tiny-2rf", "tiny-teacher", "tiny-direct"]
PROMPTS = ["a red mug on a white backdrop", "a blue chair on a dark grey backdrop"]
SEEDS = [7, 1234]


def declared_scheduler(folder):
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    scheduler_class = getattr(diffusers, scheduler_config["_class_name"])
    return scheduler_class.from_pretrained(folder / "scheduler", local_files_only=True)


def reference_pipeline(folder) -> StableDiffusionPipeline:
    fp32 = {"local_files_only": True, "torch_dtype": torch.float32}  # the weights are stored in fp16
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae", **fp32),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", **fp32),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", **fp32),
        scheduler=declared_scheduler(folder),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@torch.no_grad()
def reference_images(pipe: StableDiffusionPipeline, noise: torch.Tensor, steps: int) -> np.ndarray:
    embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
    _, channels, height, width = noise.shape
    scale = pipe.vae_scale_factor
    latents = pipe.prepare_latents(len(PROMPTS), channels, height * scale, width * scale, embeds.dtype, "cpu",
                                   None, latents=noise)
    dt = 1.0 / steps
    for t in [(1.0 - i / steps) * 1000.0 for i in range(steps)]:
        v_pred = pipe.unet(latents, torch.ones((latents.shape[0],)) * t, encoder_hidden_states=embeds).sample
        latents = latents + dt * v_pred
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="np")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_scheduler_is_the_published_checkpoints_pndm_config(name):
    folder = WEIGHTS_DIR / name
    pipe_scheduler = declared_scheduler(folder)
    assert pipe_scheduler.init_noise_sigma == 1.0 and pipe_scheduler.order == 1
    assert json.loads((folder / "model_index.json").read_text())["scheduler"] == ["diffusers", "PNDMScheduler"]
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text()) == SCHEDULER_CONFIG


@pytest.mark.parametrize("name,steps", [("tiny-instaflow", 1), ("tiny-2rf", 4), ("tiny-teacher", 25),
                                        ("tiny-direct", 1)])
def test_reference_pipeline_reproduces_our_engine_on_the_shipped_weights(name, steps, tmp_path):
    folder = WEIGHTS_DIR / name
    ours = InstaFlowPipeline.from_pretrained(folder, device="cpu", dtype=torch.float32)
    expected = ours(PROMPTS, SEEDS, num_inference_steps=steps, output_type="np").images
    noise = ours.prepare_noise(SEEDS, *ours.native_size)
    # A compact checkpoint (int8 UNet, instaflow/compact.py) is exported to the plain layout first: the
    # reference pipeline reads only that one.
    standard = export_standard(folder, tmp_path / name) if is_compact(folder / "unet") else folder
    got = reference_images(reference_pipeline(standard), noise, steps)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-5
    assert (np.round(got * 255) == np.round(expected * 255)).all()


def test_an_euler_config_would_scale_the_reference_noise(tmp_path):
    """Why the config matters: the scheduler the folders used to declare scales the noise ~157x."""
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=1000, prediction_type="v_prediction",
                                                 timestep_spacing="linspace")
    assert scheduler.init_noise_sigma > 100
