"""A batch from a catalogue (template + rows or a catalogue CSV), the preview of any batch, brand rules."""
from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from api.schemas.batches import MAX_NAME_CHARS, MAX_URL_CHARS, Priority, RequestedParams
from api.schemas.common import RequestModel, ResponseModel, StrippedText, UtcDatetime
from core.brand import BrandRules
from core.catalogue import Combine, TemplateSpec
from core.params import GenerationParams
from core.settings import get_settings
from core.text import Text

MAX_TEMPLATE_CHARS = 4000
MAX_VARIANTS = 8
MAX_VARIANT_VALUES = 100
Cell = str | int | float | bool | None


class CatalogueTemplate(RequestModel):
    """How each catalogue row becomes items (``examples/catalogue-template.json``)."""

    prompt: Text = Field(min_length=1, max_length=MAX_TEMPLATE_CHARS,
                         description="Jinja2 (sandboxed); each column is a variable, as is each variant name")
    external_id: Text | None = Field(None, max_length=MAX_TEMPLATE_CHARS,
                                     description="the SKU as a template, e.g. '{{ sku }}'")
    external_id_column: Text | None = Field(None, max_length=MAX_NAME_CHARS, description="or the SKU's column")
    variants: dict[Text, list[Text]] = Field(
        default_factory=dict, description="name -> values; each combination is an item 'SKU/value/value'")
    combine: Combine = Field("product", description="product: every combination; zip: the lists side by side")
    num_images: int = Field(1, ge=1)

    @field_validator("variants")
    @classmethod
    def _variants(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        if len(value) > MAX_VARIANTS:
            raise ValueError(f"at most {MAX_VARIANTS} variant lists")
        for name, values in value.items():
            if not name.isidentifier():
                raise ValueError(f"variant name {name!r} must be a template variable name (letters, digits, _)")
            if not 1 <= len(values) <= MAX_VARIANT_VALUES or len(set(values)) != len(values):
                raise ValueError(f"variant {name!r} needs 1 to {MAX_VARIANT_VALUES} distinct values")
            if any(not v.strip() or "/" in v for v in values):
                raise ValueError(f"variant {name!r}: values must be non-empty and contain no '/' (the id separator)")
        return value

    @field_validator("num_images")
    @classmethod
    def _images(cls, value: int) -> int:
        if value > get_settings().max_images_per_item:
            raise ValueError(f"must be at most {get_settings().max_images_per_item}")
        return value

    @model_validator(mode="after")
    def _one_sku(self) -> "CatalogueTemplate":
        if (self.external_id is None) == (self.external_id_column is None):
            raise ValueError("give the SKU as exactly one of external_id (a template) or external_id_column")
        return self

    def to_spec(self) -> TemplateSpec:
        return TemplateSpec(
            prompt=self.prompt, external_id=self.external_id, external_id_column=self.external_id_column,
            variants=tuple((name, tuple(v.strip() for v in values)) for name, values in self.variants.items()),
            combine=self.combine, num_images=self.num_images,
        )


class CatalogueBatchCreate(RequestModel):
    """``POST /v1/batches`` (and ``:preview``) from a catalogue: a template plus ``rows`` or ``catalogue_csv``."""

    name: StrippedText = Field(min_length=1, max_length=MAX_NAME_CHARS)
    template: CatalogueTemplate
    rows: list[dict[Text, Cell]] | None = Field(None, description="catalogue rows as JSON objects")
    catalogue_csv: Text | None = Field(None, description="or the catalogue as CSV text with a header row")
    params: RequestedParams = Field(default_factory=GenerationParams)
    priority: Priority = "normal"
    webhook_url: Text | None = Field(None, max_length=MAX_URL_CHARS, description="http or https URL")

    @model_validator(mode="after")
    def _one_source(self) -> "CatalogueBatchCreate":
        if (self.rows is None) == (self.catalogue_csv is None):
            raise ValueError("give the catalogue as exactly one of rows or catalogue_csv")
        if self.rows is not None and not self.rows:
            raise ValueError("rows must not be empty")
        return self


class PreviewItem(ResponseModel):
    external_id: str | None
    prompt: str
    seed: int | None
    num_images: int


class RowProblemOut(ResponseModel):
    row: int = Field(description="1-based row (or item) number")
    line: int | None = Field(description="the catalogue CSV line the row starts on")
    column: str | None = Field(description="the column the template could not read")
    message: str
    rule: str | None = Field(description="the brand rule broken")
    external_id: str | None


class BatchPreview(ResponseModel):
    """What a batch would be; nothing is queued."""

    ok: bool = Field(description="true when submitting this body would be accepted")
    items: int
    images: int
    rows: int | None = Field(description="catalogue rows (null for a list of prompts)")
    variants_per_row: int | None
    prompts: list[PreviewItem] = Field(description="the first items")
    estimated_device_seconds: float
    device_images_per_second: float = Field(description="the measured rate the estimate uses")
    params: dict[str, Any] = Field(description="after the brand rules' defaults")
    brand_rules_version: int | None
    problems: list[RowProblemOut]
    notes: list[str]


class BrandRulesOut(ResponseModel):
    team: str
    version: int
    rules: BrandRules
    created_by: str
    created_at: UtcDatetime
