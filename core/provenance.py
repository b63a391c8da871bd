"""Provenance carried by the image itself: PNG text chunks, mirrored in object metadata."""
from __future__ import annotations

import io
from collections.abc import Mapping

from PIL import Image, PngImagePlugin

# Prefixed so our chunks never collide with other tools' (A1111 writes "parameters").
CHUNK_PREFIX = "instabatch:"


def encode_png(image: Image.Image, provenance: Mapping[str, object]) -> bytes:
    """Deterministic PNG bytes: same pixels and provenance give the same file (no timestamps)."""
    info = PngImagePlugin.PngInfo()
    for name in sorted(provenance):
        value = provenance[name]
        if value is not None:
            info.add_itxt(CHUNK_PREFIX + name, str(value))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", pnginfo=info, compress_level=6)
    return buffer.getvalue()


def read_png_provenance(data: bytes) -> dict[str, str]:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        text = getattr(image, "text", {}) or {}
    return {name[len(CHUNK_PREFIX):]: value for name, value in text.items() if name.startswith(CHUNK_PREFIX)}
