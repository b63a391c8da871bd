"""Named models: which checkpoints a deployment serves, read from a registry file (TOML).

A batch names one in ``params.model``; the API validates the name against this list, the worker
loads the named folder and provenance records the name with the weights' sha256 (docs/models.md).
Torch-free: the API reads names and defaults only.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from core.settings import Settings, get_settings

Kind = Literal["one-step", "few-step", "multi-step", "refiner"]
KINDS: tuple[str, ...] = ("one-step", "few-step", "multi-step", "refiner")
# The name every batch carried before there was a registry: always the registry's default model.
DEFAULT_ALIAS = "default"


class RegistryError(ValueError):
    """The registry file is missing, malformed or names a model twice."""


class UnknownModelError(ValueError):
    """A name that is not in the registry; the message lists the names that are."""


@dataclass(frozen=True)
class ModelSpec:
    """One registry entry."""

    name: str
    path: Path
    kind: Kind
    steps: int
    guidance: float
    description: str = ""


@dataclass(frozen=True)
class Registry:
    default: str
    models: dict[str, ModelSpec]

    def names(self) -> list[str]:
        return list(self.models)

    def resolve(self, name: str | None) -> str:
        """The registry name a requested name stands for (None and "default" are the default model)."""
        if name in (None, DEFAULT_ALIAS):
            return self.default
        if name not in self.models:
            raise UnknownModelError(f"unknown model {name!r}: this deployment serves "
                                    + ", ".join(self.names()) + f" (or {DEFAULT_ALIAS!r} for {self.default})")
        return name

    def get(self, name: str | None) -> ModelSpec:
        return self.models[self.resolve(name)]


def load_registry(path: Path, default_model_path: Path | None = None) -> Registry:
    """Read a registry file. ``default_model_path`` (INSTABATCH_MODEL, when set) replaces the default
    entry's folder, so a deployment that only ever named one checkpoint keeps working unchanged."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RegistryError(f"cannot read the model registry {str(path)!r}: {exc}") from exc
    entries = data.get("models") or {}
    if not entries:
        raise RegistryError(f"the model registry {str(path)!r} names no models")
    models = {name: _spec(name, entry, Path(path).parent) for name, entry in entries.items()}
    default = data.get("default", next(iter(models)))
    if default not in models:
        raise RegistryError(f"the registry's default {default!r} is not one of its models")
    if DEFAULT_ALIAS in models:
        raise RegistryError(f"{DEFAULT_ALIAS!r} is reserved for the default model; name it otherwise")
    if default_model_path is not None:
        models[default] = ModelSpec(**{**models[default].__dict__, "path": Path(default_model_path)})
    return Registry(default=default, models=models)


def _spec(name: str, entry: dict, base: Path) -> ModelSpec:
    kind = entry.get("kind", "one-step")
    if kind not in KINDS:
        raise RegistryError(f"model {name!r}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if "path" not in entry:
        raise RegistryError(f"model {name!r} has no path")
    return ModelSpec(name=name, path=(base / entry["path"]).resolve(), kind=kind,
                     steps=int(entry.get("steps", 1)), guidance=float(entry.get("guidance", 0.0)),
                     description=str(entry.get("description", "")))


def registry_for(settings: Settings) -> Registry:
    override = settings.model_path if "model_path" in settings.model_fields_set else None
    return _cached(settings.models_file, override)


@lru_cache(maxsize=8)
def _cached(path: Path, override: Path | None) -> Registry:
    return load_registry(path, override)


def get_registry() -> Registry:
    return registry_for(get_settings())
