"""Compact checkpoints: the shipped models' UNets in int8, the parts they share linked, not copied.

The repository ships four tiny models within a 25 MB weights budget (docs/tiny-model.md,
"Committed weights"). A full fp16 folder is 9.9 MB, 8.4 of it the UNet, and every model of the
family uses the same VAE, text encoder and tokenizer. So apart from the default model (kept as a
plain fp16 diffusers folder, the one the reference pipeline is checked against), a shipped folder:

    model_index.json, scheduler/      as in any diffusers checkpoint
    unet/config.json                  as in any diffusers checkpoint
    unet/weights.int8.safetensors     every weight of two or more dimensions as int8 with one fp32
                                      scale per output channel (symmetric, absmax / 127); the rest fp16
    vae/, text_encoder/, tokenizer/   relative symlinks into the default model's folder

`load_unet` reads either kind of unet/ folder; `export_standard` writes a plain diffusers
folder from a compact one (for tools that read only the standard layout, such as the reference
InstaFlow pipeline). Per-channel int8 keeps each weight within half a step of 1/127 of its
channel's largest magnitude.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INT8_WEIGHTS = "weights.int8.safetensors"
SCALE_SUFFIX = ".int8_scale"
SHARED_PARTS = ("vae", "text_encoder", "tokenizer")


def is_compact(unet_dir: Path) -> bool:
    return (Path(unet_dir) / INT8_WEIGHTS).is_file()


def quantize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """int8 per output channel for matrices and kernels; fp16 for biases and norms."""
    import torch

    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        tensor = tensor.detach().float().cpu()
        if tensor.ndim < 2:
            out[name] = tensor.half().contiguous()
            continue
        scale = tensor.abs().amax(dim=tuple(range(1, tensor.ndim)), keepdim=True).clamp_min(1e-12) / 127.0
        out[name] = torch.round(tensor / scale).clamp(-127, 127).to(torch.int8).contiguous()
        out[name + SCALE_SUFFIX] = scale.flatten().contiguous()
    return out


def dequantize(stored: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    import torch

    state = {}
    for name, tensor in stored.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if tensor.dtype == torch.int8:
            scale = stored[name + SCALE_SUFFIX].reshape(-1, *([1] * (tensor.ndim - 1)))
            tensor = tensor.float() * scale
        state[name] = tensor.to(dtype)
    return state


def load_unet(unet_dir: Path, dtype: torch.dtype):
    """A UNet2DConditionModel from a standard or a compact unet/ folder, on the CPU, in `dtype`."""
    from diffusers import UNet2DConditionModel

    unet_dir = Path(unet_dir)
    if not is_compact(unet_dir):
        return UNet2DConditionModel.from_pretrained(unet_dir, dtype=dtype, local_files_only=True)
    from safetensors.torch import load_file

    config = UNet2DConditionModel.load_config(unet_dir, local_files_only=True)
    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(dequantize(load_file(unet_dir / INT8_WEIGHTS), dtype), strict=True)
    return unet.to(dtype)


def write_compact(source: Path, out: Path, share_from: Path, name: str | None = None) -> Path:
    """Write `source` (a standard checkpoint folder) as a compact one at `out`, linking the shared
    parts to `share_from` (which must hold the same VAE, text encoder and tokenizer)."""
    import torch
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    for part in SHARED_PARTS:
        if not _same_files(source / part, share_from / part):
            raise ValueError(f"{source / part} differs from {share_from / part}: it cannot be shared")
    unet = load_unet(source / "unet", torch.float32)
    if out.exists():
        shutil.rmtree(out)
    (out / "unet").mkdir(parents=True)
    shutil.copy(source / "unet" / "config.json", out / "unet" / "config.json")
    save_file(quantize(unet.state_dict()), out / "unet" / INT8_WEIGHTS)
    shutil.copytree(source / "scheduler", out / "scheduler")
    index = json.loads((source / "model_index.json").read_text())
    index["_name_or_path"] = name or out.name
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    for part in SHARED_PARTS:
        os.symlink(os.path.relpath(Path(share_from).resolve() / part, out.resolve()), out / part)
    return out


def export_standard(source: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """A plain diffusers folder (parts copied, the UNet dequantized) from a compact or standard one.
    fp32 by default: the exported UNet then holds exactly the values our loader computes."""
    import torch

    source, out = Path(source), Path(out)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source, out, symlinks=False, ignore=shutil.ignore_patterns("unet"))
    unet = load_unet(source / "unet", torch.float32).to(dtype or torch.float32)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    return out


def _same_files(a: Path, b: Path) -> bool:
    """Same files with the same bytes; JSON configs compared without `_name_or_path` (where they were
    saved from, which differs between folders holding the same part)."""
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    if names != sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()):
        return False
    return all(_content(a / n) == _content(b / n) for n in names)


def _content(file: Path) -> object:
    if file.suffix == ".json":
        data = json.loads(file.read_text())
        if isinstance(data, dict):
            data.pop("_name_or_path", None)
        return data
    return file.read_bytes()
