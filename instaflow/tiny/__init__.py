"""The tiny InstaFlow model: procedural product renders, InstaFlow's recipe at 64x64, a judge.

Entry points: `python -m instaflow.tiny train [--quick] [--out DIR] [--publish]` and
`python -m instaflow.tiny eval [--quick]`; in code `instaflow.tiny.recipe.train` and
`instaflow.tiny.evaluate.evaluate`. Public helpers for other parts of InstaBatch:
`instaflow.tiny.judge.AttributeJudge` and `instaflow.tiny.prompts.parse_prompt`.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL_DIR = WEIGHTS_DIR / "tiny-instaflow"
DEFAULT_2RF_DIR = WEIGHTS_DIR / "tiny-2rf"
DEFAULT_JUDGE_DIR = WEIGHTS_DIR / "judge"
