"""``instabatch models``: the model registry this host would serve (INSTABATCH_MODELS, docs/models.md).

One line per model: name, kind, default steps and guidance, folder, and whether the folder is there.
Exits 1 when a folder is missing or the registry cannot be read, so a deploy script can check a host.
"""
from __future__ import annotations

import typer

from cli.audit import fail
from core.registry import RegistryError, registry_for
from core.settings import get_settings

COLUMNS = ("name", "kind", "steps", "guidance", "folder", "exists")


def models() -> None:
    """List the model registry: name, kind, default steps and guidance, folder, and whether it exists."""
    settings = get_settings()
    try:
        registry = registry_for(settings)
    except RegistryError as exc:
        raise fail(str(exc), 1) from None
    typer.echo(f"registry {settings.models_file} (default: {registry.default})")
    rows = [[spec.name + (" *" if spec.name == registry.default else ""), spec.kind, str(spec.steps),
             f"{spec.guidance:g}", str(spec.path), "yes" if spec.path.is_dir() else "MISSING"]
            for spec in registry.models.values()]
    widths = [max(len(cell) for cell in column) for column in zip(COLUMNS, *rows)]
    for row in [list(COLUMNS), *rows]:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    missing = [spec.name for spec in registry.models.values() if not spec.path.is_dir()]
    if missing:
        raise fail(f"no folder for {', '.join(missing)}", 1)
