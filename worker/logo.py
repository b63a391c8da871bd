"""The logo post-step: a team's logo composited onto each generated image, before QC and encoding.

``ImageSteps.render`` calls :func:`stamp` right after the forward pass, so QC judges, and the
PNG carries, the branded image. The placement comes from ``params.logo`` (copied from the team's
brand rules at submission, core/brand.py); the logo itself from object storage under its sha256,
checked on every fetch. Deterministic: the same image, logo and placement give the same pixels
(Lanczos resampling, an 8-bit alpha table, PIL's alpha compositing). The unmarked image is
stored beside the marked one only when the rules ask (``keep_unmarked``): ``N.seedS.unmarked.png``.
"""
from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Sequence
from typing import Any

from PIL import Image

from core.brand import logo_key
from core.params import GenerationParams, LogoParams
from core.provenance import encode_png

_logos: dict[str, Image.Image] = {}  # sha256 -> RGBA logo, per process (a logo is small and never changes)
_lock = threading.Lock()


class LogoMissing(RuntimeError):
    """The logo named by the batch is not in the store, or its bytes do not match its sha256."""


def placement_box(image_size: tuple[int, int], logo_size: tuple[int, int],
                  logo: LogoParams) -> tuple[int, int, int, int]:
    """Where the logo goes: (left, top, width, height) in image pixels."""
    width, height = image_size
    logo_width = max(1, round(width * logo.scale))
    logo_height = max(1, round(logo_size[1] * logo_width / logo_size[0]))
    margin = round(width * logo.margin)
    left = margin if logo.corner.endswith("left") else width - logo_width - margin
    top = margin if logo.corner.startswith("top") else height - logo_height - margin
    return left, top, logo_width, logo_height


def overlay(picture: Image.Image, logo: Image.Image, placement: LogoParams) -> Image.Image:
    """The picture with the logo composited at its corner, scale and opacity (a new RGB image)."""
    return composite(picture, *scaled_mark(logo, picture.size, placement))


def scaled_mark(logo: Image.Image, size: tuple[int, int],
                placement: LogoParams) -> tuple[Image.Image, tuple[int, int]]:
    """The logo at its size and opacity for images of ``size``, and where it goes (once per forward pass)."""
    left, top, width, height = placement_box(size, logo.size, placement)
    mark = logo.convert("RGBA").resize((width, height), Image.Resampling.LANCZOS)
    table = [round(value * placement.opacity) for value in range(256)]
    mark.putalpha(mark.getchannel("A").point(table))
    return mark, (max(left, 0), max(top, 0))


def composite(picture: Image.Image, mark: Image.Image, at: tuple[int, int]) -> Image.Image:
    """Only the logo's box is blended (the picture is opaque): the same pixels as blending the whole."""
    box = (*at, min(at[0] + mark.width, picture.width), min(at[1] + mark.height, picture.height))
    region = picture.crop(box).convert("RGBA")
    region.alpha_composite(mark.crop((0, 0, box[2] - box[0], box[3] - box[1])))
    out = picture.convert("RGB")
    out.paste(region.convert("RGB"), at)
    return out


def load_logo(store: Any, sha256: str) -> Image.Image:
    with _lock:
        if sha256 in _logos:
            return _logos[sha256]
    try:
        data = store.get(logo_key(sha256))
    except (KeyError, FileNotFoundError) as exc:  # not there; a store that does not answer is retried
        raise LogoMissing(f"the batch's logo {sha256} is not in the store: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise LogoMissing(f"the stored logo {logo_key(sha256)} does not match its sha256")
    with Image.open(io.BytesIO(data)) as opened:
        logo = opened.convert("RGBA")
    with _lock:
        _logos[sha256] = logo
    return logo


def provenance(params: GenerationParams) -> dict[str, Any]:
    """What a branded image's provenance adds: the logo's sha256 and placement."""
    logo = params.logo
    if logo is None:
        return {}
    return {"logo_sha256": logo.sha256, "logo_placement": f"{logo.corner} scale={logo.scale} "
            f"opacity={logo.opacity} margin={logo.margin}", "logo_unmarked_kept": logo.keep_unmarked}


def unmarked_key(key: str, seed: int) -> str:
    """Beside the marked image's key, named by seed too: a reviewer's regenerate draws the same index
    with a new seed, and the write-once store would otherwise keep the first unmarked copy."""
    return f"{key.removesuffix('.png')}.seed{seed}.unmarked.png"


def stamp(ctx: Any, params: GenerationParams, jobs: Sequence[tuple[Any, int, int]],
          pictures: Sequence[Image.Image]) -> list[Image.Image]:
    """The pictures with the batch's logo (unchanged without one); keeps the unmarked ones if asked."""
    if params.logo is None:
        return list(pictures)
    logo = ctx.retry(lambda: load_logo(ctx.store, params.logo.sha256), what="fetching the logo")
    if params.logo.keep_unmarked:
        keep_unmarked(ctx, jobs, pictures)
    marks = {size: scaled_mark(logo, size, params.logo) for size in {picture.size for picture in pictures}}
    return [composite(picture, *marks[picture.size]) for picture in pictures]


def keep_unmarked(ctx: Any, jobs: Sequence[tuple[Any, int, int]], pictures: Sequence[Image.Image]) -> None:
    from worker.records import storage_key

    for (item, index, seed), picture in zip(jobs, pictures):
        key = unmarked_key(storage_key(item.batch_id, item.seq, item.id, index), seed)
        record = {"item_id": item.id, "batch_id": item.batch_id, "seed": seed, "index": index, "unmarked": "true"}
        png = encode_png(picture, record)
        ctx.retry(lambda: ctx.store.put(key, png, {k: str(v) for k, v in record.items()}), what=f"storing {key}")
