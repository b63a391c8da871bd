"""From a product catalogue to a batch's items: a prompt template over rows, multiplied by variants.

Shared by the API (``POST /v1/batches`` and ``:preview`` with a ``template``) and the CLI
(``instabatch run --template``, ``instabatch preview``). Rows come from JSON objects or a catalogue
CSV; each row renders one prompt per variant (Jinja2, sandboxed: a template cannot reach Python
objects; StrictUndefined: a missing or empty column is an error naming the row's line and the
column). An item's external id is its SKU (a column, or a template) plus its variant values
(``SKU-123/white/front``), and its seed a hash of those (core/params.py ``catalogue_seed``), so a
rerun draws the same seeds and a new row moves nobody else's (docs/architecture.md, "Catalogues").

Every problem is collected rather than the first raised, so one preview lists them all.
"""
from __future__ import annotations

import csv
import io
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from jinja2 import StrictUndefined, TemplateSyntaxError, Undefined, UndefinedError, nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from core.ledger import ItemSpec
from core.params import catalogue_seed

MAX_EXTERNAL_ID_CHARS = 200  # items.external_id
VARIANT_SEPARATOR = "/"
Combine = Literal["product", "zip"]
Check = Callable[[str], Iterable[tuple[str, str]]]  # prompt -> (rule name, message) per broken rule


class CatalogueError(ValueError):
    """The catalogue as a whole cannot be expanded (a template that does not parse, an unreadable CSV,
    variant lists of unequal length for zip...): nothing is rendered. ``details`` says where."""

    def __init__(self, message: str, **details: Any):
        super().__init__(message)
        self.details = details


class MissingColumn(UndefinedError):
    """A template read a column the row does not have (or has empty)."""

    def __init__(self, name: str):
        super().__init__(f"the column {name!r} is missing or empty")
        self.name = name


def _missing_column(undefined: Undefined, *_args: Any, **_kwargs: Any) -> Any:
    raise MissingColumn(undefined._undefined_name or "?")


# StrictUndefined whose every failing operation says which name was missing: each method that
# jinja2 points at its generic failure is pointed at ours instead.
_FAIL = Undefined._fail_with_undefined_error
_Strict = type("_Strict", (StrictUndefined,), {
    name: _missing_column for cls in (Undefined, StrictUndefined) for name, value in vars(cls).items() if value is _FAIL
})


@dataclass(frozen=True)
class TemplateSpec:
    """How rows become items: templates for the prompt and the SKU (or a SKU column), and variants."""

    prompt: str
    external_id: str | None = None  # a template, e.g. "{{ sku }}"
    external_id_column: str | None = None  # or a column's value, as is
    variants: tuple[tuple[str, tuple[str, ...]], ...] = ()  # ordered: name -> values
    combine: Combine = "product"
    num_images: int = 1

    def combinations(self) -> list[tuple[tuple[str, str], ...]]:
        """Each variant as ((name, value), ...); one empty combination without variants."""
        names = [name for name, _ in self.variants]
        lists = [values for _, values in self.variants]
        if self.combine == "zip":
            if len({len(values) for values in lists}) > 1:
                raise CatalogueError("combine 'zip' needs variant lists of equal length",
                                     lengths={name: len(values) for name, values in self.variants})
            rows = list(zip(*lists)) if lists else [()]
        else:
            rows = list(itertools.product(*lists))
        return [tuple(zip(names, values)) for values in rows]


@dataclass(frozen=True)
class CatalogueRow:
    index: int  # 0-based position among the rows
    values: Mapping[str, Any]
    line: int | None = None  # the CSV line the row starts on

    @property
    def where(self) -> str:
        return f"line {self.line}" if self.line is not None else f"row {self.index + 1}"


@dataclass(frozen=True)
class RowProblem:
    """Why a row (or one variant of it) cannot become an item."""

    row: int  # 1-based
    line: int | None
    column: str | None
    message: str
    rule: str | None = None
    external_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "line": self.line, "column": self.column, "message": self.message,
                "rule": self.rule, "external_id": self.external_id}


