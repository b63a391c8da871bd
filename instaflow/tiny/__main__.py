"""`python -m instaflow.tiny train|eval`: the tiny model's recipe and its evaluation table."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instaflow.tiny")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run or resume the recipe (finished stages are skipped)")
    train.add_argument("--quick", action="store_true", help="tiny configuration that checks every stage")
    train.add_argument("--out", type=Path, default=None, help="run folder (default var/tiny-run[-quick])")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a Config field (recorded in the run's config.json)")
    train.add_argument("--publish", action="store_true", help="copy the results into instaflow/weights/")
    ev = sub.add_parser("eval", help="print the evaluation table and the RESULT line")
    ev.add_argument("--quick", action="store_true", help="few prompts, quick numbers")
    ev.add_argument("--run", type=Path, default=None, help="run folder with teacher/ and direct-distill/")
    ev.add_argument("--model", type=Path, default=None, help="one-step model folder (default: committed)")
    ev.add_argument("--rf2", type=Path, default=None, help="2-RF model folder (default: committed)")
    ev.add_argument("--judge", type=Path, default=None, help="judge folder (default: committed)")
    ev.add_argument("--json", type=Path, default=None, help="also write the table as JSON here")
    ev.add_argument("--sheet", type=Path, default=None, help="write a contact sheet PNG here")
    ev.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if args.command == "train":
        from instaflow.tiny.recipe import train as run_train

        out = args.out or Path("var/tiny-run-quick" if args.quick else "var/tiny-run")
        overrides = dict(item.split("=", 1) for item in args.set)
        run_train(out, quick=args.quick, publish=args.publish, log=lambda m: print(m, flush=True),
                  overrides=overrides)
        return 0
    from instaflow.tiny.evaluate import evaluate

    evaluate(quick=args.quick, run_dir=args.run, model_dir=args.model, rf2_dir=args.rf2,
             judge_dir=args.judge, json_out=args.json, sheet_out=args.sheet, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
