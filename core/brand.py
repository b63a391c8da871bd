"""A team's brand rules: versioned in the ledger, applied to every batch the team submits.

Rules name required terms (a prompt must name at least one term of each required rule),
forbidden terms, a default negative prompt, default size, format and refine settings, and the
team's logo. An admin sets them (API or CLI); each change adds a version and an audit event,
and a batch records the version it was made under (docs/architecture.md, "Brand rules").
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import audit
from core.params import (
    SIDE_DESCRIPTION,
    GenerationParams,
    LogoParams,
    RefineParams,
    WholeNumber,
    refined_size_schema,
    side_schema,
)
from core.text import Text
from models import BrandRules as BrandRulesRow
from models import utcnow

RULE_NAME = r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,99}$"
MAX_LOGO_SIDE = 2048
LOGO_PREFIX = "logos/"
NO_NEGATIVE_PROMPT = ("the brand's negative prompt is not applied: guidance is off, and one-step InstaFlow has no "
                      "negative prompt (it runs one conditional pass); set guidance_scale > 1 to use it")


class TermRuleIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(pattern=RULE_NAME, description="named in every refusal")
    terms: list[Text] = Field(min_length=1, max_length=200)


class BrandRules(BaseModel):
    """One version of a team's rules (the body of ``PUT /v1/teams/{team}/brand-rules``)."""

    # The schema states the size limits GenerationParams applies to the defaults (see the validator below).
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=refined_size_schema)

    required: list[TermRuleIn] = Field(default_factory=list, description="each: a prompt names one of its terms")
    forbidden: list[TermRuleIn] = Field(default_factory=list, description="each: a prompt names none of its terms")
    negative_prompt: Text | None = Field(None, max_length=2000, description="applied only when guidance_scale > 1")
    width: WholeNumber | None = Field(None, description=SIDE_DESCRIPTION, json_schema_extra=side_schema)
    height: WholeNumber | None = Field(None, description=SIDE_DESCRIPTION, json_schema_extra=side_schema)
    format: Literal["png"] = Field("png", description="PNG only: provenance travels in its text chunks")
    refine: RefineParams | None = None
    logo: LogoParams | None = Field(None, description="placement of an uploaded logo (PUT .../logo)")

    @model_validator(mode="after")
    def _defaults_are_valid_params(self) -> "BrandRules":
        """Refused when saved, not later at every batch: the defaults must be valid params on their own."""
        refine = self.refine.model_dump() if self.refine else {}
        defaults = {"width": self.width, "height": self.height, "refine": refine}
        try:
            GenerationParams.model_validate(defaults, strict=False)
        except ValidationError as exc:
            raise ValueError("; ".join(f"{'.'.join(map(str, e['loc'])) or 'params'}: {e['msg']}"
                                       for e in exc.errors())) from None
        return self

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class TeamRules:
    """A stored version of a team's rules."""

    team: str
    version: int
    rules: BrandRules
    created_by: str
    created_at: Any


@dataclass
class Branded:
    """A batch's params after the rules' defaults, with what was not applied and why."""

    params: GenerationParams
    version: int | None
    notes: list[str] = field(default_factory=list)


class LogoError(ValueError):
    """The upload is not a PNG with an alpha channel of a usable size."""


def current_rules(session: Session, team: str, version: int | None = None) -> TeamRules | None:
    """The team's latest rules (or the given version); None when it has none."""
    query = select(BrandRulesRow).where(BrandRulesRow.team == team)
    query = query.where(BrandRulesRow.version == version) if version else query.order_by(BrandRulesRow.version.desc())
    row = session.scalars(query.limit(1)).first()
    if row is None:
        return None
    return TeamRules(row.team, row.version, BrandRules.model_validate(row.rules, strict=False),
                     row.created_by, row.created_at)


