"""The attribute judge: a small CNN that reads kind, colour, backdrop, placement and size.

Trained only on renders (never on generated images). It grades the tiny model's outputs
(attribute accuracy) and gives the feature space for the Fréchet distance; the QC stage
uses it for prompt-image alignment.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from instaflow.tiny.prompts import ATTRIBUTES, CLASSES, all_combos
from instaflow.tiny.render import make_dataset

from instaflow.tiny import DEFAULT_JUDGE_DIR  # noqa: E402
FEATURE_DIM = 64


class JudgeNet(nn.Module):
    def __init__(self, heads: dict[str, int]):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1), nn.BatchNorm2d(cout), nn.SiLU())

        # Flattening a 4x4 map (no global pooling) keeps where the product stands.
        self.body = nn.Sequential(block(3, 32), block(32, 48), block(48, 64), block(64, 64), nn.Flatten(),
                                  nn.Linear(64 * 16, FEATURE_DIM), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(FEATURE_DIM, n) for name, n in heads.items()})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = self.body(x)
        return features, {name: head(features) for name, head in self.heads.items()}


def _to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _labels(attrs_list) -> dict[str, torch.Tensor]:
    return {a: torch.tensor([CLASSES[a].index(getattr(x, a)) for x in attrs_list]) for a in ATTRIBUTES}


def _augment(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blur, noise and a slight colour cast, so generated (softer) images are read like renders."""
    out = pixels.copy()
    for i in np.flatnonzero(rng.random(len(out)) < 0.5):
        out[i] = np.asarray(Image.fromarray(out[i]).filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))))
    noisy = out.astype(np.float32) + rng.normal(0, rng.uniform(0, 6), size=(len(out), 1, 1, 1)) * \
        rng.standard_normal(out.shape).astype(np.float32)
    noisy += rng.uniform(-8, 8, size=(len(out), 1, 1, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


def train_judge(out_dir: Path, n_train: int, n_test: int, iters: int, batch: int, seed: int,
                log=print) -> dict:
    """Train on renders of every combination; report accuracy on fresh held-out renders."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    combos = tuple(all_combos())
    pixels, _, attrs = make_dataset(n_train, seed + 1, combos)
    test_pixels, _, test_attrs = make_dataset(n_test, seed + 2, combos)
    labels = _labels(attrs)
    net = JudgeNet({a: len(CLASSES[a]) for a in ATTRIBUTES})
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=iters, pct_start=0.1)
    losses, start = [], time.time()
    net.train()
    for step in range(iters):
        idx = rng.integers(0, n_train, batch)
        x = _to_tensor(_augment(pixels[idx], rng))
        _, logits = net(x)
        loss = sum(nn.functional.cross_entropy(logits[a], labels[a][idx]) for a in ATTRIBUTES)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 100 == 0 or step == iters - 1:
            log(f"judge step {step} loss {loss:.4f} ({time.time() - start:.0f}s)")
    net.eval()
    judge = AttributeJudge(net)
    accuracy = judge.accuracy_on(test_pixels, test_attrs)
    judge.save(out_dir)
    report = {"test_accuracy": accuracy, "losses": losses, "n_train": n_train, "n_test": n_test}
    (out_dir / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "losses"}, indent=2))
    log(f"judge held-out render accuracy {accuracy}")
    return report


class AttributeJudge:
    """Reads the attributes of 64x64 product images. `AttributeJudge.load()` finds the committed one."""

    def __init__(self, net: JudgeNet):
        self.net = net.eval()

    @classmethod
    def load(cls, path: str | Path | None = None) -> "AttributeJudge":
        folder = Path(path) if path is not None else DEFAULT_JUDGE_DIR
        classes = json.loads((folder / "classes.json").read_text())
        net = JudgeNet({a: len(classes[a]) for a in ATTRIBUTES})
        from safetensors.torch import load_file

        net.load_state_dict(load_file(str(folder / "judge.safetensors")))
        return cls(net)

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file

        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(folder / "judge.safetensors"))
        (folder / "classes.json").write_text(json.dumps({a: list(CLASSES[a]) for a in ATTRIBUTES}, indent=2))

    @torch.no_grad()
    def _run(self, pixels: np.ndarray, batch: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        feats, probs = [], {a: [] for a in ATTRIBUTES}
        for i in range(0, len(pixels), batch):
            f, logits = self.net(_to_tensor(pixels[i : i + batch]))
            feats.append(f.numpy())
            for a in ATTRIBUTES:
                probs[a].append(logits[a].softmax(-1).numpy())
        return np.concatenate(feats), {a: np.concatenate(p) for a, p in probs.items()}

    @staticmethod
    def _pixels(images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        if isinstance(images, np.ndarray):
            return images
        return np.stack([np.asarray(im.convert("RGB").resize((64, 64), Image.BILINEAR)) for im in images])

    def predict(self, images: Sequence[Image.Image] | np.ndarray) -> list[dict[str, dict]]:
        """Per image, per attribute: {"label": str, "prob": float} (the most likely class)."""
        _, probs = self._run(self._pixels(images))
        out = []
        for i in range(len(probs["kind"])):
            out.append({a: {"label": CLASSES[a][int(probs[a][i].argmax())], "prob": float(probs[a][i].max())}
                        for a in ATTRIBUTES})
        return out

    def features(self, images: Sequence[Image.Image] | np.ndarray) -> np.ndarray:
        """(N, 64) penultimate features: the space of the Fréchet distance."""
        return self._run(self._pixels(images))[0]

    def accuracy_on(self, pixels: np.ndarray, attrs_list) -> dict[str, float]:
        predictions = self.predict(pixels)
        acc = {a: float(np.mean([p[a]["label"] == getattr(x, a) for p, x in zip(predictions, attrs_list)]))
               for a in ATTRIBUTES}
        acc["all"] = float(np.mean([all(p[a]["label"] == getattr(x, a) for a in ATTRIBUTES)
                                    for p, x in zip(predictions, attrs_list)]))
        return acc
