"""InstaBatch's generation engine: one-step rectified-flow text-to-image (InstaFlow) and refine.

Names are imported lazily so that `import instaflow` (e.g. for `ModelNotFoundError` or
`RefineParams` in the API process) does not load torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "InstaFlowPipeline": "instaflow.pipeline",
    "InstaFlowOutput": "instaflow.pipeline",
    "ModelNotFoundError": "instaflow.loading",
    "weights_fingerprint": "instaflow.loading",
    "RefineParams": "core.params",
    "RectifiedFlowRefiner": "instaflow.refine",
    "SDXLRefiner": "instaflow.refine",
    "load_refiner": "instaflow.refine",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'instaflow' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
