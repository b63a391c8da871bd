"""Engine throughput on an accelerator: ``python -m bench.gpu [--arch sd15|tiny|PATH] [--batch 1,8,32]``.

InstaFlow's paper reports 0.09 s per 512×512 image on an A100 (0.01 s text encoder, 0.04 s VAE
decode). No weights can be downloaded here, so ``--arch sd15`` builds random weights with
InstaFlow-0.9B's shapes (Stable Diffusion 1.5: UNet 320-640-1280-1280, CLIP ViT-L/14 text
encoder, the SD VAE) in memory: the arithmetic, and so the timing, is that of the real model.
``--arch tiny`` is the shipped tiny model; a folder path loads that checkpoint.

Times each stage of one generation (text encoder, UNet Euler steps, VAE decode) with device
synchronisation, per batch size, and prints ``RESULT`` lines; it never passes or fails on time.
On a machine without CUDA it runs on the CPU (use ``--arch tiny`` there).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from instaflow.loading import Components, default_device, default_dtype
from instaflow.pipeline import InstaFlowPipeline

PROMPT = "studio photo of a red ceramic mug on a light blue backdrop, centered"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or default_dtype(device)
    pipe = build_pipeline(args.arch, device, dtype)
    if args.compile:
        pipe.unet = torch.compile(pipe.unet, mode="max-autotune")
    height = width = args.size or pipe.native_size[0]
    print(f"arch={args.arch} device={device} dtype={dtype} size={height} steps={args.steps} "
          f"unet_params={sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M")
    for batch in args.batch:
        bench_batch(pipe, batch, height, width, args.steps, args.repeats)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15", help="sd15 (InstaFlow-0.9B shapes), tiny, or a checkpoint folder")
    parser.add_argument("--batch", type=lambda text: [int(n) for n in text.split(",")], default=[1, 8, 32])
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's, 512 for sd15)")
    parser.add_argument("--steps", type=int, default=1, help="Euler steps (1 = InstaFlow)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default: fp16 on CUDA")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet first")
    return parser.parse_args(argv)


def build_pipeline(arch: str, device: torch.device, dtype: torch.dtype) -> InstaFlowPipeline:
    if arch == "sd15":
        return InstaFlowPipeline(sd15_shaped_components(device, dtype))
    from core.settings import TINY_MODEL_DIR

    return InstaFlowPipeline.from_pretrained(TINY_MODEL_DIR if arch == "tiny" else Path(arch), device, dtype)


def sd15_shaped_components(device: torch.device, dtype: torch.dtype) -> Components:
    """Random weights in Stable Diffusion 1.5's (= InstaFlow-0.9B's) architecture."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from instaflow.testing import write_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), latent_channels=4, layers_per_block=2, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                num_attention_heads=12, max_position_embeddings=77))
    tokenizer_dir = Path(tempfile.mkdtemp(prefix="bench-tokenizer-"))
    write_tokenizer(tokenizer_dir)
    parts = [model.to(device, dtype).eval().requires_grad_(False) for model in (unet, vae, text_encoder)]
    return Components(path=tokenizer_dir, model_index={"_name_or_path": "random-sd15-shaped"}, unet=parts[0],
                      vae=parts[1], text_encoder=parts[2], tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
                      safety_checker=None, feature_extractor=None, device=device, dtype=dtype)


@torch.inference_mode()
def bench_batch(pipe: InstaFlowPipeline, batch: int, height: int, width: int, steps: int, repeats: int) -> None:
    prompts, seeds = [PROMPT] * batch, list(range(batch))
    stages: dict[str, list[float]] = {"text": [], "unet": [], "vae": [], "total": []}
    for attempt in range(repeats + 1):  # the first round warms up kernels and allocators
        began = time.perf_counter()
        embeds = timed(pipe, stages["text"], lambda: pipe.encode_prompts(prompts))
        latents = pipe.prepare_noise(seeds, height, width)
        latents = timed(pipe, stages["unet"], lambda: pipe.integrate(latents, embeds, None, 0.0, steps))
        timed(pipe, stages["vae"], lambda: pipe.decode(latents))
        stages["total"].append(time.perf_counter() - began)
        if attempt == 0:
            for values in stages.values():
                values.clear()
    median = {name: statistics.median(values) for name, values in stages.items()}
    peak = torch.cuda.max_memory_allocated() / 2**30 if pipe.device.type == "cuda" else 0.0
    print(f"RESULT batch={batch} s_per_image={median['total'] / batch:.4f} images_per_s={batch / median['total']:.1f} "
          f"text_s={median['text']:.4f} unet_s={median['unet']:.4f} vae_s={median['vae']:.4f} "
          f"peak_gib={peak:.2f}", flush=True)


def timed(pipe: InstaFlowPipeline, into: list[float], work: Callable[[], torch.Tensor]) -> torch.Tensor:
    synchronize(pipe.device)
    began = time.perf_counter()
    result = work()
    synchronize(pipe.device)
    into.append(time.perf_counter() - began)
    return result


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    raise SystemExit(main())
