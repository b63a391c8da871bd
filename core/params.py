"""How a batch's images are made: the parameters and the seed range, read by every layer.

One definition serves the API's request schemas (validated at submission), the CLI's prompt
files and the worker (which reads them back from ``batch.params``). Torch-free: the API process
never loads torch.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from core.settings import get_settings
from core.text import Text

# Item seeds live in [0, MAX_SEED]: torch's CPU generator reads 32 bits, so a larger seed would
# draw the same noise as a smaller one.
MAX_SEED = 2**32 - 1
MAX_GUIDANCE = 20.0
MAX_STEPS = 50
STRICT = ConfigDict(extra="forbid", strict=True)  # unknown fields are errors; "5" is no int


def integral(value: Any) -> Any:
    """JSON has one number type: ``15.0`` is the integer 15 (as JSON Schema says), ``15.5`` is not."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# An integer field of a request body: strict (no "5"), but a JSON number with no fraction counts.
# (With ge/le in a union, write Annotated[int, Field(ge=..), BeforeValidator(integral)]: in this
# order pydantic still writes minimum/maximum into the JSON schema.)
WholeNumber = Annotated[int, BeforeValidator(integral)]


def image_seed(item_seed: int, index: int) -> int:
    """Image ``index`` of an item draws from ``seed + index``, wrapped into the seed range: an
    unwrapped 2**32 would repeat seed 0's noise."""
    return (item_seed + index) % (MAX_SEED + 1)


