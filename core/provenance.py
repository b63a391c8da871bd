"""Provenance carried by the image itself, in every output format, mirrored in object metadata.

PNG keeps it in iTXt chunks named ``instabatch:<field>``; WebP and JPEG in an XMP packet whose
``rdf:Description`` has one ``instabatch:<field>`` attribute per field. :func:`encode_image` is
the ONE place an image becomes bytes (docs/architecture.md, "Output formats"): a hook that signs
or watermarks the encoded file belongs there, in one line.
"""
from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal
from xml.etree import ElementTree
from xml.sax.saxutils import quoteattr

from PIL import Image, PngImagePlugin

# Prefixed so our chunks never collide with other tools' (A1111 writes "parameters").
CHUNK_PREFIX = "instabatch:"
XMP_NAMESPACE = "https://instabatch.dev/ns/provenance/1.0/"
RDF_NAMESPACE = "http://www.w3.org/1999/02/22-rdf-syntax-ns#"
DEFAULT_PNG_COMPRESS_LEVEL = 6
WEBP_METHOD = 4  # libwebp's default effort, named so the bytes never change with Pillow's default

ImageFormat = Literal["png", "webp", "jpeg"]
EXTENSIONS: dict[str, str] = {"png": "png", "webp": "webp", "jpeg": "jpg"}
CONTENT_TYPES: dict[str, str] = {"png": "image/png", "webp": "image/webp", "jpeg": "image/jpeg"}


@dataclass(frozen=True)
class Encoding:
    """How images are written: the format, its quality (WebP/JPEG) and PNG's zlib level."""

    format: ImageFormat = "png"
    quality: int = 90
    png_compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL

    @property
    def extension(self) -> str:
        return EXTENSIONS[self.format]


def encode_image(image: Image.Image, encoding: Encoding, provenance: Mapping[str, object]) -> bytes:
    """Deterministic bytes: same pixels, encoding and provenance give the same file (no timestamps)."""
    fields = {name: str(provenance[name]) for name in sorted(provenance) if provenance[name] is not None}
    buffer = io.BytesIO()
    rgb = image.convert("RGB")
    if encoding.format == "png":
        rgb.save(buffer, format="PNG", pnginfo=_png_info(fields), compress_level=encoding.png_compress_level)
    elif encoding.format == "webp":
        rgb.save(buffer, format="WEBP", quality=encoding.quality, method=WEBP_METHOD, xmp=xmp_packet(fields))
    elif encoding.format == "jpeg":
        rgb.save(buffer, format="JPEG", quality=encoding.quality, xmp=xmp_packet(fields))
    else:
        raise ValueError(f"unknown image format {encoding.format!r}")
    return buffer.getvalue()


def encode_png(image: Image.Image, provenance: Mapping[str, object],
               compress_level: int = DEFAULT_PNG_COMPRESS_LEVEL) -> bytes:
    return encode_image(image, Encoding("png", png_compress_level=compress_level), provenance)


def read_provenance(data: bytes) -> dict[str, str]:
    """The InstaBatch fields of a PNG (text chunks), WebP or JPEG (XMP); {} when it has none."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        text = getattr(image, "text", {}) or {}
        xmp = image.info.get("xmp")
    if xmp:
        return parse_xmp(xmp)
    return {name[len(CHUNK_PREFIX):]: value for name, value in text.items() if name.startswith(CHUNK_PREFIX)}


read_png_provenance = read_provenance  # the name callers used before WebP and JPEG


def _png_info(fields: Mapping[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for name, value in fields.items():
        info.add_itxt(CHUNK_PREFIX + name, value)
    return info


def xmp_packet(fields: Mapping[str, str]) -> bytes:
    """An XMP packet with one ``instabatch:<field>`` attribute per field (attribute order sorted)."""
    attributes = "".join(f"\n   instabatch:{name}={quoteattr(value)}" for name, value in fields.items())
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
        f' <rdf:RDF xmlns:rdf="{RDF_NAMESPACE}">\n'
        f'  <rdf:Description rdf:about="" xmlns:instabatch="{XMP_NAMESPACE}"{attributes}/>\n'
        " </rdf:RDF>\n</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    ).encode()


def parse_xmp(packet: bytes | str) -> dict[str, str]:
    """The ``instabatch:`` attributes of an XMP packet (other tools' fields are ignored)."""
    text = packet.decode("utf-8", "replace") if isinstance(packet, bytes) else packet
    start, end = text.find("<x:xmpmeta"), text.rfind("</x:xmpmeta>")
    if start < 0 or end < 0:
        return {}
    root = ElementTree.fromstring(text[start:end + len("</x:xmpmeta>")])
    prefix = "{" + XMP_NAMESPACE + "}"
    return {name[len(prefix):]: value
            for description in root.iter("{" + RDF_NAMESPACE + "}Description")
            for name, value in description.attrib.items() if name.startswith(prefix)}
