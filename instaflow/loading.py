"""Loading InstaFlow / rectified-flow checkpoints from a local diffusers folder.

The layout is the one of the published XCLiu/instaflow_0_9B_from_sd_1_5 and
XCLiu/2_rectified_flow_from_sd_1_5 checkpoints::

    model_index.json
    unet/            UNet2DConditionModel (predicts a velocity, not an epsilon)
    vae/             AutoencoderKL
    text_encoder/    CLIPTextModel
    tokenizer/       CLIPTokenizer
    scheduler/       optional; the engine ignores it (plain Euler steps). Our checkpoints carry the PNDM
                     config of the published InstaFlow ones, which the reference pipeline reads correctly
    safety_checker/  optional StableDiffusionSafetyChecker (needs feature_extractor/)
    feature_extractor/

Nothing here touches the network: every `from_pretrained` gets `local_files_only=True`,
and a path that is not an existing folder is refused before any library sees it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REQUIRED_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class ModelNotFoundError(ValueError):
    """The model path is not a local checkpoint folder in diffusers layout."""


@dataclass
class Components:
    """The loaded parts of a checkpoint, on one device and dtype."""

    path: Path
    model_index: dict[str, Any]
    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    safety_checker: Any | None
    feature_extractor: Any | None
    device: torch.device
    dtype: torch.dtype


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    import torch

    # fp16 is what InstaFlow ships and runs with on GPUs; CPUs are slow and inexact in fp16.
    return torch.float16 if device.type == "cuda" else torch.float32


def resolve_model_dir(path: str | Path) -> Path:
    """Return the checkpoint folder, or raise ModelNotFoundError naming `path`.

    A hub id such as ``XCLiu/instaflow_0_9B_from_sd_1_5`` is refused: no weights are
    ever downloaded at run time.
    """
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ModelNotFoundError(
            f"model path {str(path)!r} is not an existing local folder "
            "(hub ids are not downloaded; give the path of a checkpoint in diffusers layout)"
        )
    if not (folder / "model_index.json").is_file():
        raise ModelNotFoundError(f"model path {str(path)!r} has no model_index.json: not a diffusers checkpoint")
    return folder.resolve()


def read_model_index(path: str | Path) -> dict[str, Any]:
    folder = resolve_model_dir(path)
    try:
        return json.loads((folder / "model_index.json").read_text())
    except json.JSONDecodeError as error:
        raise ModelNotFoundError(f"model path {str(path)!r} has an unreadable model_index.json: {error}") from error


def model_id_of(path: str | Path, model_index: dict[str, Any]) -> str:
    """The name a model is recorded under: `_name_or_path` when set, else the folder name."""
    return str(model_index.get("_name_or_path") or Path(path).name)


def load_components(
    path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Components:
    import torch

    folder = resolve_model_dir(path)
    model_index = read_model_index(folder)
    _check_required_components(folder)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)

    # Imported here so that `import instaflow` stays cheap for the API process.
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from instaflow.compact import load_unet

    def load_model(cls: Any, name: str) -> Any:
        if cls is UNet2DConditionModel:  # a shipped non-default model stores its UNet in int8 (instaflow/compact.py)
            model = load_unet(folder / name, dtype)
        else:
            model = cls.from_pretrained(folder / name, dtype=dtype, local_files_only=True)
        if device.type != "cpu":  # from_pretrained loads on the CPU
            model = model.to(device)
        return model.eval().requires_grad_(False)

    safety_checker, feature_extractor = _load_safety_checker(folder, model_index, load_model)
    return Components(
        path=folder,
        model_index=model_index,
        unet=load_model(UNet2DConditionModel, "unet"),
        vae=load_model(AutoencoderKL, "vae"),
        text_encoder=load_model(CLIPTextModel, "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True),
        safety_checker=safety_checker,
        feature_extractor=feature_extractor,
        device=device,
        dtype=dtype,
    )


def _check_required_components(folder: Path) -> None:
    missing = [name for name in REQUIRED_COMPONENTS if not (folder / name).is_dir()]
    if missing:
        raise ModelNotFoundError(f"checkpoint {str(folder)!r} lacks the component folder(s): {', '.join(missing)}")


def _load_safety_checker(folder: Path, model_index: dict[str, Any], load_model: Any) -> tuple[Any, Any]:
    """Load the bundled safety checker when the checkpoint has one (InstaFlow's do)."""
    declared = model_index.get("safety_checker") or [None, None]
    if declared[0] is None or not (folder / "safety_checker").is_dir():
        return None, None
    if not (folder / "feature_extractor").is_dir():
        raise ModelNotFoundError(f"checkpoint {str(folder)!r} has a safety_checker but no feature_extractor folder")
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPImageProcessor

    feature_extractor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor", local_files_only=True)
    return load_model(StableDiffusionSafetyChecker, "safety_checker"), feature_extractor


_fingerprints: dict[Path, str] = {}
_fingerprint_lock = threading.Lock()


def weights_fingerprint(path: str | Path) -> str:
    """sha256 over every weight file of the checkpoint, in sorted relative-path order.

    Each file contributes its relative path and its bytes, so renaming or swapping
    components changes the fingerprint too. Cached in memory per folder (nothing is
    written into the model folder, which may be read-only).
    """
    folder = resolve_model_dir(path)
    with _fingerprint_lock:
        if folder not in _fingerprints:
            _fingerprints[folder] = _hash_weight_files(folder)
        return _fingerprints[folder]


def _hash_weight_files(folder: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in _walk_files(folder) if p.name.endswith(WEIGHT_SUFFIXES))
    for file in files:
        digest.update(file.relative_to(folder).as_posix().encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _walk_files(folder: Path) -> list[Path]:
    """Every file under `folder`, following symlinked folders (the parts a compact checkpoint shares
    with the default model, instaflow/compact.py), which Path.rglob does not enter."""
    return [Path(root) / name for root, _, names in os.walk(folder, followlinks=True) for name in names]
