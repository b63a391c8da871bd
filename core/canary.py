"""Canary roll-out: a fraction of a team's items go to a candidate model, compared by QC verdicts.

An admin starts a canary for a team (candidate model, fraction 0 < f <= 0.5), or a submitter asks
for one on a single batch (``canary: {model, fraction}``, fraction up to 1). At submission exactly
round(f * n) of the batch's items get ``items.model`` = the candidate, chosen by a hash of (batch
id, item position), so the choice is deterministic and spread through the batch; the batch records
the canary (``batches.canary``) with the params its candidate items run with. Responses and the
report count QC verdicts per model that ran. Promote makes the candidate the team's default model
(``team_settings.default_model``, used by batches that name none); roll back ends the canary and
puts its queued items back on the default. Start, promote and roll back are audit events naming
who, the team, both models and the fraction (docs/models.md, "Canary roll-out").

Torch-free: the API and the CLI use it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Select, func, select, update
from sqlalchemy.orm import Session

from core import audit
from core.params import GenerationParams
from core.registry import DEFAULT_ALIAS, UnknownModelError, get_registry
from core.teams import team_settings
from models import Batch, Canary, Image, Item, ItemState, Verdict, utcnow

ACTIVE, PROMOTED, ROLLED_BACK = "active", "promoted", "rolled_back"
MAX_TEAM_FRACTION = 0.5  # a team canary is a comparison, never the majority of the team's work
VERDICTS = ("pass", "review", "reject", "unchecked")


class CanaryError(ValueError):
    """A canary that cannot be: unknown or same model, bad fraction, params the candidate cannot run."""

    def __init__(self, message: str, *, field: str = "model", code: str = "bad_canary"):
        super().__init__(message)
        self.field, self.code = field, code


class CanaryConflict(CanaryError):
    """The team already has an active canary (start)."""


class NoActiveCanary(CanaryError):
    """Promote or roll back with no active canary."""


@dataclass(frozen=True)
class Planned:
    """A batch's params after the team's default model, and the canary its items are split by."""

    params: GenerationParams
    canary: dict[str, Any] | None
    notes: list[str]


# -- the team's models ----------------------------------------------------------------------

def team_default_model(session: Session, team: str) -> str:
    """The registry name a team's batches run when they name no model: a promoted candidate, else
    the registry's default (also when the stored name left the registry)."""
    row = team_settings(session, team)
    registry = get_registry()
    if row is not None and row.default_model in registry.models:
        return row.default_model
    return registry.default


def active_canary(session: Session, team: str) -> Canary | None:
    return session.scalar(select(Canary).where(Canary.team == team, Canary.state == ACTIVE))


def canaries(session: Session, team: str | None = None) -> list[Canary]:
    query = select(Canary).order_by(Canary.id.desc())
    return list(session.scalars(query.where(Canary.team == team) if team else query))


def check_candidate(model: str, base_model: str, fraction: float, max_fraction: float) -> str:
    """The candidate's registry name; CanaryError when it is unknown or the base model, or the fraction
    is out of range."""
    registry = get_registry()
    try:
        candidate = registry.resolve(model)
    except UnknownModelError as exc:
        raise CanaryError(str(exc)) from None
    if candidate == registry.resolve(base_model):
        raise CanaryError(f"the candidate {candidate!r} is the model the items run anyway: name another one")
    if not 0 < fraction <= max_fraction:
        raise CanaryError(f"fraction must be more than 0 and at most {max_fraction} (got {fraction})", field="fraction")
    return candidate


# -- admin commands (audited; the caller commits) -------------------------------------------------

def start(session: Session, team: str, model: str, fraction: float, *, actor: str) -> Canary:
    """Start sending ``fraction`` of the team's items to ``model``. Two admins starting at once
    collide on the one-active-per-team index: the second gets an IntegrityError."""
    if active_canary(session, team) is not None:
        raise CanaryConflict(f"team {team!r} already has an active canary: promote or roll it back first",
                             code="canary_active")
    base = team_default_model(session, team)
    candidate = check_candidate(model, base, fraction, MAX_TEAM_FRACTION)
    row = Canary(team=team, model=candidate, base_model=base, fraction=fraction, state=ACTIVE, started_by=actor,
                 started_at=utcnow())
    session.add(row)
    session.flush()
    audit.record(session, "canary.started", actor=actor, payload={
        "team": team, "canary_id": row.id, "model": candidate, "base_model": base, "fraction": fraction})
    return row


