"""Engine throughput on an accelerator: ``python -m bench.gpu [--arch sd15|tiny|PATH] [--batch 1,8,32]``.

InstaFlow's paper reports 0.09 s per 512×512 image on an A100 (0.01 s text encoder, 0.04 s VAE
decode). No weights can be downloaded here, so ``--arch sd15`` builds random weights with
InstaFlow-0.9B's shapes (Stable Diffusion 1.5: UNet 320-640-1280-1280, CLIP ViT-L/14 text
encoder, the SD VAE) in memory: the arithmetic, and so the timing, is that of the real model.
``--arch tiny`` is the shipped tiny model; a folder path loads that checkpoint.

Times each stage of one generation (text encoder, UNet Euler steps, VAE decode) with device
synchronisation, per batch size and per ``--variants`` (eager, channels_last, compile =
``torch.compile`` of the UNet and VAE decoder, cudagraphs = ``torch.compile(mode="reduce-overhead")``,
which captures CUDA graphs), and prints ``RESULT`` lines with the achieved TFLOP/s against the
card's dense fp16 peak; it never passes or fails on time. ``--save-checkpoint DIR`` writes the
random SD-1.5-shaped weights as a checkpoint the worker can load (``bench/gpu.sh`` runs the
worker path on CUDA with it). On a machine without CUDA it runs on the CPU (use ``--arch tiny``
there; cudagraphs is skipped).
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
# InstaFlow-0.9B, one step at 512²: text encoder + UNet + VAE decode (issue 11; the UNet alone is
# about 0.8 TFLOP, the VAE decoder about 2.5). Other sizes scale with the pixel count.
SD15_FLOP_PER_IMAGE_512 = 3.33e12
# Dense fp16/bf16 tensor-core peaks (NVIDIA data sheets), by a substring of the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 756.0,
               "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "RTX 4090": 165.0}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(args.dtype) or default_dtype(device)
    if args.save_checkpoint:
        print(f"RESULT checkpoint={save_sd15_checkpoint(args.save_checkpoint, dtype)}")
        return 0
    pipe = build_pipeline(args.arch, device, dtype)
    height = width = args.size or pipe.native_size[0]
    flop = SD15_FLOP_PER_IMAGE_512 * height * width / 512**2 if args.arch == "sd15" and args.steps == 1 else None
    peak = peak_tflops(device)
    print(f"arch={args.arch} device={device} card={card_name(device)} dtype={dtype} size={height} steps={args.steps} "
          f"unet_params={sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M peak_tflops={peak or '-'}",
          flush=True)
    if args.compile:
        args.variants = ["compile"]
    for variant in args.variants:
        if variant == "cudagraphs" and device.type != "cuda":
            print(f"RESULT variant={variant} skipped=no_cuda", flush=True)
            continue
        prepared = apply_variant(pipe, variant)
        rates = [bench_batch(prepared, batch, height, width, args.steps, args.repeats, variant=variant, flop=flop,
                             peak=peak) for batch in args.batch]
        best = max(rates, key=lambda pair: pair[1])
        print(f"RESULT variant={variant} best_batch={best[0]} best_images_per_s={best[1]:.1f}", flush=True)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="sd15", help="sd15 (InstaFlow-0.9B shapes), tiny, or a checkpoint folder")
    parser.add_argument("--batch", type=lambda text: [int(n) for n in text.split(",")], default=[1, 8, 32])
    parser.add_argument("--size", type=int, default=None, help="image side (default: the model's, 512 for sd15)")
    parser.add_argument("--steps", type=int, default=1, help="Euler steps (1 = InstaFlow; 25 = the SD baseline)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default=None, help="default: fp16 on CUDA")
    parser.add_argument("--variants", type=lambda text: text.split(","), default=["eager"],
                        help="comma-separated: eager, channels_last, compile, cudagraphs")
    parser.add_argument("--compile", action="store_true", help="same as --variants compile")
    parser.add_argument("--save-checkpoint", type=Path, default=None,
                        help="write random SD-1.5-shaped weights as a checkpoint folder here, and stop")
    return parser.parse_args(argv)


def apply_variant(pipe: InstaFlowPipeline, variant: str) -> InstaFlowPipeline:
    """A shallow copy of the pipeline with the UNet (and VAE decoder) prepared for ``variant``."""
    import copy

    prepared = copy.copy(pipe)
    if variant == "eager":
        return prepared
    if variant == "channels_last":
        prepared.unet = pipe.unet.to(memory_format=torch.channels_last)
        prepared.vae = pipe.vae.to(memory_format=torch.channels_last)
        return prepared
    mode = {"compile": "max-autotune-no-cudagraphs", "cudagraphs": "reduce-overhead"}.get(variant)
    if mode is None:
        raise SystemExit(f"unknown variant {variant!r}")
    prepared.unet = torch.compile(pipe.unet, mode=mode, dynamic=False)
    return prepared


def card_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


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
def bench_batch(pipe: InstaFlowPipeline, batch: int, height: int, width: int, steps: int, repeats: int, *,
                variant: str = "eager", flop: float | None = None, peak: float | None = None) -> tuple[int, float]:
    prompts, seeds = [PROMPT] * batch, list(range(batch))
    stages: dict[str, list[float]] = {"text": [], "unet": [], "vae": [], "total": []}
    warm_ups = 3 if variant in ("compile", "cudagraphs") else 1  # compilation, graph capture, allocators
    for attempt in range(repeats + warm_ups):
        began = time.perf_counter()
        embeds = timed(pipe, stages["text"], lambda: pipe.encode_prompts(prompts))
        latents = pipe.prepare_noise(seeds, height, width)
        latents = timed(pipe, stages["unet"], lambda: pipe.integrate(latents, embeds, None, 0.0, steps))
        timed(pipe, stages["vae"], lambda: pipe.decode(latents))
        stages["total"].append(time.perf_counter() - began)
        if attempt < warm_ups:
            for values in stages.values():
                values.clear()
    median = {name: statistics.median(values) for name, values in stages.items()}
    memory = torch.cuda.max_memory_allocated() / 2**30 if pipe.device.type == "cuda" else 0.0
    rate = batch / median["total"]
    achieved = f" tflops={flop * rate / 1e12:.1f}" if flop else ""
    share = f" of_peak={flop * rate / 1e12 / peak:.3f}" if flop and peak else ""
    print(f"RESULT variant={variant} batch={batch} steps={steps} s_per_image={median['total'] / batch:.4f} "
          f"images_per_s={rate:.1f} text_s={median['text']:.4f} unet_s={median['unet']:.4f} "
          f"vae_s={median['vae']:.4f} peak_gib={memory:.2f}{achieved}{share}", flush=True)
    return batch, rate


def save_sd15_checkpoint(folder: Path, dtype: torch.dtype) -> Path:
    """Random SD-1.5-shaped weights as a checkpoint folder the engine loads (InstaFlowPipeline.from_pretrained)."""
    import json

    import diffusers
    from diffusers import PNDMScheduler

    parts = sd15_shaped_components(torch.device("cpu"), dtype)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("unet", "vae", "text_encoder"):
        getattr(parts, name).save_pretrained(folder / name)
    parts.tokenizer.save_pretrained(folder / "tokenizer")
    PNDMScheduler(skip_prk_steps=True).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "RectifiedFlowPipeline", "_diffusers_version": diffusers.__version__,
        "_name_or_path": "random-sd15-shaped", "requires_safety_checker": False,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
    }, indent=2))
    return folder


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
