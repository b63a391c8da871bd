"""Explicit request and response models of the API (requests forbid unknown fields)."""
from api.schemas.batches import (
    BatchCreate,
    BatchOut,
    BatchPage,
    CancelResult,
    GenerationParams,
    ItemIn,
    RefineParams,
    RetryResult,
)
from api.schemas.items import ImageDetail, ImageOut, ItemDetail, ItemOut, ItemPage, QcResultOut, ReviewOut
from api.schemas.keys import KeyCreate, KeyCreated, KeyOut

__all__ = [
    "BatchCreate", "BatchOut", "BatchPage", "CancelResult", "GenerationParams", "ImageDetail", "ImageOut",
    "ItemDetail", "ItemIn", "ItemOut", "ItemPage", "KeyCreate", "KeyCreated", "KeyOut", "QcResultOut",
    "RefineParams", "RetryResult", "ReviewOut",
]
