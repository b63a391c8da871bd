"""The tiny InstaFlow model: procedural product renders, InstaFlow's recipe at 64x64, a judge.

Entry points: `python -m instaflow.tiny train [--quick] [--out DIR] [--publish]` and
`python -m instaflow.tiny eval [--quick]`; in code `instaflow.tiny.recipe.train` and
`instaflow.tiny.evaluate.evaluate`. Public helpers for other parts of InstaBatch:
`instaflow.tiny.judge.AttributeJudge` and `instaflow.tiny.prompts.parse_prompt`.
"""

from core.settings import TINY_JUDGE_DIR, TINY_MODEL_DIR, TINY_REFINER_DIR, WEIGHTS_DIR

DEFAULT_MODEL_DIR = TINY_MODEL_DIR
DEFAULT_2RF_DIR = TINY_REFINER_DIR
DEFAULT_JUDGE_DIR = TINY_JUDGE_DIR
__all__ = ["DEFAULT_2RF_DIR", "DEFAULT_JUDGE_DIR", "DEFAULT_MODEL_DIR", "WEIGHTS_DIR"]
