"""The refine step: img2img from an intermediate flow time, after one-step generation.

Two refiners share one interface (`refine(images, prompts, seeds, strength, steps, upscale)`):

* `RectifiedFlowRefiner` — a rectified-flow checkpoint (the tiny default: the recipe's
  2-rectified-flow model; or XCLiu/2_rectified_flow_from_sd_1_5). Resize (optionally 2x),
  VAE-encode to x1, re-noise to flow time t0 = 1 - strength on the straight line
  ``x_t0 = t0 * x1 + (1 - t0) * z`` (InstaFlow's convention: t = 0 is noise, t = 1 is data,
  the UNet sees timestep 1000 * (1 - t)), then `steps` Euler steps from t0 to 1, decode.
  z comes from the item's seed, the same noise its base image started from.
* `SDXLRefiner` — the paper's pairing: SDXL-Refiner img2img through diffusers'
  `StableDiffusionXLImg2ImgPipeline` (strength about 0.3), from a local folder only.

`load_refiner(path)` picks the kind from model_index.json's `_class_name`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from core.params import RefineParams
from instaflow.loading import (
    ModelNotFoundError,
    default_device,
    default_dtype,
    model_id_of,
    read_model_index,
    resolve_model_dir,
    weights_fingerprint,
)
from instaflow.pipeline import InstaFlowOutput, InstaFlowPipeline

RECTIFIED_FLOW_CLASSES = ("RectifiedFlowPipeline", "InstaFlowPipeline")
SDXL_IMG2IMG_CLASSES = ("StableDiffusionXLImg2ImgPipeline",)


class Refiner(Protocol):
    kind: str

    @property
    def model_id(self) -> str: ...

    @property
    def weights_sha256(self) -> str: ...

    def refine(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        seeds: Sequence[int],
        strength: float = 0.3,
        steps: int = 4,
        upscale: int = 1,
    ) -> InstaFlowOutput: ...


def load_refiner(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Refiner:
    """Load the refiner at a local path, of the kind its model_index.json declares."""
    try:
        class_name = read_model_index(path).get("_class_name")
    except ModelNotFoundError as error:  # say which model: the base model loaded fine
        raise ModelNotFoundError(f"refiner (INSTABATCH_REFINER): {error}") from error
    if class_name in RECTIFIED_FLOW_CLASSES:
        return RectifiedFlowRefiner.from_pretrained(path, device=device, dtype=dtype)
    if class_name in SDXL_IMG2IMG_CLASSES:
        return SDXLRefiner.from_pretrained(path, device=device, dtype=dtype)
    raise ModelNotFoundError(
        f"refiner {str(path)!r} is a {class_name!r} checkpoint; supported: "
        f"{', '.join(RECTIFIED_FLOW_CLASSES + SDXL_IMG2IMG_CLASSES)}"
    )


def check_refine_args(images: Sequence[Image.Image], prompts: Sequence[str], seeds: Sequence[int],
                      strength: float, steps: int, upscale: int) -> None:
    if not images or not len(images) == len(prompts) == len(seeds):
        raise ValueError(f"need one prompt and one seed per image: {len(images)}, {len(prompts)}, {len(seeds)}")
    if len({image.size for image in images}) != 1:
        raise ValueError("all images of one refine call must have the same size")
    # The same bounds as RefineParams, for callers that skip the schema.
    RefineParams(enabled=True, strength=strength, steps=steps, upscale=upscale)


def upscaled(images: Sequence[Image.Image], factor: int) -> list[Image.Image]:
    if factor == 1:
        return [image.convert("RGB") for image in images]
    return [image.convert("RGB").resize((image.width * factor, image.height * factor), Image.LANCZOS)
            for image in images]


class RectifiedFlowRefiner:
    """Img2img with a rectified-flow model: re-noise to t0 = 1 - strength, Euler to t = 1."""

    kind = "rectified_flow"

    def __init__(self, pipe: InstaFlowPipeline, guidance_scale: float = 1.0):
        # 2-rectified flow is run with guidance 1-2; 1.0 (the default) means no guidance.
        self.pipe = pipe
        self.guidance_scale = guidance_scale

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        guidance_scale: float = 1.0,
    ) -> "RectifiedFlowRefiner":
        return cls(InstaFlowPipeline.from_pretrained(path, device=device, dtype=dtype), guidance_scale)

    @property
    def model_id(self) -> str:
        return self.pipe.model_id

    @property
    def weights_sha256(self) -> str:
        return self.pipe.weights_sha256

    @torch.inference_mode()
    def refine(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        seeds: Sequence[int],
        strength: float = 0.3,
        steps: int = 4,
        upscale: int = 1,
    ) -> InstaFlowOutput:
        check_refine_args(images, prompts, seeds, strength, steps, upscale)
        pipe = self.pipe
        images = upscaled(images, upscale)
        width, height = images[0].size
        pipe.check_size(height, width)
        do_guidance = self.guidance_scale > 1.0

        # Re-noise: the point at flow time t0 on the straight line from z to the image.
        t_start = 1.0 - strength
        data = self.encode_images(images)
        noise = pipe.prepare_noise(seeds, height, width)
        latents = t_start * data + (1.0 - t_start) * noise

        prompt_embeds = pipe.encode_prompts(prompts)
        uncond_embeds = pipe.encode_prompts([""] * len(prompts)) if do_guidance else None
        latents = pipe.integrate(latents, prompt_embeds, uncond_embeds, self.guidance_scale, steps, t_start)

        decoded, nsfw_flags = pipe.run_safety_checker(pipe.decode(latents))
        return InstaFlowOutput(images=pipe.to_output(decoded, "pil"), nsfw_flags=nsfw_flags)

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB images -> scaled latents (the posterior mean: deterministic, noise comes from the seed)."""
        pixels = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        pixels = torch.from_numpy(pixels).permute(0, 3, 1, 2).to(self.pipe.device, self.pipe.dtype)
        vae = self.pipe.vae
        return vae.encode(pixels * 2.0 - 1.0).latent_dist.mean * vae.config.scaling_factor