@dataclass
class Expansion:
    items: list[ItemSpec] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    rows: int = 0
    variants_per_row: int = 1

    def report(self, problem: RowProblem) -> None:
        """Keep a problem once per row: a missing column breaks every variant of the row alike."""
        if not any((p.row, p.column, p.message, p.rule) == (problem.row, problem.column, problem.message, problem.rule)
                   for p in self.problems[-self.variants_per_row:]):
            self.problems.append(problem)


def read_csv_rows(text: str) -> tuple[list[str], list[CatalogueRow]]:
    """A catalogue CSV's header and rows (blank lines skipped; empty cells left out, so a template
    reading one fails by name), each with the line it starts on."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    try:
        header = [column.strip() for column in next(reader, [])]
        if not any(header) or len(set(header)) != len(header) or not all(header):
            raise CatalogueError("the catalogue CSV needs a header row of distinct, non-empty column names",
                                 line=1, header=header)
        rows, start = [], reader.line_num + 1
        for cells in reader:
            if any(cell.strip() for cell in cells):
                if len(cells) > len(header):
                    raise CatalogueError(f"line {start} has {len(cells)} fields, the header has {len(header)}",
                                         line=start)
                values = {name: cell.strip() for name, cell in zip(header, cells) if cell.strip()}
                rows.append(CatalogueRow(len(rows), values, start))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise CatalogueError(f"the catalogue CSV cannot be read: {exc}", line=reader.line_num) from None
    return header, rows


def json_rows(rows: Sequence[Mapping[str, Any]]) -> list[CatalogueRow]:
    """JSON rows; null and empty-string values count as missing, like empty CSV cells."""
    return [CatalogueRow(index, {name: value for name, value in row.items() if value is not None and value != ""})
            for index, row in enumerate(rows)]


class _Sandbox(SandboxedEnvironment):
    """The sandbox, also bounded in work: a submitter's template runs in the API process, once per
    row and variant, so ``**`` and repeating a string or list with ``*`` are refused (``'x' * 10**9``)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" or isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple)):
            raise SecurityError(f"the operator {operator!r} is not allowed here")
        return super().call_binop(context, operator, left, right)


# Filters whose output is bounded by their input: not center(10**9), lipsum, range and the like.
SAFE_FILTERS = ("abs", "capitalize", "d", "default", "first", "float", "int", "join", "last", "length", "lower",
                "replace", "reverse", "round", "sort", "string", "title", "trim", "truncate", "unique", "upper",
                "wordcount")
# Prompts need variables, filters and if/else; loops, macros and other templates only cost time.
UNSUPPORTED = (nodes.For, nodes.Macro, nodes.CallBlock, nodes.Import, nodes.FromImport, nodes.Include,
               nodes.Extends, nodes.Block, nodes.FilterBlock, nodes.With)


class Renderer:
    """The spec's templates compiled once in a sandbox."""

    def __init__(self, spec: TemplateSpec):
        self.spec = spec
        env = _Sandbox(undefined=_Strict, autoescape=False)
        env.filters = {name: env.filters[name] for name in SAFE_FILTERS}
        env.globals.clear()
        self.prompt = _compile(env, spec.prompt, "prompt")
        self.external_id = _compile(env, spec.external_id, "external_id") if spec.external_id else None
        if spec.external_id is None and spec.external_id_column is None:
            raise CatalogueError("name the SKU: template.external_id (a template) or template.external_id_column")

    def sku(self, row: CatalogueRow) -> str:
        if self.external_id is not None:
            return _one_line(self.external_id.render(row.values))
        if self.spec.external_id_column not in row.values:
            raise MissingColumn(self.spec.external_id_column or "?")
        return _one_line(str(row.values[self.spec.external_id_column]))


