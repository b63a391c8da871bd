"""Prompt screening before generation: a blocked prompt is never generated.

Two layers: the deployment's blocked terms and patterns (``ScreeningPolicy``, from the QC
settings, checked by the worker), and a team's brand rules (``BrandScreen``: named rules of
forbidden terms, and of required terms of which a prompt must name at least one, checked at
submission and in previews, so a refusal names the rule).

Blocked terms match whole words, case-insensitively, after Unicode NFKC
normalisation (so full-width or ligature look-alikes still match); a multi-word
term matches across any whitespace.  Patterns are Python regexes, searched
case-insensitively in the normalised prompt.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

from qc.settings import QcSettings


@dataclass(frozen=True)
class ScreenResult:
    allowed: bool
    reason: str | None = None  # empty_prompt | prompt_too_long | blocked_term | blocked_pattern
    detail: str | None = None  # the term or pattern that matched

    def to_dict(self) -> dict[str, object]:
        return {"allowed": self.allowed, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class ScreeningPolicy:
    blocked_terms: tuple[str, ...] = ()
    blocked_patterns: tuple[str, ...] = ()
    max_chars: int = 2000

    @classmethod
    def from_settings(cls, settings: QcSettings | None = None) -> ScreeningPolicy:
        settings = settings or QcSettings()
        return cls(tuple(settings.blocked_terms), tuple(settings.blocked_patterns), settings.max_prompt_chars)


def normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def term_regex(term: str) -> re.Pattern | None:
    """A whole-word, whitespace-tolerant regex for a term, searched in ``normalise``d text."""
    words = normalise(term).split()
    if not words:
        return None
    body = r"\s+".join(re.escape(w) for w in words)
    return re.compile(rf"(?<!\w){body}(?!\w)")


@lru_cache(maxsize=64)
def _compiled(policy: ScreeningPolicy) -> tuple[list[tuple[str, re.Pattern]], list[tuple[str, re.Pattern]]]:
    terms = [(term, regex) for term in policy.blocked_terms if (regex := term_regex(term)) is not None]
    patterns = [(p, re.compile(p, re.IGNORECASE)) for p in policy.blocked_patterns]
    return terms, patterns


def screen_prompt(prompt: str, policy: ScreeningPolicy | QcSettings | None = None) -> ScreenResult:
    """Whether a prompt may be generated; when not, a machine-readable reason."""
    if not isinstance(policy, ScreeningPolicy):
        policy = ScreeningPolicy.from_settings(policy)
    if not prompt or not prompt.strip():
        return ScreenResult(False, "empty_prompt")
    if len(prompt) > policy.max_chars:
        return ScreenResult(False, "prompt_too_long", f"{len(prompt)} > {policy.max_chars} characters")
    text = normalise(prompt)
    terms, patterns = _compiled(policy)
    for term, regex in terms:
        if regex.search(text):
            return ScreenResult(False, "blocked_term", term)
    for pattern, regex in patterns:
        if regex.search(text):
            return ScreenResult(False, "blocked_pattern", pattern)
    return ScreenResult(True)


@dataclass(frozen=True)
class TermRule:
    """A named brand rule: a list of terms (matched like blocked terms)."""

    name: str
    terms: tuple[str, ...]


@dataclass(frozen=True)
class BrandViolation:
    rule: str
    reason: str  # forbidden_term | missing_required_term
    detail: str

    @property
    def message(self) -> str:
        if self.reason == "forbidden_term":
            return f"brand rule {self.rule!r} forbids the term {self.detail!r}"
        return f"brand rule {self.rule!r} requires one of: {self.detail}"


@dataclass(frozen=True)
class BrandScreen:
    """A team's brand rules as screening: no forbidden term, at least one term of every required rule."""

    forbidden: tuple[TermRule, ...] = ()
    required: tuple[TermRule, ...] = ()

    def violations(self, prompt: str) -> list[BrandViolation]:
        text = normalise(prompt)
        found = [BrandViolation(rule.name, "forbidden_term", term)
                 for rule in self.forbidden for term, regex in _rule_regexes(rule) if regex.search(text)]
        found += [BrandViolation(rule.name, "missing_required_term", ", ".join(rule.terms))
                  for rule in self.required if not any(regex.search(text) for _, regex in _rule_regexes(rule))]
        return found


@lru_cache(maxsize=256)
def _rule_regexes(rule: TermRule) -> list[tuple[str, re.Pattern]]:
    return [(term, regex) for term in rule.terms if (regex := term_regex(term)) is not None]
