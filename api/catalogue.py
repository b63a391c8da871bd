"""A batch request planned against the team's brand rules: expanded (catalogues), screened, priced.

Shared by ``POST /v1/batches``, ``POST /v1/batches:preview`` and the CLI (``instabatch run
--template``, ``--dry-run``, ``instabatch preview``). A body with a ``template`` is a catalogue
(``CatalogueBatchCreate``): its rows are expanded by core/catalogue.py; any other body is parsed by
api/intake.py as before. Either way the team's brand rules give the params their defaults and
screen every prompt; a plan with problems is refused whole (422, every problem listed) and a
preview reports them, so nothing is ever half-queued.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session

from api.deps import media_type
from api.errors import APIError, field_errors
from api.intake import JSON_TYPES
from api.schemas import BatchCreate
from api.schemas.canary import CanaryIn
from api.schemas.catalogue import BatchPreview, CatalogueBatchCreate, PreviewItem, RowProblemOut
from core import canary
from core.brand import Branded, TeamRules, apply_rules, current_rules
from core.catalogue import CatalogueError, CatalogueRow, Check, RowProblem, expand, json_rows, read_csv_rows
from core.ledger import BatchSpec, ItemSpec
from core.params import GenerationParams
from core.settings import get_settings
from qc.screening import BrandScreen, TermRule

PREVIEW_PROMPTS = 10
BatchRequest = BatchCreate | CatalogueBatchCreate


@dataclass
class Plan:
    """What a request would submit: its items, params after the rules, and every problem."""

    name: str
    items: list[ItemSpec]
    branded: Branded
    priority: str = "normal"
    webhook_url: str | None = None
    problems: list[RowProblem] = field(default_factory=list)
    rows: int | None = None
    variants_per_row: int | None = None
    canary: dict[str, Any] | None = None  # core/canary.py, ``plan``

    @property
    def images(self) -> int:
        return sum(item.num_images for item in self.items)

    def to_spec(self) -> BatchSpec:
        return BatchSpec(name=self.name, items=self.items, params=self.branded.params.model_dump(mode="json"),
                         priority=self.priority, webhook_url=self.webhook_url, canary=self.canary)


# -- parsing -------------------------------------------------------------------------------

def catalogue_data(content_type: str | None, body: bytes) -> dict[str, Any] | None:
    """The body when it is a JSON object with a ``template`` field (a cheap test first: most bodies are
    lists of prompts); None for anything else, which api/intake.py parses or refuses as before."""
    if media_type(content_type) not in JSON_TYPES or b'"template"' not in body:
        return None
    try:
        data = json.loads(body, parse_constant=_not_json)
    except (ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) and "template" in data else None


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_catalogue(data: Any) -> CatalogueBatchCreate:
    try:
        return CatalogueBatchCreate.model_validate(data, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False, include_context=False)
        raise APIError(422, "the catalogue batch is not valid", details=field_errors(errors, ("body",))) from None


# -- planning ------------------------------------------------------------------------------

def plan_request(session: Session, team: str, request: BatchRequest) -> Plan:
    """The request under the team's current brand rules: never raises for a row's problem."""
    rules = current_rules(session, team)
    if isinstance(request, CatalogueBatchCreate):
        return with_canary(session, team, plan_catalogue(request, rules), None)
    return with_canary(session, team, plan_items(request, rules), request.canary)


def with_canary(session: Session, team: str, plan: Plan, requested: CanaryIn | None) -> Plan:
    """The team's default model for params that name none, and the canary the items are split by:
    the request's, else the team's (core/canary.py). A request's canary that cannot be is a 422."""
    try:
        planned = canary.plan(session, team, plan.branded.params,
                              (requested.model, requested.fraction) if requested else None)
    except canary.CanaryError as exc:
        raise APIError(422, "the batch is not valid", code="bad_canary", details=[{
            "field": f"body.canary.{exc.field}", "loc": ["body", "canary", exc.field], "message": str(exc),
            "type": "value_error"}]) from None
    plan.branded = Branded(planned.params, plan.branded.version, plan.branded.notes + planned.notes)
    plan.canary = planned.canary
    return plan


def plan_items(request: BatchCreate, rules: TeamRules | None) -> Plan:
    items = [item.to_spec() for item in request.items]
    check = brand_check(rules)
    problems = [RowProblem(position + 1, None, "prompt", message, rule, item.external_id)
                for position, item in enumerate(items) for rule, message in check(item.prompt)]
    return Plan(request.name, items, brand_params(request.params, rules), request.priority, request.webhook_url,
                problems)


