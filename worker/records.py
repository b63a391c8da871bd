"""Where an image is stored and what it says about itself (embedded in the file, and object metadata)."""
from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import quote

# S3 allows 2 KB of user metadata per object, sent percent-encoded in headers: long prompts are cut
# there to this many encoded bytes (the PNG and the ledger keep them whole; prompt_sha256 names them).
METADATA_PROMPT_BYTES = 600


def storage_key(batch_id: str, item_seq: int, item_id: str, index: int, *, extension: str = "png") -> str:
    """Deterministic: a redelivered chunk computes the same key and adopts the object already there."""
    return f"batches/{batch_id}/{item_seq:06d}-{item_id}/{index}.{extension}"


def provenance(*, item_id: str, batch_id: str, external_id: str | None, prompt: str, seed: int, index: int,
               model: str, weights_sha256: str, params: str, extra: dict[str, str] | None = None) -> dict[str, Any]:
    """What the file carries (PNG text chunks, WebP/JPEG XMP): enough to find the ledger rows and to regenerate it."""
    return {
        "item_id": item_id, "batch_id": batch_id, "external_id": external_id, "prompt": prompt,
        "seed": seed, "index": index, "model": model, "weights_sha256": weights_sha256, "params": params,
        **(extra or {}),
    }


def object_metadata(record: dict[str, Any]) -> dict[str, str]:
    """The same provenance as S3 object metadata: strings, no None, the prompt cut to fit 2 KB."""
    metadata = {name: str(value) for name, value in record.items() if value is not None}
    prompt = metadata.get("prompt", "")
    metadata["prompt_sha256"] = hashlib.sha256(prompt.encode()).hexdigest()
    metadata["prompt"] = _cut_to_encoded_size(prompt, METADATA_PROMPT_BYTES)
    return metadata


def _cut_to_encoded_size(text: str, limit: int) -> str:
    if len(quote(text)) <= limit:
        return text
    cut = text[:limit]
    while len(quote(cut)) > limit - 3:
        cut = cut[: max(len(cut) - 16, 0)] if len(cut) > 16 else cut[:-1]
    return cut + "..."
