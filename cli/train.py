"""``instabatch train reflow``: InstaFlow's recipe from a local rectified-flow checkpoint on your own prompts.

    instabatch train reflow --teacher DIR --prompts FILE --out DIR [--quick] [--budget-min M]

Stages, resumption and outputs: instaflow/reflow.py; the guide: docs/models.md ("Reflow on your own
prompts"). The prompts file is read as ``instabatch run`` reads it (CSV or JSONL, cli/inputs.py), or
as plain text, one prompt a line (.txt). Exit 2 for bad input, before anything is trained.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

console = Console(stderr=True)
TEACHER_ENTRY = "teacher-25"  # the registry entry (instaflow/weights/models.toml) --teacher defaults to
TEXT_SUFFIXES = (".txt",)


class PromptFileError(ValueError):
    pass


def read_prompts(path: Path) -> list[str]:
    """The file's prompts in order: a .txt one a line (blank lines skipped), else CSV/JSONL as `run` reads it."""
    if path.suffix.lower() in TEXT_SUFFIXES:
        return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    from cli.inputs import InputError, read_batch

    try:
        spec = read_batch(path, name=path.stem, params={})
    except InputError as error:
        raise PromptFileError(str(error)) from None
    return [item.prompt for item in spec.items]


def default_teacher() -> Path | None:
    """The registry's teacher-25 folder, when the registry has that entry."""
    try:
        from core.registry import get_registry

        spec = get_registry().models.get(TEACHER_ENTRY)
    except Exception:  # noqa: BLE001 - an unreadable registry just means no default; --teacher is then required
        return None
    return spec.path if spec is not None else None


def reflow_command(
    prompts: Annotated[Path, typer.Option("--prompts", help="CSV/JSONL prompt file (as `instabatch run` reads "
                                                            "it) or .txt, one prompt a line",
                                          exists=True, dir_okay=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="run folder: stages/, 2rf/, one-step/, train.json")],
    teacher: Annotated[Optional[Path], typer.Option(help=f"the teacher checkpoint folder (diffusers layout; "
                                                          f"default: the registry's {TEACHER_ENTRY!r})")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="a few pairs and iterations: checks every stage")] = False,
    pairs_per_prompt: Annotated[Optional[int], typer.Option(help="teacher pairs per prompt (seeds)", min=1)] = None,
    teacher_steps: Annotated[Optional[int], typer.Option(help="Euler steps of the teacher's ODE", min=1)] = None,
    guidance: Annotated[Optional[float], typer.Option(help="the teacher's classifier-free guidance")] = None,
    rf2_steps: Annotated[Optional[int], typer.Option(help="2-RF training iterations", min=1)] = None,
    rf2_pair_steps: Annotated[Optional[int], typer.Option(help="Euler steps of the 2-RF's ODE", min=1)] = None,
    distill_steps: Annotated[Optional[int], typer.Option(help="distillation iterations", min=1)] = None,
    budget_min: Annotated[Optional[float], typer.Option(help="minutes for the whole run, split across the "
                                                             "stages (0: no limit)", min=0)] = None,
    batch: Annotated[Optional[int], typer.Option(help="training and generation batch", min=1)] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate (AdamW)", min=0)] = None,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads", min=1)] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of the pairs and the training", min=0)] = None,
    height: Annotated[Optional[int], typer.Option(help="image height (default: the teacher's)", min=8)] = None,
    width: Annotated[Optional[int], typer.Option(help="image width (default: the teacher's)", min=8)] = None,
    device: Annotated[Optional[str], typer.Option(help="torch device (cpu, cuda)")] = None,
    evaluate: Annotated[bool, typer.Option("--eval/--no-eval", help="compare teacher and one-step at the end")]
    = True,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="a progress bar per stage")] = True,
) -> None:
    """Teacher ODE pairs on your prompts -> 2-rectified flow -> one-step model in OUT/one-step. Rerun to resume."""
    from instaflow.reflow import QUICK, ReflowConfig, ReflowError, check_size, check_teacher, reflow

    given = {"pairs_per_prompt": pairs_per_prompt, "teacher_steps": teacher_steps, "guidance": guidance,
             "rf2_steps": rf2_steps, "rf2_pair_steps": rf2_pair_steps, "distill_steps": distill_steps,
             "budget_min": budget_min, "batch": batch, "lr": lr, "threads": threads, "seed": seed,
             "height": height, "width": width, "device": device}
    config = replace(QUICK if quick else ReflowConfig(), **{k: v for k, v in given.items() if v is not None})
    teacher = teacher or default_teacher()
    if teacher is None:
        _fail(f"give --teacher DIR: the model registry has no {TEACHER_ENTRY!r} entry to default to")
    try:
        teacher = check_teacher(teacher)  # before OUT is created: a bad input leaves nothing behind
        check_size(teacher, config)
        prompt_list = read_prompts(prompts)
    except (ReflowError, PromptFileError, OSError, UnicodeDecodeError) as error:
        _fail(str(error))
    if not prompt_list:
        _fail(f"{prompts}: no prompts")
    log_file = out / "train.log"
    start = time.time()

    def log(message: str) -> None:
        console.print(message, highlight=False, markup=False, soft_wrap=True)
        with log_file.open("a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")

    try:
        out.mkdir(parents=True, exist_ok=True)
        log(f"reflow: teacher {teacher}, {len(prompt_list)} prompts from {prompts}, out {out}")
        summary = reflow(teacher, prompt_list, out, config, log=log, progress=progress)
    except ReflowError as error:
        _fail(str(error))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: run the same command again to resume; finished stages are kept, "
                      "the interrupted one starts again[/]")
        raise typer.Exit(130) from None
    evaluation = _evaluate(teacher, out, prompt_list, config, log) if evaluate else None
    record = {"teacher": str(teacher), "prompts": len(prompt_list), "config": asdict(config),
              "outputs": {"2rf": str(out / "2rf"), "one_step": str(out / "one-step")},
              "stages": {name: {"seconds": info.get("seconds"), "loss": info.get("loss")} | _pair_counts(info)
                         for name, info in summary.items()},
              "seconds_this_run": round(time.time() - start, 1), "evaluation": evaluation}
    (out / "train.json").write_text(json.dumps(record, indent=2))
    log(f"reflow: one-step model in {out / 'one-step'}; summary in {out / 'train.json'}")


