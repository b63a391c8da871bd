"""What every training recipe here shares: a run folder of resumable stages and a budgeted optimiser.

Used by the tiny model's recipe (instaflow/tiny/recipe.py) and by reflow on a user's own prompts
(instaflow/reflow.py). A stage writes its outputs under ``OUT/stages/NAME`` and then ``done.json``;
running the same command again skips the stages that have one. A stage folder without its marker
was interrupted: that stage starts again from the beginning.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from instaflow.tiny.flow import EMA

Log = Callable[[str], None]
Stage = Callable[["StageRun", int], dict]


class StageRun:
    """A run folder: stage outputs, done markers and the log."""

    def __init__(self, out: Path, log: Log):
        self.out, self.log = out, log
        self.stages = out / "stages"
        self.stages.mkdir(parents=True, exist_ok=True)

    def stage_dir(self, name: str) -> Path:
        path = self.stages / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def done(self, name: str) -> dict | None:
        marker = self.stages / name / "done.json"
        return json.loads(marker.read_text()) if marker.exists() else None

    def mark_done(self, name: str, info: dict) -> None:
        (self.stage_dir(name) / "done.json").write_text(json.dumps(info, indent=2))


def run_stages(run: StageRun, stages: list[tuple[str, Stage]], seed: int, offset: int = 0) -> dict:
    """Run (or skip, when done) each stage in order; stage k is seeded with seed * 100 + offset + k.

    Returns {stage: info}, each info with the stage's `seconds`, as its done.json records it.
    """
    summary = {}
    for k, (name, fn) in enumerate(stages):
        info = run.done(name)
        if info is None:
            if (run.stages / name).is_dir():
                run.log(f"== stage {name} was interrupted in an earlier run: starting it again")
            run.stage_dir(name)
            run.log(f"== stage {name}")
            torch.manual_seed(seed * 100 + offset + k)
            start = time.time()
            info = fn(run, seed * 100 + offset + k)
            info["seconds"] = round(time.time() - start, 1)
            run.mark_done(name, info)
            run.log(f"== stage {name} done in {info['seconds']}s: {json.dumps(info)[:300]}")
        else:
            run.log(f"stage {name}: done in an earlier run ({info.get('seconds')}s), skipped")
        summary[name] = info
    return summary


def lr_factor(progress: float, warmup: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak; `progress` runs from 0 to 1."""
    if progress < warmup:
        return (progress + 1e-3) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))


def loss_summary(losses: list[float]) -> dict:
    """Mean of the first and of the last tenth of the losses, and their count."""
    k = max(1, len(losses) // 10)
    return {"first": float(np.mean(losses[:k])), "last": float(np.mean(losses[-k:])), "n": len(losses)}


def optimise(name: str, params, iters: int, lr: float, loss_fn: Callable[[int], torch.Tensor],
             ema_pairs: list[tuple[torch.nn.Module, EMA]], budget_min: float = 0.0, log: Log = print,
             progress: bool = False) -> list[float]:
    """AdamW for `iters` steps, or until `budget_min` minutes have passed (0: no limit); at least one step.

    The machine may be shared, so a stage may get less CPU than planned: the schedule follows
    whichever of steps and time runs out first, and the stage reports the steps it made. With
    `progress` a tqdm bar (on stderr) replaces the log line every 50 steps. The EMA weights are
    copied into the modules at the end.
    """
    from tqdm import tqdm

    params = list(params)
    opt = torch.optim.AdamW(params, lr, weight_decay=0.0)
    budget_s = budget_min * 60 if budget_min > 0 else float("inf")
    losses, start = [], time.time()
    bar = tqdm(total=iters, desc=name, disable=not progress, file=sys.stderr, mininterval=1.0, leave=True)
    step = 0
    while step < iters and (step == 0 or time.time() - start < budget_s):
        progress_share = max(step / iters, (time.time() - start) / budget_s)
        for group in opt.param_groups:
            group["lr"] = lr * lr_factor(progress_share)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for module, ema in ema_pairs:
            ema.update(module)
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
        if step % 50 == 0 and not progress:
            log(f"{name} step {step}/{iters} loss {np.mean(losses[-50:]):.4f} lr {opt.param_groups[0]['lr']:.2e} "
                f"({time.time() - start:.0f}s)")
        step += 1
    bar.close()
    log(f"{name} stopped after {step}/{iters} steps, loss {np.mean(losses[-50:]):.4f} ({time.time() - start:.0f}s)")
    for module, ema in ema_pairs:
        ema.copy_to(module)
    return losses
