"""Procedural product renders: a coloured product of one of six kinds on a plain backdrop.

Drawn with PIL at 4x the output size and downsampled, so edges are anti-aliased. Small
random jitter (position, scale, shade, light) keeps the data from being a lookup table.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from instaflow.tiny.prompts import (
    BACKDROPS, COLOURS, Attributes, caption_mentions, make_caption, random_attributes,
)

IMAGE_SIZE = 64
SUPERSAMPLE = 4
PLACEMENT_X = {"left": 0.27, "center": 0.5, "right": 0.73}
SIZE_SCALE = {"small": 0.32, "large": 0.52}  # product box edge as a fraction of the image
FLOOR_Y = 0.80  # where products stand


def _shade(rgb: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    if factor >= 1:
        return tuple(int(c + (255 - c) * (factor - 1)) for c in rgb)  # type: ignore[return-value]
    return tuple(int(c * factor) for c in rgb)  # type: ignore[return-value]


def _draw_mug(d: ImageDraw.ImageDraw, cx: float, by: float, s: float, rgb, side: int) -> None:
    w, h = 0.62 * s, 0.72 * s
    x0, x1, y0 = cx - w / 2, cx + w / 2, by - h
    hx = x1 if side > 0 else x0
    lw = max(2, int(0.09 * s))
    hb = (hx - 0.24 * s, y0 + 0.16 * h, hx + 0.24 * s, y0 + 0.72 * h)
    d.ellipse(hb, outline=_shade(rgb, 0.8), width=lw)
    d.rounded_rectangle((x0, y0, x1, by), radius=0.08 * s, fill=rgb)
    d.ellipse((x0, y0 - 0.07 * s, x1, y0 + 0.07 * s), fill=_shade(rgb, 0.6))


def _draw_bottle(d: ImageDraw.ImageDraw, cx: float, by: float, s: float, rgb, side: int) -> None:
    w, h = 0.36 * s, s
    body_top = by - 0.62 * h
    d.rounded_rectangle((cx - w / 2, body_top, cx + w / 2, by), radius=0.1 * s, fill=rgb)
    d.polygon([(cx - w / 2, body_top + 1), (cx + w / 2, body_top + 1), (cx + 0.09 * s, by - 0.82 * h),
               (cx - 0.09 * s, by - 0.82 * h)], fill=rgb)
    d.rectangle((cx - 0.09 * s, by - 0.92 * h, cx + 0.09 * s, by - 0.8 * h), fill=rgb)
    d.rectangle((cx - 0.11 * s, by - h, cx + 0.11 * s, by - 0.9 * h), fill=_shade(rgb, 0.55))
    d.rectangle((cx - w / 2 + 0.05 * s, by - 0.5 * h, cx - w / 2 + 0.1 * s, by - 0.12 * h), fill=_shade(rgb, 1.35))


def _draw_box(d: ImageDraw.ImageDraw, cx: float, by: float, s: float, rgb, side: int) -> None:
    w, h, depth = 0.7 * s, 0.62 * s, 0.22 * s
    x0, x1, y0 = cx - w / 2 - side * depth / 2, cx + w / 2 - side * depth / 2, by - h
    d.rectangle((x0, y0, x1, by), fill=rgb)
    top = [(x0, y0), (x1, y0), (x1 + side * depth, y0 - depth), (x0 + side * depth, y0 - depth)]
    d.polygon(top, fill=_shade(rgb, 1.3))
    edge = x1 if side > 0 else x0
    d.polygon([(edge, y0), (edge + side * depth, y0 - depth), (edge + side * depth, by - depth), (edge, by)],
              fill=_shade(rgb, 0.6))


def _draw_sneaker(d: ImageDraw.ImageDraw, cx: float, by: float, s: float, rgb, side: int) -> None:
    w, h = s, 0.46 * s
    x0, x1 = cx - w / 2, cx + w / 2
    toe, heel = (x1, x0) if side > 0 else (x0, x1)
    sole_h = 0.11 * s
    d.rounded_rectangle((x0, by - sole_h, x1, by), radius=sole_h / 2, fill=(238, 238, 232))
    upper = [(heel, by - sole_h), (heel, by - h), (heel + side * 0.35 * w, by - h),
             (heel + side * 0.55 * w, by - 0.55 * h), (toe, by - 0.38 * h), (toe, by - sole_h)]
    d.polygon(upper, fill=rgb)
    for k in range(3):
        lx = heel + side * (0.38 + 0.08 * k) * w
        d.line((lx, by - (0.92 - 0.12 * k) * h, lx + side * 0.06 * w, by - (0.8 - 0.12 * k) * h),
               fill=(240, 240, 240), width=max(2, int(0.04 * s)))


def _draw_lamp(d: ImageDraw.ImageDraw, cx: float, by: float, s: float, rgb, side: int) -> None:
    h = s
    d.ellipse((cx - 0.22 * s, by - 0.08 * s, cx + 0.22 * s, by + 0.02 * s), fill=_shade(rgb, 0.6))
    d.rectangle((cx - 0.035 * s, by - 0.62 * h, cx + 0.035 * s, by - 0.04 * s), fill=_shade(rgb, 0.7))
    d.polygon([(cx - 0.34 * s, by - 0.58 * h), (cx + 0.34 * s, by - 0.58 * h), (cx + 0.18 * s, by - h),
               (cx - 0.18 * s, by - h)], fill=rgb)


def _draw_chair(d: ImageDraw.ImageDraw, cx: float, by: float, s: float, rgb, side: int) -> None:
    w, h = 0.62 * s, s
    x0, x1 = cx - w / 2, cx + w / 2
    leg = max(2, 0.07 * s)
    seat_y = by - 0.45 * h
    back_x = x0 if side > 0 else x1 - leg
    d.rectangle((back_x, by - h, back_x + leg, by), fill=_shade(rgb, 0.75))
    d.rectangle((back_x, by - h, back_x + leg, seat_y), fill=rgb)
    d.rectangle((x0, seat_y, x1, seat_y + 0.08 * h), fill=rgb)
    d.rectangle((x0, seat_y, x0 + leg, by), fill=_shade(rgb, 0.75))
    d.rectangle((x1 - leg, seat_y, x1, by), fill=_shade(rgb, 0.75))
    rail = (back_x - 0.02 * s, by - h, back_x + leg + 0.02 * s, by - 0.9 * h)
    d.rectangle(rail, fill=_shade(rgb, 0.7))


DRAWERS = {
    "mug": _draw_mug, "bottle": _draw_bottle, "box": _draw_box,
    "sneaker": _draw_sneaker, "lamp": _draw_lamp, "chair": _draw_chair,
}


def render(attrs: Attributes, rng: np.random.Generator) -> Image.Image:
    """One 64x64 RGB render of `attrs`; `rng` decides the jitter."""
    big = IMAGE_SIZE * SUPERSAMPLE
    light = 1.0 + rng.uniform(-0.05, 0.05)
    back = _shade(BACKDROPS[attrs.backdrop], light)
    image = Image.new("RGB", (big, big), back)
    d = ImageDraw.Draw(image)
    floor = int(big * (FLOOR_Y - 0.1))
    d.rectangle((0, floor, big, big), fill=_shade(back, 0.92))  # table top, a touch darker
    s = SIZE_SCALE[attrs.size] * big * rng.uniform(0.92, 1.08)
    cx = PLACEMENT_X[attrs.placement] * big + rng.uniform(-0.03, 0.03) * big
    by = FLOOR_Y * big + rng.uniform(-0.02, 0.02) * big
    shadow = Image.new("L", (big, big), 0)
    ImageDraw.Draw(shadow).ellipse((cx - 0.45 * s, by - 0.05 * s, cx + 0.45 * s, by + 0.07 * s), fill=90)
    shadow = shadow.filter(ImageFilter.GaussianBlur(big / 60))
    image = Image.composite(Image.new("RGB", (big, big), _shade(back, 0.6)), image, shadow)
    d = ImageDraw.Draw(image)
    rgb = _shade(COLOURS[attrs.colour], 1.0 + rng.uniform(-0.06, 0.06))
    side = 1 if rng.random() < 0.5 else -1
    DRAWERS[attrs.kind](d, cx, by, s, rgb, side)
    return image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.LANCZOS)


def to_array(images: list[Image.Image]) -> np.ndarray:
    """PIL images -> (N, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images]).astype(np.float32)
    return arr.transpose(0, 3, 1, 2) / 127.5 - 1.0


def make_dataset(
    n: int, seed: int, combos: tuple[tuple[str, str, str], ...], p_mention: float = 0.5
) -> tuple[np.ndarray, list[str], list[Attributes]]:
    """n renders as uint8 (N, 64, 64, 3), their captions and their attributes."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions, attrs_list = [], []
    for i in range(n):
        attrs = random_attributes(rng, combos)
        pixels[i] = np.asarray(render(attrs, rng))
        say_place, say_size = caption_mentions(rng, p_mention)
        captions.append(make_caption(attrs, rng, say_placement=say_place, say_size=say_size))
        attrs_list.append(attrs)
    return pixels, captions, attrs_list