class SDXLRefiner:
    """SDXL-Refiner img2img (the paper's pairing), loaded from a local diffusers folder."""

    kind = "sdxl_img2img"

    def __init__(self, pipeline: object, path: Path):
        self.pipeline = pipeline
        self.path = path

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "SDXLRefiner":
        from diffusers import StableDiffusionXLImg2ImgPipeline

        folder = resolve_model_dir(path)
        device = torch.device(device) if device is not None else default_device()
        dtype = dtype or default_dtype(device)
        pipeline = StableDiffusionXLImg2ImgPipeline.from_pretrained(
            folder, dtype=dtype, local_files_only=True, variant=_weights_variant(folder)
        )
        if device.type != "cpu":  # loaded on the CPU already; moving there only logs warnings
            pipeline = pipeline.to(device)
        pipeline.set_progress_bar_config(disable=True)
        return cls(pipeline, folder)

    @property
    def model_id(self) -> str:
        return model_id_of(self.path, read_model_index(self.path))

    @property
    def weights_sha256(self) -> str:
        return weights_fingerprint(self.path)

    def refine(
        self,
        images: Sequence[Image.Image],
        prompts: Sequence[str],
        seeds: Sequence[int],
        strength: float = 0.3,
        steps: int = 4,
        upscale: int = 1,
    ) -> InstaFlowOutput:
        check_refine_args(images, prompts, seeds, strength, steps, upscale)
        images = upscaled(images, upscale)
        output = self.pipeline(
            prompt=list(prompts),
            image=images,
            strength=strength,
            num_inference_steps=img2img_schedule_length(steps, strength),
            generator=[torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds],
            output_type="pil",
        )
        return InstaFlowOutput(images=list(output.images), nsfw_flags=[False] * len(images))


def img2img_schedule_length(steps: int, strength: float) -> int:
    """The num_inference_steps for which diffusers' img2img runs exactly `steps` steps.

    diffusers runs int(num_inference_steps * strength) of them (the tail of the schedule).
    """
    total = math.ceil(steps / strength)
    while int(total * strength) < steps:  # float rounding, e.g. 0.3 * 10 = 2.9999...
        total += 1
    return total


def _weights_variant(folder: Path) -> str | None:
    """'fp16' when the UNet ships only fp16-variant files (as stabilityai's refiner can)."""
    unet_files = [p.name for p in (folder / "unet").glob("*.safetensors")] if (folder / "unet").is_dir() else []
    if unet_files and all(".fp16." in name for name in unet_files):
        return "fp16"
    return None