def plan_catalogue(request: CatalogueBatchCreate, rules: TeamRules | None) -> Plan:
    spec = request.template.to_spec()
    try:
        rows = catalogue_rows(request)
        count = len(rows) * len(spec.combinations())
        limit = get_settings().max_items_per_batch
        if count > limit:
            raise CatalogueError(f"the catalogue expands to {count} items: a batch holds at most {limit}",
                                 items=count, rows=len(rows))
        expansion = expand(spec, rows, check=brand_check(rules), max_prompt_chars=get_settings().max_prompt_chars)
    except CatalogueError as exc:
        raise APIError(422, str(exc), code="bad_catalogue", details=exc.details) from None
    return Plan(request.name, expansion.items, brand_params(request.params, rules), request.priority,
                request.webhook_url, expansion.problems, expansion.rows, expansion.variants_per_row)


def catalogue_rows(request: CatalogueBatchCreate) -> list[CatalogueRow]:
    if request.catalogue_csv is not None:
        return read_csv_rows(request.catalogue_csv)[1]
    return json_rows(request.rows or [])


def brand_params(params: GenerationParams, rules: TeamRules | None) -> Branded:
    if "logo" in params.model_fields_set and params.logo is not None:
        raise APIError(422, "the request is not valid", details=[{
            "field": "body.params.logo", "loc": ["body", "params", "logo"], "type": "value_error",
            "message": "the logo comes from the team's brand rules (PUT /v1/teams/{team}/logo), not the request",
        }])
    try:
        return apply_rules(params, rules)
    except ValidationError as exc:  # a rules default that does not fit this batch (size x upscale)
        errors = exc.errors(include_input=False, include_url=False, include_context=False)
        raise APIError(422, f"the brand rules' defaults (version {rules.version if rules else '-'}) do not fit "
                            "this batch's params", details=field_errors(errors, ("body", "params"))) from None


def brand_check(rules: TeamRules | None) -> Check:
    """prompt -> [(rule name, message)] for every brand rule it breaks."""
    if rules is None:
        return lambda prompt: []
    screen = BrandScreen(
        forbidden=tuple(TermRule(rule.name, tuple(rule.terms)) for rule in rules.rules.forbidden),
        required=tuple(TermRule(rule.name, tuple(rule.terms)) for rule in rules.rules.required),
    )
    return lambda prompt: [(found.rule, found.message) for found in screen.violations(prompt)]


def checked_spec(plan: Plan) -> BatchSpec:
    """The plan as a batch to submit, validated like any other (limits, webhook URL); 422 with every
    row's problem when it has any."""
    if plan.problems:
        raise APIError(422, f"{len(plan.problems)} rows cannot become items: nothing was queued",
                       code="bad_rows", details=[problem.to_dict() for problem in plan.problems])
    if plan.rows is None:  # a list of prompts, validated on the way in; the rules' params validated in apply_rules
        return plan.to_spec()
    data = {"name": plan.name, "priority": plan.priority, "webhook_url": plan.webhook_url,
            "params": plan.branded.params.model_dump(mode="json"),
            "items": [{"prompt": i.prompt, "external_id": i.external_id, "seed": i.seed, "num_images": i.num_images}
                      for i in plan.items]}
    try:
        BatchCreate.model_validate(data, strict=False)
    except ValidationError as exc:
        errors = exc.errors(include_input=False, include_url=False, include_context=False)
        raise APIError(422, "the batch is not valid", details=field_errors(errors, ("body",))) from None
    return plan.to_spec()


# -- preview -------------------------------------------------------------------------------

def device_seconds(images: int, params: GenerationParams, rate: float) -> float:
    """Device time at ``rate`` one-step images per second: each Euler step is a pass (two with guidance),
    each refine step a pass on upscale² the pixels."""
    passes = params.num_inference_steps * (2 if params.guidance_scale > 1 else 1)
    if params.refine.enabled:
        passes += params.refine.steps * params.refine.upscale ** 2
    return round(images * passes / rate, 3)


def preview(plan: Plan) -> BatchPreview:
    rate = get_settings().device_images_per_second
    problems = list(plan.problems)
    ok = not problems
    if ok:
        try:
            checked_spec(plan)
        except APIError as exc:
            ok, problems = False, [RowProblem(0, None, None, f"{exc.message}: {json.dumps(exc.details)[:2000]}")]
    return BatchPreview(
        ok=ok, items=len(plan.items), images=plan.images, rows=plan.rows, variants_per_row=plan.variants_per_row,
        prompts=[PreviewItem(external_id=i.external_id, prompt=i.prompt, seed=i.seed, num_images=i.num_images)
                 for i in plan.items[:PREVIEW_PROMPTS]],
        estimated_device_seconds=device_seconds(plan.images, plan.branded.params, rate),
        device_images_per_second=rate, params=plan.branded.params.model_dump(mode="json"),
        brand_rules_version=plan.branded.version,
        problems=[RowProblemOut(**problem.to_dict()) for problem in problems], notes=plan.branded.notes,
    )
