"""One-step (and few-step) rectified-flow text-to-image, as InstaFlow runs it.

Modelled on diffusers' single-file pipelines and on InstaFlow's own `RectifiedFlowPipeline`
(gnobitab/InstaFlow, code/pipeline_rf.py). The facts that matter:

* flow time t runs from 0 (noise) to 1 (data); the UNet is called at timestep
  ``1000 * (1 - t)``, so one step is a single UNet call at timestep 1000;
* the UNet output is a velocity ``v``; Euler: ``x = x + dt * v`` with ``dt = 1 / N``
  (no Stable Diffusion scheduler: an epsilon scheduler gives wrong images);
* classifier-free guidance only when ``guidance_scale > 1``: ``v = v_u + g * (v_c - v_u)``;
* decode with ``vae.decode(latents / vae.config.scaling_factor)``.

Every image draws its starting noise from its own seed with its own CPU generator, so an
image does not depend on which other prompts share its batch (up to the kernels'
arithmetic; see tests/test_engine.py for what is measured).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image

from instaflow.loading import Components, load_components, model_id_of, weights_fingerprint

OutputType = Literal["pil", "np", "latent"]
TORCH_SEED_LIMIT = 2**64  # torch.Generator.manual_seed accepts [0, 2**64); items use core.params.MAX_SEED


@dataclass
class InstaFlowOutput:
    """`images`: PIL images, an (N, H, W, 3) float array in [0, 1], or latents (output_type)."""

    images: list[Image.Image] | np.ndarray | torch.Tensor
    nsfw_flags: list[bool]


AHEAD_PASSES = 2  # passes whose prompts encode_ahead keeps encoded at most


class InstaFlowPipeline:
    """Text-to-image with a rectified-flow UNet (InstaFlow-0.9B, 2-rectified flow, the tiny model)."""

    def __init__(self, components: Components):
        self.components = components
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.safety_checker = components.safety_checker
        self.feature_extractor = components.feature_extractor
        self.device = components.device
        self.dtype = components.dtype
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self._ahead: dict[tuple[str, ...], torch.Tensor] = {}  # prompts encoded ahead (encode_ahead)
        self._ahead_lock = threading.Lock()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> "InstaFlowPipeline":
        """Load a local checkpoint folder; raises `ModelNotFoundError` for anything else."""
        return cls(load_components(path, device=device, dtype=dtype))

    # -- identity, for provenance -------------------------------------------------------

    @property
    def model_id(self) -> str:
        return model_id_of(self.components.path, self.components.model_index)

    @cached_property
    def weights_sha256(self) -> str:
        """Once per pipeline: the worker records it with every image, and each look-up of the
        fingerprint cache resolves the folder on disk again (about 1 ms; docs/performance.md)."""
        return weights_fingerprint(self.components.path)

    @property
    def native_size(self) -> tuple[int, int]:
        """(height, width) the model was trained at: unet sample_size times the VAE factor."""
        sample_size = self.unet.config.sample_size
        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    # -- the generation ----------------------------------------------------------------

    @torch.inference_mode()
    def __call__(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        negative_prompt: str | Sequence[str] | None = None,
        output_type: OutputType = "pil",
        fixed_batch_size: int | None = None,
    ) -> InstaFlowOutput:
        """Generate one image per (prompt, seed) pair, all in one batched forward pass per step.

        Kernels may sum in another order for another batch size, which can move a pixel by
        one level. With `fixed_batch_size` the batch is padded (with copies of its last
        entry, dropped afterwards) to that size, so an image comes out bit-identical whatever
        else shares its chunk, as long as the fixed size stays the same.
        """
        # 0. Defaults, checks, padding
        native_height, native_width = self.native_size
        height = native_height if height is None else height
        width = native_width if width is None else width
        self.check_inputs(prompts, seeds, height, width, num_inference_steps, output_type)
        do_guidance = guidance_scale > 1.0
        count = len(prompts)
        negative_prompts = self.check_negative_prompt(negative_prompt, count, do_guidance)
        prompts, seeds, negative_prompts = pad_batch(fixed_batch_size, prompts, seeds, negative_prompts)

        # 1. Text embeddings (unconditional ones only for guidance)
        prompt_embeds = self.encode_prompts(prompts)
        uncond_embeds = self.encode_prompts(negative_prompts) if do_guidance else None

        # 2. z ~ N(0, I), one generator per image
        latents = self.prepare_noise(seeds, height, width)

        # 3. Euler integration of the velocity field from t = 0 (noise) to t = 1 (data)
        latents = self.integrate(latents, prompt_embeds, uncond_embeds, guidance_scale, num_inference_steps)

        if output_type == "latent":
            return InstaFlowOutput(images=latents[:count], nsfw_flags=[False] * count)

        # 4. Decode, safety check, convert (padding dropped)
        images = self.decode(latents)
        images, nsfw_flags = self.run_safety_checker(images)
        return InstaFlowOutput(images=self.to_output(images[:count], output_type), nsfw_flags=nsfw_flags[:count])

    # -- building blocks (the refiner reuses them) ------------------------------------

    def check_inputs(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int],
        height: int,
        width: int,
        num_inference_steps: int,
        output_type: str,
    ) -> None:
        if isinstance(prompts, str) or not prompts:
            raise ValueError("prompts must be a non-empty list of strings")
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds: give one seed per prompt")
        bad_seeds = [seed for seed in seeds if not isinstance(seed, (int, np.integer)) or not 0 <= seed < TORCH_SEED_LIMIT]
        if bad_seeds:
            raise ValueError(f"seeds must be integers in [0, 2**64): got {bad_seeds[:3]}")
        self.check_size(height, width)
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")

    def check_size(self, height: int, width: int) -> None:
        factor = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % factor:
                raise ValueError(f"{name} must be a positive multiple of {factor} (the VAE scale factor), got {value}")

    @staticmethod
    def check_negative_prompt(
        negative_prompt: str | Sequence[str] | None, batch_size: int, do_guidance: bool
    ) -> list[str]:
        """The unconditional prompts for guidance: the negative prompt, or the empty prompt."""
        if negative_prompt in ("", None):
            negative_prompt = None
        elif not do_guidance:
            raise ValueError(
                "negative_prompt needs classifier-free guidance: set guidance_scale > 1 "
                "(InstaFlow's one-step model runs without guidance and takes no negative prompt)"
            )
        if negative_prompt is None:
            return [""] * batch_size
        if isinstance(negative_prompt, str):
            return [negative_prompt] * batch_size
        if len(negative_prompt) != batch_size:
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {batch_size} prompts")
        return list(negative_prompt)

    def encode_ahead(self, prompts: Sequence[str], fixed_batch_size: int | None = None) -> None:
        """Encode a coming pass's prompts now, on the caller's thread (the worker runs it beside the
        pass before, worker/chunk.py); that pass's ``encode_prompts`` then takes them. The same padded
        list through the same text encoder: the same embeddings, so the same images."""
        padded = tuple(pad_batch(fixed_batch_size, prompts)[0])
        with torch.inference_mode():
            embeds = self._encode_text(padded)
        with self._ahead_lock:
            while len(self._ahead) >= AHEAD_PASSES:  # a pass that never came (retried item by item, cancelled)
                self._ahead.pop(next(iter(self._ahead)))
            self._ahead[padded] = embeds

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP last hidden states, padded to the tokenizer's max length as Stable Diffusion does."""
        with self._ahead_lock:
            embeds = self._ahead.pop(tuple(prompts), None)
        return embeds if embeds is not None else self._encode_text(prompts)

    def _encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        token_ids = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.text_encoder(token_ids.to(self.device)).last_hidden_state.to(self.dtype)

    def prepare_noise(self, seeds: Sequence[int], height: int, width: int) -> torch.Tensor:
        """z ~ N(0, I) per image, drawn in fp32 on the CPU so the noise is the same on every device."""
        shape = (self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed))) for seed in seeds]
        return torch.stack(noise).to(self.device, self.dtype)

    def integrate(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        uncond_embeds: torch.Tensor | None,
        guidance_scale: float,
        num_steps: int,
        t_start: float = 0.0,
    ) -> torch.Tensor:
        """Euler steps of dx/dt = v(x, t) from flow time `t_start` to 1.

        With t_start = 0 the timesteps are InstaFlow's ``1000 * (1 - i / N)``; the refiner
        starts later (t_start = 1 - strength) from a re-noised image.
        """
        dt = (1.0 - t_start) / num_steps
        embeds = prompt_embeds if uncond_embeds is None else torch.cat([uncond_embeds, prompt_embeds])
        for i in range(num_steps):
            t = t_start + (1.0 - t_start) * i / num_steps
            velocity = self.velocity(latents, embeds, 1000.0 * (1.0 - t), uncond_embeds is not None, guidance_scale)
            latents = latents + dt * velocity
        return latents

    def velocity(
        self, latents: torch.Tensor, embeds: torch.Tensor, timestep: float, do_guidance: bool, guidance_scale: float
    ) -> torch.Tensor:
        model_input = torch.cat([latents] * 2) if do_guidance else latents
        timesteps = torch.full((model_input.shape[0],), timestep, device=self.device)
        velocity = self.unet(model_input, timesteps, encoder_hidden_states=embeds).sample
        if do_guidance:
            velocity_uncond, velocity_cond = velocity.chunk(2)
            velocity = velocity_uncond + guidance_scale * (velocity_cond - velocity_uncond)
        return velocity

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> (N, H, W, 3) float32 images in [0, 1]."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        images = (images / 2 + 0.5).clamp(0, 1)
        return images.float().permute(0, 2, 3, 1).cpu().numpy()

    def run_safety_checker(self, images: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """The checkpoint's own safety checker, when it has one; flagged images come back black."""
        if self.safety_checker is None:
            return images, [False] * len(images)
        clip_input = self.feature_extractor(to_pil(images), return_tensors="pt").pixel_values
        images, flags = self.safety_checker(images=images.copy(), clip_input=clip_input.to(self.device, self.dtype))
        return np.asarray(images, dtype=np.float32), [bool(flag) for flag in flags]

    @staticmethod
    def to_output(images: np.ndarray, output_type: OutputType) -> list[Image.Image] | np.ndarray:
        return to_pil(images) if output_type == "pil" else images


def pad_batch(size: int | None, *columns: Sequence) -> list[list]:
    """Repeat each column's last entry until it has `size` entries (None: leave as is)."""
    columns_as_lists = [list(column) for column in columns]
    if size is None:
        return columns_as_lists
    if len(columns_as_lists[0]) > size:
        raise ValueError(f"{len(columns_as_lists[0])} prompts do not fit fixed_batch_size={size}: chunk them first")
    return [column + column[-1:] * (size - len(column)) for column in columns_as_lists]


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """(N, H, W, 3) floats in [0, 1] -> 8-bit RGB images, rounding as diffusers does."""
    pixels = (images * 255).round().astype(np.uint8)
    return [Image.fromarray(image) for image in pixels]
