"""hfbatch run: a pipeline file of jobs (ingest -> embed -> index ...), run in order, skipping finished steps."""

from __future__ import annotations

import os
import shlex
import tomllib
from pathlib import Path

import click

from hfbatch import log
from hfbatch.errors import InputError
from hfbatch.runner import OutputPaths

STEP_KEYS = {"job", "inputs", "output", "options", "name"}


def load_pipeline(path: Path) -> list[dict]:
    """Steps from TOML; relative paths are relative to the pipeline file, so cron's cwd does not matter."""
    from hfbatch.cli import JOBS

    try:
        spec = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})")
    steps = spec.get("step")
    if not isinstance(steps, list) or not steps:
        raise InputError(f"{path}: no [[step]] tables; each step needs job, inputs and output")
    base = path.resolve().parent
    plan = []
    for number, step in enumerate(steps, start=1):
        where = f"{path}: step {number}"
        unknown = set(step) - STEP_KEYS
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                             f"(allowed: {', '.join(sorted(STEP_KEYS))})")
        job = step.get("job")
        if job not in JOBS or job in ("run", "search", "info"):
            raise InputError(f"{where}: job {job!r} cannot be a pipeline step "
                             f"(choose from {', '.join(j for j in JOBS if j not in ('run', 'search', 'info'))})")
        inputs = step.get("inputs", [])
        inputs = [inputs] if isinstance(inputs, str) else inputs
        if "output" not in step:
            raise InputError(f"{where}: `output` is missing")
        argv = [job, *[_resolve(base, p) for p in inputs], "-o", _resolve(base, step["output"])]
        for key, value in (step.get("options") or {}).items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value is False or value is None:
                continue
            else:
                argv += [flag, _resolve(base, value) if key in ("model", "base_model", "base-model") else str(value)]
        plan.append({"name": step.get("name") or f"{number}-{job}", "argv": argv,
                     "output": Path(_resolve(base, step["output"]))})
    return plan


def _resolve(base: Path, value) -> str:
    text = str(value)
    if "://" in text or Path(text).is_absolute():
        return text
    return os.path.normpath(base / text)


def step_state(output: Path) -> str:
    if (output / "manifest.json").exists():
        return "complete (re-checked against its inputs when run)"
    if OutputPaths(output).partial.exists():
        return "partial (will resume)"
    return "to do"


@click.command("run")
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the steps and their state; run nothing.")
@click.option("--force", is_flag=True, help="Pass --force to every step (recompute everything).")
def run(pipeline, dry_run, force):
    """Run the jobs of a PIPELINE file in order, stopping at the first failure.

    Each [[step]] has `job`, `inputs` (list), `output` and an `options` table of the job's own options.
    Finished steps whose inputs and options did not change are skipped (each job's own no-op check); a
    killed step resumes. The exit code is the failing step's (1 failed, 2 bad input, 75 locked).

    \b
    Example: (pipeline.toml, then the command)
        [[step]]
        job = "ingest"
        inputs = ["sample.jsonl"]
        output = "../out/dataset"
        [[step]]
        job = "embed"
        inputs = ["../out/dataset"]
        output = "../out/embeddings"
        options = { precision = "fp32" }
    \b
        hfbatch run data/pipeline.toml --dry-run
    """
    from hfbatch.cli import cli

    plan = load_pipeline(Path(pipeline))
    for number, step in enumerate(plan, start=1):
        argv = step["argv"] + (["--force"] if force else [])
        if dry_run:
            click.echo(f"{number}. {step['name']}: hfbatch {shlex.join(argv)}\n   state: {step_state(step['output'])}")
            continue
        log.event("run", "step_start", step=step["name"], number=number, of=len(plan))
        try:
            cli.main(argv, prog_name="hfbatch", standalone_mode=False)
        except click.ClickException as exc:
            exc.message = f"step {number} ({step['name']}) failed: {exc.format_message()}"
            raise
        log.event("run", "step_done", step=step["name"])
