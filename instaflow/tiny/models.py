"""Architectures of the tiny model and the diffusers folder layout it is saved in."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

LATENT_CHANNELS = 4
LATENT_SIZE = 16  # 64x64 images -> 4x16x16 latents


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=64,
        mid_block_add_attention=False,
    )


def make_unet(cross_attention_dim: int = 64):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,  # diffusers' legacy name: this is the number of heads
        # A pooled text embedding added to the time embedding conditions every ResNet
        # (global attributes: colour, backdrop, kind) at no cost to the engine's call.
        addition_embed_type="text",
        addition_embed_type_num_heads=4,
    )


def model_index(name: str) -> dict:
    return {
        "_class_name": "InstaFlowPipeline",
        "_diffusers_version": _diffusers_version(),
        "_name_or_path": name,
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


# The engine integrates the flow with plain Euler steps (t=0 noise -> t=1 data, UNet timestep
# 1000 * (1 - t)) and reads no scheduler. InstaFlow's reference pipeline (a Stable Diffusion
# pipeline subclass) scales the starting noise by `scheduler.init_noise_sigma` and reads
# `scheduler.order`, so the folder carries the PNDM config the published InstaFlow checkpoints
# carry (init_noise_sigma 1, order 1); an Euler config would scale the noise by ~157
# (tests/test_reference_layout.py runs both pipelines on the shipped weights).
SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def save_pipeline_folder(
    folder: Path, name: str, unet, vae, text_encoder, tokenizer_dir: Path, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a complete diffusers-layout checkpoint that `InstaFlowPipeline.from_pretrained` loads."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for sub, model in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        _save_copy(model, folder / sub, dtype)
    shutil.copytree(tokenizer_dir, folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2))
    (folder / "model_index.json").write_text(json.dumps(model_index(name), indent=2))
    return folder


def _save_copy(model, folder: Path, dtype: torch.dtype) -> None:
    import copy

    clone = copy.deepcopy(model).to(dtype)
    clone.save_pretrained(folder, safe_serialization=True)


def load_folder(folder: Path):
    """(unet, vae, text_encoder, tokenizer) in fp32 on the CPU, for training and evaluation."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    from instaflow.compact import load_unet

    kw = dict(torch_dtype=torch.float32, local_files_only=True)
    return (
        load_unet(folder / "unet", torch.float32),
        AutoencoderKL.from_pretrained(folder / "vae", **kw),
        CLIPTextModel.from_pretrained(folder / "text_encoder", **kw),
        CLIPTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True),
    )


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