def promote(session: Session, team: str, *, actor: str) -> Canary:
    """The candidate becomes the team's default model; the canary ends. The verdict comparison that
    stood at that moment goes into the audit event."""
    row = _ending(session, team, "promote")
    settings = team_settings(session, team, create=True)
    previous = settings.default_model
    settings.default_model, settings.updated_at = row.model, utcnow()
    _end(session, row, PROMOTED, actor, {"previous_default_model": previous, "default_model": row.model})
    return row


def rollback(session: Session, team: str, *, actor: str) -> Canary:
    """End the canary: later batches run the default model only, and the canary's items still queued
    go back to their batch's model."""
    row = _ending(session, team, "roll back")
    returned = session.execute(
        update(Item).where(Item.state == ItemState.QUEUED.value, Item.model == row.model,
                           Item.batch_id.in_(canary_batches(row)))
        .values(model=None).execution_options(synchronize_session=False)).rowcount
    _end(session, row, ROLLED_BACK, actor, {"queued_items_returned": returned})
    return row


def _ending(session: Session, team: str, verb: str) -> Canary:
    # FOR UPDATE: a promote and a rollback at once end the canary once.
    row = session.scalar(select(Canary).where(Canary.team == team, Canary.state == ACTIVE).with_for_update())
    if row is None:
        raise NoActiveCanary(f"team {team!r} has no active canary to {verb}", code="no_canary")
    return row


def _end(session: Session, row: Canary, state: str, actor: str, extra: dict[str, Any]) -> None:
    row.state, row.ended_by, row.ended_at = state, actor, utcnow()
    session.flush()
    audit.record(session, f"canary.{state}", actor=actor, payload={
        "team": row.team, "canary_id": row.id, "model": row.model, "base_model": row.base_model,
        "fraction": row.fraction, "by_model": compare(session, canary_batches(row)), **extra})


# -- submission ---------------------------------------------------------------------------

def with_model(params: GenerationParams, name: str) -> GenerationParams:
    """``params`` for running model ``name``: the steps and guidance that were the old model's own
    defaults become the new model's (a 4-step flow is not run for 1 step because the batch's model is
    one-step); values the batch chose otherwise, and everything else, stay. ValidationError when the
    result is not valid (a negative prompt with the new model's guidance <= 1)."""
    registry = get_registry()
    old, new = registry.get(params.model), registry.get(name)
    data = params.model_dump(mode="json")
    data["model"] = name
    if params.num_inference_steps == old.steps:
        data["num_inference_steps"] = new.steps
    if params.guidance_scale == old.guidance:
        data["guidance_scale"] = new.guidance
    return GenerationParams.model_validate(data, strict=False)


def plan(session: Session, team: str, params: GenerationParams,
         requested: tuple[str, float] | None = None) -> Planned:
    """The team's default model for a batch that names none, then its canary: the one the request
    asks for (validated: CanaryError), else the team's active one when the batch runs the team's
    default model (a batch that names a model chose it; a team canary does not overrule that)."""
    named, notes = params.model != DEFAULT_ALIAS, []
    default = team_default_model(session, team)
    if not named and default != get_registry().default:
        try:
            params = with_model(params, default)
        except ValidationError as exc:  # the team's default must not refuse a batch the registry's default runs
            notes.append(f"the team's default model {default!r} cannot run these params ({_problems(exc)}): "
                         f"the registry's default runs them")
    base = get_registry().resolve(params.model)
    if requested is not None:
        model, fraction = requested
        candidate = check_candidate(model, base, fraction, 1.0)
        return Planned(params, _batch_canary(params, candidate, fraction, "request", None), notes)
    team_canary = None if named else active_canary(session, team)
    if team_canary is None or team_canary.model == base:
        return Planned(params, None, notes)
    try:
        return Planned(params, _batch_canary(params, team_canary.model, team_canary.fraction, "team",
                                             team_canary.id), notes)
    except CanaryError as exc:  # the team's canary must never refuse a batch: this one runs without it
        return Planned(params, None, [*notes, f"the team's canary is not applied to this batch: {exc}"])


