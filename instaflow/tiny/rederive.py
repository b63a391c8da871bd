"""Rebuild the teacher (1-RF) and the direct-distillation ablation for the shipped tiny models.

The full recipe (`instaflow.tiny.recipe`) trains the VAE and text encoder with the teacher, then
freezes them; the run that made the shipped `tiny-instaflow` and `tiny-2rf` did not keep its
teacher. This rebuilds one that shares the shipped VAE, text encoder and tokenizer (so every
shipped model reads the same latents and prompts):

    data -> latents (shipped VAE) -> teacher: the 1-RF objective (independent noise/image
    couplings), UNet warm-started from the 2-RF's, text encoder frozen
         -> reflow_pairs (teacher ODE + CFG) -> direct (one step distilled from those pairs)

Warm-starting from the 2-RF is a shortcut, not a different model: the 2-RF began as the original
teacher and the 1-RF loss has one minimiser whatever the start (docs/tiny-model.md, "The teacher").
Resumable like the recipe (`done.json` per stage).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.settings import TINY_REFINER_DIR, WEIGHTS_DIR
from instaflow import compact
from instaflow.tiny import flow, recipe
from instaflow.tiny.models import load_folder
from instaflow.tiny.text import load_tokenizer, tokenize
from instaflow.training import run_stages


@dataclass(frozen=True)
class Rederive(recipe.Config):
    teacher_iters: int = 1500
    teacher_lr: float = 3e-4
    teacher_budget_min: float = 14.0


QUICK = Rederive(**{**asdict(recipe.QUICK), "teacher_budget_min": 1.0})


def stage_shipped_parts(run: recipe.Run, seed: int, source: Path = TINY_REFINER_DIR) -> dict:
    """The shipped VAE (with its scaling factor) and tokenizer, where the recipe's stages expect them."""
    shutil.copytree(source / "tokenizer", run.tokenizer_dir, dirs_exist_ok=True)
    shutil.copytree(source / "vae", run.stage_dir("latents") / "vae", dirs_exist_ok=True)
    return {"source": str(source)}


def stage_latents(run: recipe.Run, seed: int) -> dict:
    from diffusers import AutoencoderKL

    pixels, _ = recipe._load_data(run)
    vae = AutoencoderKL.from_pretrained(run.stages / "latents" / "vae").eval()
    scaling = vae.config.scaling_factor
    with torch.no_grad():
        latents = torch.cat([vae.encode(recipe._pixels_tensor(pixels[i : i + 256])).latent_dist.mean
                             for i in range(0, len(pixels), 256)])
    torch.save((latents * scaling).contiguous(), run.stage_dir("latents") / "latents.pt")
    return {"scaling_factor": scaling, "latent_std": float((latents * scaling).std())}


def stage_teacher(run: recipe.Run, seed: int, source: Path = TINY_REFINER_DIR) -> dict:
    """The 1-RF loss on (noise, training latent) pairs drawn independently; text encoder frozen."""
    c = run.config
    _, captions = recipe._load_data(run)
    latents = torch.load(run.stages / "latents" / "latents.pt")
    unet, vae, text_encoder, _ = load_folder(source)
    tokenizer = load_tokenizer(run.tokenizer_dir)
    with torch.no_grad():
        embeds = torch.cat([text_encoder(tokenize(tokenizer, captions[i : i + 512])).last_hidden_state
                            for i in range(0, len(captions), 512)])
        uncond = text_encoder(tokenize(tokenizer, [""])).last_hidden_state[0]
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    unet.train()

    def loss_fn(step: int) -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, len(latents), c.teacher_batch))
        e = recipe.drop_prompts(embeds[idx], uncond, c.prompt_dropout, gen)
        z = torch.randn(latents[idx].shape, generator=gen)
        return flow.rf_loss(unet, latents[idx], z, e, torch.rand(len(idx), generator=gen))

    losses = recipe._optimise(run, "teacher", list(unet.parameters()), c.teacher_iters, c.teacher_lr, loss_fn,
                              [(unet, flow.EMA(unet, c.ema_decay))], c.teacher_budget_min)
    recipe._save(run, "teacher", unet.eval(), vae, text_encoder.eval())
    return {"loss": recipe._loss_summary(losses), "warm_start": str(source)}


STAGES: list[tuple[str, Callable[[recipe.Run, int], dict]]] = [
    ("shipped_parts", stage_shipped_parts), ("data", recipe.stage_data), ("latents", stage_latents),
    ("teacher", stage_teacher), ("reflow_pairs", recipe.stage_reflow_pairs), ("direct", recipe.stage_direct),
]


def rederive(out: Path | str = "var/tiny-rederive", quick: bool = False, log: Callable[[str], None] = print,
             overrides: dict[str, str] | None = None) -> dict:
    config: Rederive = QUICK if quick else Rederive()
    if overrides:
        config = replace(config, **{k: type(getattr(config, k))(v) for k, v in overrides.items()})
    torch.set_num_threads(config.threads)
    run = recipe.Run(Path(out), config, log)
    (run.out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    # Seeds 50 + k: apart from the recipe's stage seeds (0 + k), which drew the shipped models' data.
    summary = run_stages(run, STAGES, config.seed, offset=50)
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def publish(run_out: Path | str, weights_dir: Path = WEIGHTS_DIR) -> list[Path]:
    """The teacher and the ablation into the weights folder as compact checkpoints (instaflow/compact.py)
    sharing the default model's VAE, text encoder and tokenizer; the 2-RF made compact the same way."""
    run_out, default = Path(run_out), weights_dir / "tiny-instaflow"
    published = []
    for source, name in ((run_out / "teacher", "tiny-teacher"), (run_out / "direct-distill", "tiny-direct"),
                         (weights_dir / "tiny-2rf", "tiny-2rf")):
        if compact.is_compact(source / "unet"):
            continue
        _check_frozen_parts(source, default)
        staged = _with_parts_of(source, default, run_out / f"{name}-staged")
        published.append(compact.write_compact(staged, weights_dir / name, default, name=name))
    return published


def _check_frozen_parts(source: Path, default: Path) -> None:
    """The frozen VAE and text encoder were saved in fp32 from the shipped fp16 ones: equal values."""
    _, vae, text_encoder, _ = load_folder(source)
    _, vae0, text_encoder0, _ = load_folder(default)
    for a, b in ((vae, vae0), (text_encoder, text_encoder0)):
        for (name, x), (_, y) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
            if not torch.equal(x.half().float(), y):
                raise ValueError(f"{source}: {name} is not the shipped model's: it cannot be shared")


def _with_parts_of(source: Path, default: Path, staged: Path) -> Path:
    """A copy of `source` whose shared parts are the default model's files, byte for byte."""
    if staged.exists():
        shutil.rmtree(staged)
    shutil.copytree(source, staged, ignore=shutil.ignore_patterns(*compact.SHARED_PARTS))
    for part in compact.SHARED_PARTS:
        shutil.copytree(default / part, staged / part)
    return staged


if __name__ == "__main__":
    import sys

    out = sys.argv[1] if len(sys.argv) > 1 else "var/tiny-rederive"
    rederive(out, quick="--quick" in sys.argv)
    if "--publish" in sys.argv:
        print("published", *publish(out))