def _pair_counts(info: dict) -> dict:
    return {k: info[k] for k in ("n", "planned", "steps", "guidance") if k in info}


def _evaluate(teacher: Path, out: Path, prompts: list[str], config, log) -> dict:
    """The end-of-run evaluation: the distance of the one-step output to the teacher's ODE on held-out
    seeds (instaflow.reflow.evaluate), then the PoC comparison (qc/compare.py, as `instabatch compare`
    runs it) of the teacher, the 2-RF and the one-step model on the prompts: OUT/compare/report.html."""
    from instaflow.reflow import evaluate

    start = time.time()
    result = evaluate(teacher, out / "one-step", prompts, config)
    for label in ("teacher", "one_step", "teacher_1_step"):
        row = result[label]
        log(f"eval {label:15s} steps {row['steps']:3d} guidance {row['guidance']:.1f}: "
            f"{row['images_per_s']:8.2f} images/s, latent RMSE to the teacher {row['latent_rmse_to_teacher']:.4f}, "
            f"pixel MAE {row['pixel_mae_to_teacher']:.2f}/255")
    log(f"RESULT reflow_one_step_images_per_s={result['one_step']['images_per_s']} "
        f"reflow_teacher_images_per_s={result['teacher']['images_per_s']} "
        f"reflow_one_step_pixel_mae={result['one_step']['pixel_mae_to_teacher']} "
        f"reflow_teacher_1_step_pixel_mae={result['teacher_1_step']['pixel_mae_to_teacher']}")
    result["compare"] = _compare(teacher, out, prompts, config, log)
    result["seconds"] = round(time.time() - start, 1)
    return result


def _compare(teacher: Path, out: Path, prompts: list[str], config, log) -> dict:
    from core.ledger import ItemSpec
    from core.params import GenerationParams
    from qc.checker import QualityChecker
    from qc.compare import ModelChoice, alignment_note, compare_models, plan_jobs
    from qc.compare_report import report_comparison

    def choice(name: str, path: Path, kind: str, steps: int, guidance: float) -> ModelChoice:
        return ModelChoice(name, path, kind, GenerationParams.model_validate(
            {"num_inference_steps": steps, "guidance_scale": guidance}))

    choices = [choice("teacher", teacher, "multi-step", config.teacher_steps, config.guidance),
               choice("2rf", out / "2rf", "few-step", config.rf2_pair_steps, 1.0),
               choice("one-step", out / "one-step", "one-step", 1, 0.0)]
    jobs = plan_jobs([ItemSpec(prompt=prompt, seed=row) for row, prompt in enumerate(prompts)])
    checker, batch_size = QualityChecker(), min(16, len(jobs))
    runs = compare_models(choices, jobs, batch_size=batch_size, checker=checker)
    lines, recommendation = report_comparison(out / "compare", jobs, runs, {
        "prompts": f"the {len(prompts)} training prompts", "images": len(jobs), "batch_size": batch_size,
        "repeats": 1, "device": None, "pass_tolerance": 2.0, "alignment_tolerance": 2.0,
        "alignment_note": alignment_note(checker)})
    for line in lines:
        log(line)
    log(f"compare: {out / 'compare' / 'report.html'}")
    return {"report": str(out / "compare" / "report.html"), "recommendation": recommendation.name}


def _fail(message: str) -> None:
    console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)