def _batch_canary(params: GenerationParams, candidate: str, fraction: float, source: str,
                  canary_id: int | None) -> dict[str, Any]:
    try:
        candidate_params = with_model(params, candidate)
    except ValidationError as exc:
        raise CanaryError(f"the candidate {candidate!r} cannot run this batch's params: {_problems(exc)}") from None
    return {"model": candidate, "base_model": get_registry().resolve(params.model), "fraction": fraction,
            "source": source, "canary_id": canary_id, "params": candidate_params.model_dump(mode="json")}


def _problems(exc: ValidationError) -> str:
    return "; ".join(error["msg"].removeprefix("Value error, ") for error in exc.errors())


def assign(batch_id: str, count: int, fraction: float) -> list[int]:
    """The item positions that run the candidate: exactly round(fraction * count) (halves up, in decimal,
    so 0.3 of 10 is 3), the ones whose sha256(batch id:position) ranks lowest. Deterministic, and spread
    through the batch rather than its first rows (which are often one product family)."""
    wanted = int((Decimal(str(fraction)) * count).quantize(Decimal(1), rounding=ROUND_HALF_UP))
    ranked = sorted(range(count), key=lambda seq: hashlib.sha256(f"{batch_id}:{seq}".encode()).digest())
    return sorted(ranked[:min(wanted, count)])


def item_params(batch_params: dict[str, Any], batch_canary: dict[str, Any] | None, model: str) -> dict[str, Any]:
    """The params an item with ``items.model`` runs with: the batch's canary's when it names that model."""
    if batch_canary and batch_canary.get("model") == model and batch_canary.get("params"):
        return batch_canary["params"]
    return with_model(GenerationParams.from_batch(batch_params), model).model_dump(mode="json")


# -- the comparison -------------------------------------------------------------------------

def canary_batches(row: Canary) -> Select[tuple[str]]:
    """The ids of the batches submitted under a team canary (a subquery)."""
    return select(Batch.id).where(Batch.team == row.team, Batch.canary["canary_id"].as_integer() == row.id)


def compare(session: Session, batch_ids: Select[tuple[str]] | Sequence[str]) -> list[dict[str, Any]]:
    """Images per QC verdict for each model that ran (``images.model_id``), with pass, review and
    reject rates, over the given batches; most images first."""
    rows = session.execute(select(Image.model_id, Image.qc_verdict, func.count())
                           .where(Image.batch_id.in_(batch_ids)).group_by(Image.model_id, Image.qc_verdict))
    return model_rates((model, verdict, n) for model, verdict, n in rows)


def compare_batches(session: Session, batch_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """:func:`compare` for each batch, in one query."""
    found: dict[str, list[tuple[str, str | None, int]]] = {batch_id: [] for batch_id in batch_ids}
    if batch_ids:
        rows = session.execute(select(Image.batch_id, Image.model_id, Image.qc_verdict, func.count())
                               .where(Image.batch_id.in_(list(batch_ids)))
                               .group_by(Image.batch_id, Image.model_id, Image.qc_verdict))
        for batch_id, model, verdict, n in rows:
            found[batch_id].append((model, verdict, n))
    return {batch_id: model_rates(rows) for batch_id, rows in found.items()}


def model_rates(rows: Iterable[tuple[str, str | None, int]]) -> list[dict[str, Any]]:
    by_model: dict[str, dict[str, Any]] = {}
    for model, verdict, n in rows:
        entry = by_model.setdefault(model, {"model": model, "images": 0, **dict.fromkeys(VERDICTS, 0)})
        entry[verdict if verdict in (v.value for v in Verdict) else "unchecked"] += n
        entry["images"] += n
    for entry in by_model.values():
        for verdict in ("pass", "review", "reject"):
            entry[f"{verdict}_rate"] = round(entry[verdict] / entry["images"], 4) if entry["images"] else 0.0
    return sorted(by_model.values(), key=lambda entry: (-entry["images"], entry["model"]))


def status(session: Session, row: Canary) -> dict[str, Any]:
    """A canary as the CLI and the API show it, with its comparison so far."""
    batches = session.scalar(select(func.count()).select_from(canary_batches(row).subquery()))
    return {"id": row.id, "team": row.team, "model": row.model, "base_model": row.base_model,
            "fraction": row.fraction, "state": row.state, "started_by": row.started_by, "started_at": row.started_at,
            "ended_by": row.ended_by, "ended_at": row.ended_at, "batches": batches,
            "by_model": compare(session, canary_batches(row))}
