"""The refine step on the tiny model: ``python -m bench.refine [--n 200] [--threads 1] ...``.

For N held-out prompts (attribute combinations the tiny model never saw in training), one
one-step image per prompt from the InstaFlow model, then each refine variant on those same
images (the worker's path: ``instaflow.refine.load_refiner`` → ``refine``). The attribute
judge grades every image against what its prompt asks for; each stage is timed.

Prints a table and ``RESULT`` lines (never passes or fails on time), and writes the
side-by-side picture of docs/refine.md (base row, then one row per variant).
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SEED_BASE = 10_000
COMBO_ATTRIBUTES = ("kind", "colour", "backdrop")  # what the held-out split holds out
ROUND_TRIP = "VAE round trip only"
SIDE_BY_SIDE = Path(__file__).resolve().parent.parent / "docs" / "refine-side-by-side.png"


@dataclass(frozen=True)
class Variant:
    """One refine setting: ``params.refine`` of a batch."""

    strength: float = 0.3
    steps: int = 4
    upscale: int = 1

    @property
    def label(self) -> str:
        return f"refine s{self.strength:g} x{self.steps}" + (" up2" if self.upscale == 2 else "")

    @property
    def options(self) -> dict[str, Any]:
        return {"strength": self.strength, "steps": self.steps, "upscale": self.upscale}

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """``strength:steps[:upscale]``, e.g. ``0.3:4`` or ``0.3:4:2``."""
        parts = text.split(":")
        return cls(float(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 1)


DEFAULT_VARIANTS = (Variant(0.3, 4), Variant(0.5, 4), Variant(0.7, 4), Variant(0.3, 4, 2))


# -- prompts and grading (the refine tests use these too) ------------------------------

def held_out_sample(n: int, seed: int = 1234) -> list[tuple[str, dict[str, str | None]]]:
    """``n`` held-out prompts with the attributes they ask for, spread over every held-out combination.

    ``held_out_prompts`` yields combination by combination (all the mugs first); taking round j
    of every combination before round j + 1, combinations in a fixed shuffled order, keeps a
    small sample balanced over kinds, colours and backdrops.
    """
    from instaflow.tiny.prompts import HELD_OUT_COMBOS, held_out_prompts

    per_combo = max(1, math.ceil(n / len(HELD_OUT_COMBOS)))
    prompts = list(held_out_prompts(n_per_combo=per_combo, seed=seed))
    combo_order = np.random.default_rng(seed).permutation(len(HELD_OUT_COMBOS))
    rounds = sorted(range(len(prompts)), key=lambda i: (i % per_combo, combo_order[i // per_combo]))
    return [prompts[i] for i in rounds[:n]]


def judge_readings(judge: Any, images: Sequence[Image.Image]) -> list[dict[str, str]]:
    """What the judge reads in each image (resized to its 64x64 input), attribute -> label."""
    return [{name: value["label"] for name, value in reading.items()} for reading in judge.predict(images)]


def attribute_accuracy(readings: Sequence[dict[str, str]], wants: Sequence[dict[str, str | None]]) -> float:
    """Share of (image, attribute) pairs over kind, colour and backdrop that the judge reads as asked."""
    hits = [reading[name] == want[name] for reading, want in zip(readings, wants) for name in COMBO_ATTRIBUTES]
    return float(np.mean(hits))


def asked_accuracy(readings: Sequence[dict[str, str]], wants: Sequence[dict[str, str | None]]) -> float:
    """The same over every attribute the prompt names (placement and size only where it names them)."""
    hits = [reading[name] == value for reading, want in zip(readings, wants)
            for name, value in want.items() if value is not None]
    return float(np.mean(hits))


def mean_change(base: Sequence[Image.Image], refined: Sequence[Image.Image]) -> float:
    """Mean absolute difference in 0-255 levels, the refined image brought back to the base size."""
    diffs = [np.abs(np.asarray(b.convert("RGB"), np.float32)
                    - np.asarray(r.convert("RGB").resize(b.size, Image.BILINEAR), np.float32)).mean()
             for b, r in zip(base, refined)]
    return float(np.mean(diffs))


# -- the benchmark ---------------------------------------------------------------------

def in_batches(run: Callable[[slice], list[Image.Image]], count: int, batch: int) -> tuple[list[Image.Image], float]:
    """``run`` over consecutive slices of ``batch``: the images, and seconds per image.

    The median over the passes: on a CPU shared with other jobs a few passes get stalled.
    """
    images: list[Image.Image] = []
    per_image = []
    for start in range(0, count, batch):
        started = time.perf_counter()
        done = run(slice(start, start + batch))
        per_image.append((time.perf_counter() - started) / len(done))
        images.extend(done)
    return images, float(np.median(per_image))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from instaflow.pipeline import InstaFlowPipeline
    from instaflow.refine import load_refiner
    from instaflow.tiny.judge import AttributeJudge

    torch.set_num_threads(args.threads)
    pipe = InstaFlowPipeline.from_pretrained(args.model, device="cpu")
    refiner = load_refiner(args.refiner, device="cpu")
    judge = AttributeJudge.load(args.judge)
    prompts = held_out_sample(args.n)
    texts, wants = [p for p, _ in prompts], [w for _, w in prompts]
    seeds = [SEED_BASE + i for i in range(len(texts))]
    print(f"model={args.model} refiner={args.refiner} ({refiner.model_id}) judge={args.judge} "
          f"prompts={len(texts)} held-out batch={args.batch} threads={args.threads}")

    warm = pipe(texts[:4], seeds[:4]).images  # first calls allocate; keep them out of the timings
    for variant in args.variants:
        refiner.refine(warm, texts[:4], seeds[:4], **variant.options)

    base, base_s_per_image = in_batches(lambda s: pipe(texts[s], seeds[s]).images, len(texts), args.batch)
    rows = {"base (one step)": grade(judge, base, wants, base_s_per_image, base)}
    outputs = {"base (one step)": base}
    if hasattr(refiner, "encode_images"):  # the control: what the refiner's VAE alone does to an image
        round_trip, s_per_image = in_batches(lambda s: vae_round_trip(refiner, base[s]), len(texts), args.batch)
        rows[ROUND_TRIP] = grade(judge, round_trip, wants, s_per_image, base)
    for variant in args.variants:
        refined, s_per_image = in_batches(
            lambda s: refiner.refine(base[s], texts[s], seeds[s], **variant.options).images, len(texts), args.batch)
        rows[variant.label] = grade(judge, refined, wants, s_per_image, base)
        outputs[variant.label] = refined

    print_table(rows, len(texts))
    print_results(rows, args.variants)
    if args.picture is not None:
        notes = {label: f"accuracy {row['accuracy']:.3f}, {1000 * row['s_per_image']:.1f} ms/image"
                 for label, row in rows.items()}
        side_by_side(prompts, outputs, judge, args.picture, notes, count=args.picture_prompts)
        print(f"side by side: {args.picture}")
    return 0


def vae_round_trip(refiner: Any, images: list[Image.Image]) -> list[Image.Image]:
    """Encode and decode with the refiner's VAE, no flow steps: refine's floor of change."""
    import torch

    from instaflow.pipeline import to_pil

    with torch.inference_mode():
        return to_pil(refiner.pipe.decode(refiner.encode_images(images)))


def grade(judge: Any, images: list[Image.Image], wants: list[dict], s_per_image: float,
          base: list[Image.Image]) -> dict[str, Any]:
    readings = judge_readings(judge, images)
    return {"accuracy": attribute_accuracy(readings, wants), "asked_accuracy": asked_accuracy(readings, wants),
            "s_per_image": s_per_image, "size": images[0].size, "change": mean_change(base, images)}


def print_table(rows: dict[str, dict[str, Any]], n: int) -> None:
    print(f"\n{n} held-out prompts; accuracy = judge reads kind/colour/backdrop as asked; asked = every "
          "attribute the prompt names; change = mean |refined - base| in 0-255 levels; s/image of that stage alone "
          "(median over the passes)")
    print("| images | size | accuracy | asked | change | s/image |")
    print("|---|---|---|---|---|---|")
    for label, row in rows.items():
        width, height = row["size"]
        print(f"| {label} | {width}x{height} | {row['accuracy']:.3f} | {row['asked_accuracy']:.3f} "
              f"| {row['change']:.1f} | {row['s_per_image']:.4f} |")


def print_results(rows: dict[str, dict[str, Any]], variants: Sequence[Variant]) -> None:
    base = rows["base (one step)"]
    if variants:
        first = rows[variants[0].label]
        print(f"RESULT base_accuracy={base['accuracy']:.4f} refined_accuracy={first['accuracy']:.4f} "
              f"base_s_per_image={base['s_per_image']:.4f} refine_s_per_image={first['s_per_image']:.4f}")
    for variant in variants:
        row = rows[variant.label]
        key = f"s{variant.strength:g}_x{variant.steps}_up{variant.upscale}".replace(".", "")
        print(f"RESULT {key}_accuracy={row['accuracy']:.4f} {key}_asked_accuracy={row['asked_accuracy']:.4f} "
              f"{key}_change={row['change']:.2f} {key}_s_per_image={row['s_per_image']:.4f}")


# -- the picture -----------------------------------------------------------------------

def side_by_side(prompts: list[tuple[str, dict]], outputs: dict[str, list[Image.Image]], judge: Any,
                 path: Path, notes: dict[str, str] | None = None, count: int = 8, tile: int = 128) -> None:
    """Columns: ``count`` prompts of different held-out combinations; rows: base, then each variant.

    Under each image, what the judge reads (kind, colour, backdrop): green when all three are
    what the prompt asks for, red otherwise.
    """
    picks = first_of_each_combo(prompts, count)
    label_w, head_h, foot_h = 120, 66, 28
    font = ImageFont.load_default(size=11)
    sheet = Image.new("RGB", (label_w + tile * len(picks), head_h + (tile + foot_h) * len(outputs)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, index in enumerate(picks):
        for line, text in enumerate(wrap(prompts[index][0], 22)[:5]):
            draw.text((label_w + column * tile + 3, 2 + 12 * line), text, fill="black", font=font)
    for row, (label, images) in enumerate(outputs.items()):
        top = head_h + row * (tile + foot_h)
        for line, text in enumerate(wrap(label, 18) + wrap((notes or {}).get(label, ""), 18)):
            draw.text((4, top + 4 + 12 * line), text, fill="black", font=font)
        chosen = [images[i] for i in picks]
        for column, (image, reading, index) in enumerate(zip(chosen, judge_readings(judge, chosen), picks)):
            left = label_w + column * tile
            sheet.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (left, top))
            right = all(reading[name] == prompts[index][1][name] for name in COMBO_ATTRIBUTES)
            text = f"{reading['colour']} {reading['kind']}\n{reading['backdrop']}"
            draw.multiline_text((left + 2, top + tile + 1), text, fill="darkgreen" if right else "red", font=font,
                                spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def first_of_each_combo(prompts: list[tuple[str, dict]], count: int) -> list[int]:
    seen: set[tuple] = set()
    picks = []
    for index, (_, want) in enumerate(prompts):
        combo = tuple(want[name] for name in COMBO_ATTRIBUTES)
        if combo not in seen:
            seen.add(combo)
            picks.append(index)
    step = max(1, len(picks) // count)
    return picks[::step][:count]


def wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + [line] if line else lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from core.settings import TINY_MODEL_DIR, TINY_REFINER_DIR
    from instaflow.tiny import DEFAULT_JUDGE_DIR

    parser = argparse.ArgumentParser(prog="python -m bench.refine", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="held-out prompts (one image each)")
    parser.add_argument("--model", type=Path, default=TINY_MODEL_DIR, help="the one-step model")
    parser.add_argument("--refiner", type=Path, default=TINY_REFINER_DIR, help="the refiner (2-rectified flow)")
    parser.add_argument("--judge", type=Path, default=DEFAULT_JUDGE_DIR, help="the attribute judge")
    parser.add_argument("--variants", type=Variant.parse, nargs="*", default=list(DEFAULT_VARIANTS),
                        metavar="STRENGTH:STEPS[:UPSCALE]", help="refine settings (default: 0.3:4 0.5:4 0.7:4 0.3:4:2)")
    parser.add_argument("--batch", type=int, default=16, help="images per forward pass (the worker's micro-batch)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--picture", type=Path, default=SIDE_BY_SIDE, help="side-by-side PNG ('' to skip)")
    parser.add_argument("--picture-prompts", type=int, default=8, help="prompts (columns) in the picture")
    args = parser.parse_args(argv)
    if args.picture is not None and str(args.picture) in ("", "."):
        args.picture = None
    return args


if __name__ == "__main__":
    raise SystemExit(main())
