"""The figures behind the QC defaults (docs/qc.md): ``python -m qc.study [renders|duplicates|batch]``.

* ``renders``: metric distributions on tiny-model renders and on the same renders
  blurred, darkened, brightened: how the thresholds separate good from bad.
* ``duplicates``: Hamming distances of pairs that are duplicates (JPEG, noise)
  and pairs that are not (jitter, colour variants, random).
* ``alignment``: held-out renders prompted with their own caption and with the
  colour or the kind swapped: what the attribute judge lets through and catches.
* ``batch --model DIR --n 500``: generate held-out prompts with a tiny model,
  QC them as the worker would (32-image chunks, known hashes across chunks) and
  report verdicts, reasons, the cost of QC against generation, and a JSONL of
  outcomes for ``calibrate``.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from qc.checker import QualityChecker
from qc.cli import calibrate
from qc.phash import hamming, phash
from qc.settings import QcSettings

METRICS = (
    "sharpness.laplacian_ratio", "sharpness.laplacian_var", "contrast.rms_contrast", "blank.entropy_bits",
    "exposure.luma_mean", "black.luma_p99", "duplicate.nearest_distance", "attribute_alignment.score",
)


def _renders(count: int, seed: int) -> list:
    from instaflow.tiny.prompts import TRAIN_COMBOS, random_attributes
    from instaflow.tiny.render import render

    rng = np.random.default_rng(seed)
    return [render(random_attributes(rng, TRAIN_COMBOS), rng) for _ in range(count)]


def _scaled(image: Image.Image, factor: float) -> Image.Image:
    return Image.fromarray(np.clip(np.asarray(image, np.float32) * factor, 0, 255).astype(np.uint8))


def _report(label: str, outcomes: list) -> None:
    report = calibrate([o.to_dict() if hasattr(o, "to_dict") else o for o in outcomes])
    print(f"== {label}: {report['verdicts']} reasons {report['reasons']}")
    for name in METRICS:
        stats = report["metrics"].get(name)
        if stats:
            print(f"   {name:28s} " + " ".join(f"{k}={stats[k]:.4g}" for k in ("min", "p1", "p5", "p50", "p95", "max")))


def study_renders(count: int) -> None:
    checker = QualityChecker(QcSettings(alignment="none"))
    renders = _renders(count, seed=11)
    variants = {
        "renders": renders,
        "blur sigma=1 (64 px)": [r.filter(ImageFilter.GaussianBlur(1)) for r in renders],
        "blur sigma=2 (64 px)": [r.filter(ImageFilter.GaussianBlur(2)) for r in renders],
        "darkened x0.25": [_scaled(r, 0.25) for r in renders],
        "brightened x1.6": [_scaled(r, 1.6) for r in renders],
    }
    for label, images in variants.items():
        # one image per chunk: duplicates among random renders are the other study's business
        _report(label, [checker.check([image])[0] for image in images])


def _jpeg(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def study_duplicates(count: int) -> None:
    from instaflow.tiny.prompts import COLOURS, TRAIN_COMBOS, Attributes, random_attributes
    from instaflow.tiny.render import render

    rng = np.random.default_rng(1)
    colours = list(COLOURS)
    pairs: dict[str, list[tuple[int, int]]] = {k: [] for k in ("jpeg", "noise", "jitter", "colour", "random")}
    settings = QcSettings()
    for _ in range(count):
        attrs = random_attributes(rng, TRAIN_COMBOS)
        image = render(attrs, rng)
        other_colour = colours[(colours.index(attrs.colour) + 1 + rng.integers(len(colours) - 1)) % len(colours)]
        noisy = np.asarray(image, np.float32) + rng.normal(0, 6, (64, 64, 3))
        others = {
            "jpeg": _jpeg(image),
            "noise": Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
            "jitter": render(attrs, rng),
            "colour": render(Attributes(attrs.kind, other_colour, *attrs.combo[2:], attrs.placement, attrs.size), rng),
            "random": render(random_attributes(rng, TRAIN_COMBOS), rng),
        }
        value = phash(image)
        for label, other in others.items():
            pairs[label].append(hamming(value, phash(other)))
    print(f"== duplicate pairs ({count} each); flagged at luma<={settings.duplicate_max_distance}"
          f" and colour<={settings.duplicate_max_colour_distance}")
    for label, distances in pairs.items():
        d = np.array(distances)
        luma_only = (d[:, 0] <= settings.duplicate_max_distance).mean()
        both = ((d[:, 0] <= settings.duplicate_max_distance) & (d[:, 1] <= settings.duplicate_max_colour_distance)).mean()
        print(f"   {label:7s} luma p5/p50/p95={np.percentile(d[:, 0], [5, 50, 95]).tolist()}"
              f" colour p5/p50/p95={np.percentile(d[:, 1], [5, 50, 95]).tolist()}"
              f" flagged luma-only={luma_only:.1%} luma+colour={both:.1%}")


def study_alignment(count: int) -> None:
    """Held-out renders prompted with their own caption, and with one attribute swapped."""
    from instaflow.tiny.prompts import COLOURS, HELD_OUT_COMBOS, KINDS, Attributes, make_caption, random_attributes
    from instaflow.tiny.render import render

    rng = np.random.default_rng(5)
    checker = QualityChecker(QcSettings(alignment="judge"))
    print(f"   skipped: {checker.unavailable()}")
    cases: dict[str, list[tuple[Image.Image, str]]] = {"own caption": [], "soft render, own caption": [],
                                                      "colour swapped": [], "kind swapped": []}
    for _ in range(count):
        attrs = random_attributes(rng, HELD_OUT_COMBOS)
        image = render(attrs, rng)
        caption = make_caption(attrs, rng, say_placement=False, say_size=False)
        colour = [c for c in COLOURS if c != attrs.colour][rng.integers(len(COLOURS) - 1)]
        kind = [k for k in KINDS if k != attrs.kind][rng.integers(len(KINDS) - 1)]
        swap = lambda **change: make_caption(Attributes(**{**attrs.as_dict(), **change}), rng, False, False)  # noqa: E731
        cases["own caption"].append((image, caption))
        cases["soft render, own caption"].append((image.filter(ImageFilter.GaussianBlur(0.7)), caption))
        cases["colour swapped"].append((image, swap(colour=colour)))
        cases["kind swapped"].append((image, swap(kind=kind)))
    for label, pairs in cases.items():
        outcomes = [checker.check([image], [prompt])[0] for image, prompt in pairs]
        reasons = Counter(r for o in outcomes for r in o.reasons)
        scores = [o.result("attribute_alignment").metrics["score"] for o in outcomes if o.result("attribute_alignment")]
        print(f"== {label}: {dict(Counter(o.verdict for o in outcomes))} reasons {dict(reasons)}"
              f" score p5/p50/p95={np.percentile(scores, [5, 50, 95]).round(3).tolist()}")


def study_batch(model: str, count: int, out: Path, chunk: int = 32) -> None:
    import torch

    from instaflow.pipeline import InstaFlowPipeline
    from instaflow.tiny.prompts import held_out_prompts

    torch.set_num_threads(max(1, torch.get_num_threads()))
    pipe = InstaFlowPipeline.from_pretrained(model, device="cpu")
    prompts = [p for p, _ in held_out_prompts(n_per_combo=-(-count // 24))][:count]
    checker = QualityChecker(QcSettings(alignment="judge"))
    known: dict[int, int] = {}
    rows, gen_seconds, qc_seconds = [], 0.0, 0.0
    for start in range(0, count, chunk):
        part = prompts[start : start + chunk]
        began = time.perf_counter()
        output = pipe(part, seeds=list(range(start, start + len(part))), output_type="np")
        gen_seconds += time.perf_counter() - began
        began = time.perf_counter()
        outcomes = checker.check(output.images, part, nsfw_flags=output.nsfw_flags, known_hashes=known)
        qc_seconds += time.perf_counter() - began
        for offset, outcome in enumerate(outcomes):
            if outcome.phash is not None:
                known.setdefault(outcome.phash, start + offset)
            rows.append({"index": start + offset, "prompt": part[offset], **outcome.to_dict()})
    out.write_text("".join(json.dumps(row) + "\n" for row in rows))
    _report(f"{count} held-out prompts, {model}", rows)
    print(f"   skipped: {checker.unavailable()}")
    print(f"RESULT qc_batch_review_fraction={Counter(r['verdict'] for r in rows)['review'] / count:.4f}")
    print(f"RESULT qc_batch_reject_fraction={Counter(r['verdict'] for r in rows)['reject'] / count:.4f}")
    print(f"RESULT generate_ms_per_image={1000 * gen_seconds / count:.2f}")
    print(f"RESULT qc_ms_per_image={1000 * qc_seconds / count:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["renders", "duplicates", "alignment", "batch"])
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--model", default=None, help="tiny model folder (batch)")
    parser.add_argument("--out", type=Path, default=Path("var/qc-batch.jsonl"))
    args = parser.parse_args()
    if args.study == "renders":
        study_renders(args.n)
    elif args.study == "duplicates":
        study_duplicates(args.n)
    elif args.study == "alignment":
        study_alignment(args.n)
    else:
        from instaflow.tiny import DEFAULT_MODEL_DIR

        args.out.parent.mkdir(parents=True, exist_ok=True)
        study_batch(args.model or str(DEFAULT_MODEL_DIR), args.n, args.out)


if __name__ == "__main__":
    main()