def _compile(env: SandboxedEnvironment, source: str, name: str) -> Any:
    try:
        tree = env.parse(source)
        for node in tree.find_all(UNSUPPORTED):
            raise CatalogueError(f"template.{name} line {node.lineno}: {type(node).__name__.lower()} is not "
                                 "supported in catalogue templates (variables, filters and if/else are)",
                                 template=name, template_line=node.lineno)
        return env.from_string(tree)
    except TemplateSyntaxError as exc:  # and TemplateAssertionError: an unknown filter
        raise CatalogueError(f"template.{name} does not parse: {exc.message} (template line {exc.lineno})",
                             template=name, template_line=exc.lineno) from None


def _one_line(text: str) -> str:
    return " ".join(text.split())


def count_items(spec: TemplateSpec, rows: int) -> int:
    return rows * len(spec.combinations())


def expand(spec: TemplateSpec, rows: Sequence[CatalogueRow], *, check: Check | None = None,
           max_prompt_chars: int = 2000) -> Expansion:
    """Every row times every variant as an item, or a problem saying which row, line and column."""
    renderer = Renderer(spec)
    combinations = spec.combinations()
    expansion = Expansion(rows=len(rows), variants_per_row=len(combinations))
    seen: dict[str, int] = {}
    for row in rows:
        try:
            sku = renderer.sku(row)
        except TemplateError as exc:
            expansion.report(_problem(row, exc, "external_id"))
            continue
        if not sku:
            expansion.report(RowProblem(row.index + 1, row.line, spec.external_id_column,
                                                 "the external id (SKU) renders empty"))
            continue
        for combination in combinations:
            _render_variant(renderer, row, sku, combination, expansion, seen, check, max_prompt_chars)
    return expansion


def _render_variant(renderer: Renderer, row: CatalogueRow, sku: str, combination: tuple[tuple[str, str], ...],
                    expansion: Expansion, seen: dict[str, int], check: Check | None, max_prompt_chars: int) -> None:
    values = [value for _, value in combination]
    external_id = VARIANT_SEPARATOR.join([sku, *values])
    problem = _partial(row, external_id)
    try:
        prompt = _one_line(renderer.prompt.render({**row.values, **dict(combination)}))
    except TemplateError as exc:
        expansion.report(_problem(row, exc, "prompt", external_id))
        return
    if not prompt:
        expansion.report(problem(None, "the prompt renders empty"))
    elif len(prompt) > max_prompt_chars:
        expansion.report(problem(None, f"the prompt has {len(prompt)} characters, over {max_prompt_chars}"))
    elif len(external_id) > MAX_EXTERNAL_ID_CHARS:
        expansion.report(problem(None, f"the external id has over {MAX_EXTERNAL_ID_CHARS} characters"))
    elif external_id in seen:
        expansion.report(problem(None, f"the external id {external_id!r} repeats row {seen[external_id]}"))
    else:
        broken = list(check(prompt)) if check else []
        for rule, message in broken:
            expansion.report(problem(None, message, rule))
        if not broken:
            seen[external_id] = row.index + 1
            expansion.items.append(ItemSpec(prompt=prompt, external_id=external_id,
                                            seed=catalogue_seed(sku, values), num_images=renderer.spec.num_images))


def _partial(row: CatalogueRow, external_id: str) -> Callable[..., RowProblem]:
    def make(column: str | None, message: str, rule: str | None = None) -> RowProblem:
        return RowProblem(row.index + 1, row.line, column, message, rule, external_id)
    return make


def _problem(row: CatalogueRow, exc: TemplateError, template: str, external_id: str | None = None) -> RowProblem:
    if isinstance(exc, MissingColumn):
        message = f"{row.where}: template.{template} reads the column {exc.name!r}, missing or empty in this row"
        return RowProblem(row.index + 1, row.line, exc.name, message, external_id=external_id)
    kind = "the sandbox refused" if isinstance(exc, SecurityError) else "rendering failed"
    return RowProblem(row.index + 1, row.line, None, f"{row.where}: template.{template}: {kind}: {exc}",
                      external_id=external_id)
