"""The code version recorded with every generated image: ``git describe`` when run from a checkout,
else the installed package's version."""
from __future__ import annotations

import subprocess
from functools import lru_cache
from importlib import metadata

from core.settings import REPO_ROOT


@lru_cache(maxsize=1)
def code_version() -> str:
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        if described:
            return f"git:{described}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"instabatch=={metadata.version('instabatch')}"
    except metadata.PackageNotFoundError:
        return "unknown"