def catalogue_seed(sku: str, variant: Sequence[str] = ()) -> int:
    """An item's seed from its catalogue SKU and variant values alone (docs/architecture.md, "Catalogues").

    A hash, not a counter: a rerun of the catalogue draws the same seeds, and adding, removing or
    reordering rows moves no other item's seed."""
    key = json.dumps([sku, *variant], ensure_ascii=False, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % (MAX_SEED + 1)


class RefineParams(BaseModel):
    """``params.refine``: whether and how to polish the one-step images."""

    model_config = STRICT

    enabled: bool = False
    strength: float = Field(0.3, ge=0.1, le=0.9, allow_inf_nan=False,
                            description="share of the flow re-run by the refiner: t0 = 1 - strength")
    steps: WholeNumber = Field(4, ge=1, le=MAX_STEPS, description="refiner steps actually run")
    upscale: Literal[1, 2] = Field(1, description="resize factor before refining")


Corner = Literal["top-left", "top-right", "bottom-left", "bottom-right"]
SHA256_HEX = r"^[0-9a-f]{64}$"


class LogoParams(BaseModel):
    """``params.logo``: the team's logo composited onto every image (set from its brand rules, never by
    a submitter; worker/logo.py draws it)."""

    model_config = STRICT

    sha256: str = Field(pattern=SHA256_HEX, description="the uploaded logo PNG's sha256")
    corner: Corner = "bottom-right"
    scale: float = Field(0.2, ge=0.02, le=0.5, allow_inf_nan=False, description="logo width / image width")
    opacity: float = Field(0.85, ge=0.05, le=1.0, allow_inf_nan=False, description="multiplies the logo's alpha")
    margin: float = Field(0.03, ge=0.0, le=0.2, allow_inf_nan=False, description="gap to the edges / image width")
    keep_unmarked: bool = Field(False, description="also store the image without the logo")


class OutputParams(BaseModel):
    """``params.output``: the file format of the batch's images (docs/architecture.md, "Output formats")."""

    model_config = STRICT

    format: Literal["png", "webp", "jpeg"] = Field("png", description="png (lossless), webp or jpeg")
    quality: WholeNumber = Field(90, ge=1, le=100, description="webp and jpeg quality; png ignores it "
                                                       "(its zlib level is the INSTABATCH_PNG_COMPRESS_LEVEL setting)")


# The JSON schema states the limits the validators below apply, read from the settings when the
# schema is built (the API's /openapi.json), and the two rules that tie fields together.
SIDE_DESCRIPTION = "multiple of 8 within MIN/MAX_IMAGE_SIDE; default: the model's size"


def side_schema(schema: dict[str, Any]) -> None:
    settings = get_settings()
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "integer":
            option.update(multipleOf=8, minimum=settings.min_side, maximum=settings.max_side)


def _prompt_limit_schema(schema: dict[str, Any]) -> None:
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "string":
            option["maxLength"] = get_settings().max_prompt_chars


def refined_size_rule() -> dict[str, Any]:
    """Upscaling by 2 doubles the stored image: then each side is at most half of MAX_IMAGE_SIDE."""
    half = get_settings().max_side // 2
    at_most_half = {"anyOf": [{"type": "null"}, {"type": "integer", "maximum": half}]}
    upscaled = {"type": "object", "required": ["enabled", "upscale"],
                "properties": {"enabled": {"const": True}, "upscale": {"const": 2}}}
    return {"if": {"required": ["refine"], "properties": {"refine": upscaled}},
            "then": {"properties": {"width": at_most_half, "height": at_most_half}}}


def refined_size_schema(schema: dict[str, Any]) -> None:
    schema["allOf"] = [refined_size_rule()]


def _model_names_schema(schema: dict[str, Any]) -> None:
    from core.registry import DEFAULT_ALIAS, get_registry

    schema["enum"] = [DEFAULT_ALIAS, *get_registry().names()]


def _rules_schema(schema: dict[str, Any]) -> None:
    schema["allOf"] = [
        {"if": {"required": ["negative_prompt"], "properties": {"negative_prompt": {"type": "string", "minLength": 1}}},
         "then": {"required": ["guidance_scale"], "properties": {"guidance_scale": {"exclusiveMinimum": 1.0}}}},
        refined_size_rule(),
    ]


class GenerationParams(BaseModel):
    """``params``: how every image of the batch is generated."""

    model_config = ConfigDict(**STRICT, json_schema_extra=_rules_schema)

    width: WholeNumber | None = Field(None, description=SIDE_DESCRIPTION, json_schema_extra=side_schema)
    height: WholeNumber | None = Field(None, description=SIDE_DESCRIPTION, json_schema_extra=side_schema)
    guidance_scale: float = Field(0.0, ge=0.0, le=MAX_GUIDANCE, allow_inf_nan=False,
                                  description="0 = InstaFlow's single pass; > 1 turns on classifier-free guidance")
    num_inference_steps: WholeNumber = Field(1, ge=1, le=MAX_STEPS, description="Euler steps; 1 for InstaFlow")
    negative_prompt: Text | None = Field(None, description="only with guidance_scale > 1",
                                        json_schema_extra=_prompt_limit_schema)
    refine: RefineParams = Field(default_factory=RefineParams)
    output: OutputParams = Field(default_factory=OutputParams)
    model: str = Field("default", description="a name from the deployment's model registry (GET /v1/models); "
                       "'default' is its default model. Unset steps and guidance take the model's defaults",
                       json_schema_extra=_model_names_schema)
    logo: LogoParams | None = Field(None, description="set from the team's brand rules; not for submitters")

    @classmethod
    def from_batch(cls, params: dict[str, Any] | None) -> "GenerationParams":
        """The params a batch was stored with (validated once already, at submission)."""
        return cls.model_validate(params or {}, strict=False)

    @property
    def refine_options(self) -> dict[str, Any] | None:
        """The refine settings when refining is on, else None."""
        return self.refine.model_dump() if self.refine.enabled else None

    def canonical(self) -> str:
        """The params as recorded in provenance: canonical JSON, so equal params give equal bytes."""
        fields = {"width": self.width, "height": self.height, "num_inference_steps": self.num_inference_steps,
                  "guidance_scale": float(self.guidance_scale), "negative_prompt": self.negative_prompt or None,
                  "refine": self.refine_options}
        if self.logo is not None:  # only when set: the provenance of unbranded images stays as it was
            fields["logo"] = self.logo.model_dump()
        if self.output != OutputParams():  # PNG, as before formats: the same provenance, the same bytes
            fields["output"] = self.output.model_dump()
        return json.dumps(fields, sort_keys=True, separators=(",", ":"))

    @field_validator("width", "height")
    @classmethod
    def _side(cls, value: int | None) -> int | None:
        if value is None:
            return value
        settings = get_settings()
        if value % 8 or not settings.min_side <= value <= settings.max_side:
            raise ValueError(f"must be a multiple of 8 from {settings.min_side} to {settings.max_side}")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _negative_prompt_length(cls, value: str | None) -> str | None:
        if value is not None and len(value) > get_settings().max_prompt_chars:
            raise ValueError(f"must have at most {get_settings().max_prompt_chars} characters")
        return value

    @field_validator("model")
    @classmethod
    def _known_model(cls, value: str) -> str:
        from core.registry import get_registry

        get_registry().resolve(value)  # UnknownModelError (a ValueError) lists the names served
        return value

    @model_validator(mode="before")
    @classmethod
    def _model_defaults(cls, data: Any) -> Any:
        """A batch that names a model and sets no steps or guidance gets the model's own (the teacher's
        25 steps and guidance 2, say): filled in before validation, so the stored params say what ran."""
        if not isinstance(data, dict) or data.get("model") in (None, "default"):
            return data
        from core.registry import UnknownModelError, get_registry

        try:
            spec = get_registry().get(data["model"])
        except (UnknownModelError, TypeError):
            return data  # the field validator reports it
        defaults = {"num_inference_steps": spec.steps, "guidance_scale": spec.guidance}
        return {**{k: v for k, v in defaults.items() if k not in data}, **data}

    @model_validator(mode="after")
    def _negative_prompt_needs_guidance(self) -> "GenerationParams":
        if self.negative_prompt and self.guidance_scale <= 1.0:
            raise ValueError(
                "negative_prompt needs guidance_scale > 1: one-step InstaFlow has no negative prompt "
                "(with guidance off the model runs one conditional pass and has nowhere to use one)"
            )
        return self

    @model_validator(mode="after")
    def _refined_size_within_bounds(self) -> "GenerationParams":
        """Upscaling doubles the stored image: the refined size must respect MAX_IMAGE_SIDE too."""
        max_side = get_settings().max_side
        if self.refine.enabled and self.refine.upscale == 2:
            too_large = [side for side in (self.width, self.height) if side is not None and 2 * side > max_side]
            if too_large:
                raise ValueError(f"refine.upscale 2 makes {2 * max(too_large)} pixels, over the "
                                 f"{max_side} allowed: ask for at most {max_side // 2} or upscale 1")
        return self
