"""Quality checks: scorers, the pass / review / reject policy and prompt screening.

The worker calls ``QualityChecker().check(images, prompts, nsfw_flags, known_hashes)``
on every generated chunk and stores each ``QcOutcome.to_dict()``; the API screens
prompts with ``screen_prompt`` before anything is generated.
"""

from qc.checker import QualityChecker, build_scorers
from qc.phash import HashIndex, find_duplicate, hamming, phash
from qc.policy import register_rule, rejudge
from qc.results import QcOutcome, ScorerResult, phash_from_hex, phash_to_hex
from qc.screening import ScreeningPolicy, ScreenResult, screen_prompt
from qc.settings import QcSettings

__all__ = [
    "HashIndex",
    "QcOutcome",
    "QcSettings",
    "QualityChecker",
    "ScorerResult",
    "ScreenResult",
    "ScreeningPolicy",
    "build_scorers",
    "find_duplicate",
    "hamming",
    "phash",
    "phash_from_hex",
    "phash_to_hex",
    "register_rule",
    "rejudge",
    "screen_prompt",
]
