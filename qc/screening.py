"""Prompt screening before generation: a blocked prompt is never generated.

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


@lru_cache(maxsize=64)
def _compiled(policy: ScreeningPolicy) -> tuple[list[tuple[str, re.Pattern]], list[tuple[str, re.Pattern]]]:
    terms = []
    for term in policy.blocked_terms:
        words = normalise(term).split()
        if words:
            body = r"\s+".join(re.escape(w) for w in words)
            terms.append((term, re.compile(rf"(?<!\w){body}(?!\w)")))
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
