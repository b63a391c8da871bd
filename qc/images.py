"""One image, prepared once for every scorer.

Scorers accept PIL images and numpy arrays (HxW or HxWxC, uint8 in 0-255 or
float in 0-1).  A float array may hold NaN or inf (a diverged model); the view
records how much, and the other scorers see those pixels as 0 so they still run.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import Any, Union

import numpy as np
from PIL import Image

ImageInput = Union[Image.Image, np.ndarray]

# Rec. 709 luma weights on the encoded (sRGB) values.
LUMA_WEIGHTS = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
HIST_BINS = 64
SMALL_SIZE = 64
# sRGB (D65) -> XYZ, each row divided by the D65 white's X, Y, Z, for CIE L*a*b*.
_XYZ_D65 = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]], dtype=np.float32)
_XYZ_WHITE = np.array([0.9505, 1.0, 1.089], dtype=np.float32)


def _as_float_rgb(image: ImageInput) -> np.ndarray:
    """HxWx3 float32, values nominally in [0, 1]; non-finite values kept as they are."""
    if isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return array
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW tensors from a pipeline
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"expected an HxW or HxWxC image, got shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    array = array[..., :3]
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return array.astype(np.float32) / 255.0
    return array.astype(np.float32, copy=False)


def _block_mean(array: np.ndarray, factor: int) -> np.ndarray:
    """Box-downscale HxWxC by an integer factor (edges that do not fill a block are cropped), as
    float32; uint8 input is scaled to 0-1. Strided sums: 5x faster than a reshaped mean."""
    h, w = (array.shape[0] // factor) * factor, (array.shape[1] // factor) * factor
    integer = np.issubdtype(array.dtype, np.integer)
    total = np.zeros((h // factor, w // factor, array.shape[2]), dtype=np.uint32 if integer else np.float32)
    for i in range(factor):
        for j in range(factor):
            total += array[i:h:factor, j:w:factor]
    return total.astype(np.float32) * np.float32(1.0 / (factor * factor * (255 if integer else 1)))


# sRGB-encoded value (in 1/255 steps) -> linear light: a table beats the power function per pixel.
_SRGB_TO_LINEAR = np.array(
    [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in np.arange(256) / 255.0], dtype=np.float32
)


def lab_channels(rgb: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D65) of ...x3 sRGB values in [0, 1], read in 1/255 steps, as 3 x pixels (L, a, b rows).
    Euclidean distances in it (Delta E 1976) follow what a person sees far better than RGB distances;
    2.3 is just noticeable."""
    linear = _SRGB_TO_LINEAR[np.rint(rgb.reshape(-1, 3) * np.float32(255.0)).astype(np.uint8)]
    xyz = np.ascontiguousarray(((_XYZ_D65 / _XYZ_WHITE[:, None]) @ linear.T))
    f = np.cbrt(xyz)
    dim = xyz <= 0.008856  # near-black: the linear segment of the L* curve
    if dim.any():
        f[dim] = xyz[dim] * np.float32(7.787) + np.float32(16 / 116)
    return np.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """:func:`lab_channels` in the input's shape (...x3)."""
    return np.moveaxis(lab_channels(rgb), 0, -1).reshape(rgb.shape)


class ImageView:
    """Lazily computed representations of one image, shared by all scorers.

    Scorers look at a working copy no larger than about ``work_size`` squared:
    large images are box-downscaled by an integer factor first (a 512x512 image
    becomes 256x256).  Pixel statistics barely move under a box filter, and it
    keeps QC of a 512-pixel chunk as cheap as that of a small one.
    """

    def __init__(self, image: ImageInput, sharpness_size: int = 256, work_size: int = 256) -> None:
        self.source = image
        self.sharpness_size = sharpness_size
        self.non_finite_fraction = 0.0
        if isinstance(image, Image.Image):  # 8-bit: nothing to guard
            pixels = np.asarray(image.convert("RGB"))
            self.height, self.width = pixels.shape[:2]
            factor = self._factor(work_size)
            # Downscaled to float, not back to 8 bits: rounded, a heavy blur's flat gradients turn into
            # steps whose Laplacian passes for detail (512 px, blur radius 24: ratio 0.00027, not 0.0001).
            self.rgb = _block_mean(pixels, factor) if factor >= 2 else pixels.astype(np.float32) / np.float32(255.0)
            return
        raw = _as_float_rgb(image)
        self.height, self.width = raw.shape[:2]
        finite = np.isfinite(raw)
        self.non_finite_fraction = float(1.0 - finite.mean()) if raw.size else 1.0
        if self.non_finite_fraction:
            raw = np.where(finite, raw, 0.0)
        factor = self._factor(work_size)
        if factor >= 2:
            raw = _block_mean(raw, factor)
        self.rgb = np.clip(raw, 0.0, 1.0).astype(np.float32, copy=False)

    def _factor(self, work_size: int) -> int:
        return int(math.sqrt(self.width * self.height) // work_size)

    @cached_property
    def luma(self) -> np.ndarray:
        return self.rgb @ LUMA_WEIGHTS

    @cached_property
    def small_rgb(self) -> np.ndarray:
        """The working copy box-downscaled to about 64 px a side (what the visibility scorer reads):
        a product shot's subject is tens of pixels there, and Lab conversion stays cheap. Reduced from
        ``work_pil`` (8-bit, shared with the duplicate hash) by PIL: 5x cheaper than a float box mean."""
        factor = int(math.sqrt(self.rgb.shape[0] * self.rgb.shape[1]) // SMALL_SIZE)
        if factor < 2:
            return self.rgb
        return np.asarray(self.work_pil.reduce(factor), dtype=np.float32) * np.float32(1.0 / 255.0)

    @cached_property
    def pil(self) -> Image.Image:
        """The full-size RGB uint8 image (what a model-based scorer looks at)."""
        if isinstance(self.source, Image.Image):
            return self.source.convert("RGB")
        full = np.nan_to_num(_as_float_rgb(self.source), nan=0.0, posinf=0.0, neginf=0.0)
        return Image.fromarray(np.round(np.clip(full, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")

    @cached_property
    def work_pil(self) -> Image.Image:
        """The working copy as RGB uint8 (for hashing)."""
        return Image.fromarray(np.round(self.rgb * 255.0).astype(np.uint8), "RGB")

    @cached_property
    def grey_u8(self) -> Image.Image:
        return Image.fromarray(np.round(self.luma * 255.0).astype(np.uint8), "L")

    @cached_property
    def luma_histogram(self) -> np.ndarray:
        counts, _ = np.histogram(self.luma, bins=HIST_BINS, range=(0.0, 1.0))
        return counts

    @cached_property
    def sharpness_grey(self) -> np.ndarray:
        """Grey image (0-255) rescaled to an area of sharpness_size**2, aspect kept.

        A fixed pixel budget makes the Laplacian comparable across resolutions:
        a 512x512 image is downscaled, a 64x64 one is upscaled (bicubic), which
        smooths its edges; the thresholds account for that (docs/qc.md).
        """
        height, width = self.luma.shape
        scale = self.sharpness_size / math.sqrt(width * height)
        size = (max(3, round(width * scale)), max(3, round(height * scale)))
        grey = self.luma * np.float32(255.0)
        if size == (width, height):
            return grey
        return np.asarray(Image.fromarray(grey, "F").resize(size, Image.Resampling.BICUBIC), dtype=np.float32)

    @property
    def upscaled(self) -> bool:
        return self.width * self.height < self.sharpness_size**2

    @property
    def size_label(self) -> str:
        return f"{self.width}x{self.height}"


def load_image(path: Any) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return image.copy()