def set_rules(session: Session, team: str, rules: BrandRules, *, actor: str) -> TeamRules:
    """Add the next version of the team's rules, audited, in the caller's transaction.

    Two admins saving at once collide on (team, version): the second gets an IntegrityError."""
    latest = session.scalar(select(func.max(BrandRulesRow.version)).where(BrandRulesRow.team == team)) or 0
    row = BrandRulesRow(team=team, version=latest + 1, rules=rules.model_dump(mode="json"), created_by=actor,
                        created_at=utcnow())
    session.add(row)
    session.flush()
    audit.record(session, "brand_rules.updated", actor=actor, payload={
        "team": team, "version": row.version, "rules_sha256": rules.sha256(), "rules": row.rules,
    })
    return TeamRules(team, row.version, rules, actor, row.created_at)


def apply_rules(params: GenerationParams, team_rules: TeamRules | None) -> Branded:
    """The rules' defaults for what the batch left unset, and the team's logo (always the rules')."""
    if team_rules is None:
        return Branded(params.model_copy(update={"logo": None}), None)
    rules, chosen = team_rules.rules, params.model_fields_set
    update: dict[str, Any] = {name: getattr(rules, name) for name in ("width", "height", "refine")
                              if getattr(rules, name) is not None and name not in chosen}
    notes = []
    if rules.negative_prompt and "negative_prompt" not in chosen:
        if params.guidance_scale > 1:
            update["negative_prompt"] = rules.negative_prompt
        else:
            notes.append(NO_NEGATIVE_PROMPT)
    data = {**params.model_dump(), **{k: v.model_dump() if isinstance(v, BaseModel) else v for k, v in update.items()}}
    data["logo"] = rules.logo.model_dump() if rules.logo else None
    # Validated again: a default size with the batch's upscale must still fit MAX_IMAGE_SIDE.
    return Branded(GenerationParams.model_validate(data, strict=False), team_rules.version, notes)


def logo_key(sha256: str) -> str:
    """Content-addressed and write-once: the same logo uploaded twice is one object."""
    return f"{LOGO_PREFIX}{sha256}.png"


def check_logo(data: bytes) -> tuple[int, int]:
    """The logo's size; LogoError unless it is a PNG with an alpha channel, at most MAX_LOGO_SIDE a side."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            kind, mode, size, transparency = image.format, image.mode, image.size, "transparency" in image.info
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise LogoError(f"not a readable image: {exc}") from None
    if kind != "PNG":
        raise LogoError(f"the logo must be a PNG (got {kind})")
    if mode not in ("RGBA", "LA", "PA") and not transparency:
        raise LogoError(f"the logo must have an alpha channel (got mode {mode})")
    if max(size) > MAX_LOGO_SIDE or min(size) < 1:
        raise LogoError(f"the logo must be 1 to {MAX_LOGO_SIDE} pixels a side (got {size[0]}x{size[1]})")
    return size


def upload_logo(session: Session, store: Any, team: str, data: bytes, *, actor: str,
                placement: dict[str, Any] | None = None) -> TeamRules:
    """Store the logo under its sha256 and make it the team's: a new rules version, audited.

    The placement (corner, scale, opacity, margin, keep_unmarked) is the previous logo's unless
    given. The object is written before the ledger row, like images ("Write-once storage")."""
    width, height = check_logo(data)
    sha256 = hashlib.sha256(data).hexdigest()
    store.put(logo_key(sha256), data, {"sha256": sha256, "team": team}, content_type="image/png")
    previous = current_rules(session, team)
    rules = previous.rules if previous else BrandRules()
    kept = rules.logo.model_dump(exclude={"sha256"}) if rules.logo else {}
    logo = LogoParams.model_validate({**kept, **(placement or {}), "sha256": sha256}, strict=False)
    audit.record(session, "brand_logo.uploaded", actor=actor, payload={
        "team": team, "sha256": sha256, "key": logo_key(sha256), "width": width, "height": height,
    })
    return set_rules(session, team, rules.model_copy(update={"logo": logo}), actor=actor)


def logo_uploaded(store: Any, sha256: str) -> bool:
    return store.head(logo_key(sha256)) is not None
