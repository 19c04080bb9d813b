"""The run job (`hfbatch run`): a pipeline file of jobs (ingest -> embed -> index ...), run in order, skipping
finished steps.

A step is run as its command (parsed by Click from the step's inputs and options, as on the command line), so
a pipeline step and the command it names take the same options, checked the same way; the whole file is
checked before any step runs. hfbatch's own errors pass through, named by their step.
"""

from __future__ import annotations

import os
import shlex
import tomllib
from pathlib import Path

import click

from . import log
from .errors import HfbatchError, InputError
from .runner import OutputPaths

STEP_KEYS = {"job", "inputs", "output", "options", "name"}
NOT_STEPS = ("run", "search", "info")  # (they write no output directory either)
PATH_OPTIONS = ("model", "base_model", "base-model")  # relative to the pipeline file, like inputs and outputs


def load_pipeline(path: Path) -> list[dict]:
    """Steps from TOML, every one checked before any runs (keys, types, the job's own options); relative
    paths are relative to the pipeline file, so cron's cwd does not matter."""
    try:
        spec = tomllib.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save it as UTF-8")
    except tomllib.TOMLDecodeError as exc:
        raise InputError(f"{path}: not valid TOML ({exc})")
    steps = spec.get("step")
    if not isinstance(steps, list) or not steps or not all(isinstance(step, dict) for step in steps):
        raise InputError(f"{path}: no [[step]] tables; each step needs job, inputs and output")
    base = path.resolve().parent
    plan = [load_step(f"{path}: step {number}", number, step, base) for number, step in enumerate(steps, start=1)]
    outputs: dict[Path, str] = {}
    for step in plan:
        if step["output"] in outputs:
            raise InputError(f"{path}: steps {outputs[step['output']]} and {step['name']} both write "
                             f"{step['output']}; give each step its own output")
        outputs[step["output"]] = step["name"]
    return plan


def load_step(where: str, number: int, step: dict, base: Path) -> dict:
    unknown = set(step) - STEP_KEYS
    if unknown:
        raise InputError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} "
                         f"(allowed: {', '.join(sorted(STEP_KEYS))})")
    job = step.get("job")
    command = _command(job) if isinstance(job, str) and job not in NOT_STEPS else None
    if command is None or not _option(command, "output"):
        why = "writes no output directory (it takes no -o)" if command is not None else "is not a job"
        raise InputError(f"{where}: job {job!r} {why}, so it cannot be a pipeline step (choose from "
                         f"{', '.join(j for j in _steppable())})")
    name = step.get("name", f"{number}-{job}")
    output = step.get("output")
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: `name` must be a string")
    if not isinstance(output, str) or not output:
        raise InputError(f"{where}: `output` must be a path (a string)" if "output" in step
                         else f"{where}: `output` is missing")
    inputs = step.get("inputs", [])
    inputs = [inputs] if isinstance(inputs, str) else inputs
    if not isinstance(inputs, list) or not all(isinstance(p, str) for p in inputs):
        raise InputError(f"{where}: `inputs` must be a list of paths, like inputs = [\"data/docs.jsonl\"]")
    _check_input_count(where, command, job, len(inputs))
    options = step.get("options", {})
    if not isinstance(options, dict):
        raise InputError(f"{where}: `options` must be a table of the job's options, like "
                         f"options = {{ precision = \"fp32\" }}")
    argv = [job, *[_resolve(base, p) for p in inputs], "-o", _resolve(base, output)]
    for key, value in options.items():
        argv += _option_argv(where, command, job, key, value, base)
    return {"name": name, "argv": argv, "output": Path(_resolve(base, output))}


def _command(job: str) -> click.Command | None:
    from .cli import cli

    return cli.get_command(None, job)  # (the lazy group imports the job's module)


def _steppable() -> list[str]:
    from .cli import JOBS

    return [job for job in JOBS if job not in NOT_STEPS and _option(_command(job), "output")]


def _option(command: click.Command, name: str) -> click.Option | None:
    return next((p for p in command.params if isinstance(p, click.Option) and p.name == name), None)


def _check_input_count(where: str, command: click.Command, job: str, given: int) -> None:
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    fewest = sum(max(p.nargs, 1) for p in arguments if p.required)
    most = None if any(p.nargs == -1 for p in arguments) else sum(p.nargs for p in arguments)
    if given < fewest or (most is not None and given > most):
        wanted = f"{fewest}" if most == fewest else f"at least {fewest}" if most is None else f"{fewest} to {most}"
        names = " ".join(p.human_readable_name for p in arguments)
        raise InputError(f"{where}: `hfbatch {job}` takes {wanted} input(s) ({names}), `inputs` has {given}")


def _option_argv(where: str, command: click.Command, job: str, key, value, base: Path) -> list[str]:
    """The command-line words for one `options` entry, checked against the job's own option."""
    flag = "--" + str(key).replace("_", "-")
    param = next((p for p in command.params if isinstance(p, click.Option)
                  and flag in p.opts + p.secondary_opts), None)
    if param is not None and param.name == "output":
        raise InputError(f"{where}: options.{key} would override the step's `output`; set it with `output` only")
    if param is None:
        known = sorted(o[2:] for p in command.params if isinstance(p, click.Option) and p.name != "output"
                       for o in p.opts + p.secondary_opts if o.startswith("--"))
        raise InputError(f"{where}: `hfbatch {job}` has no option {flag} (options: {', '.join(known)})")
    if param.is_flag:
        if not isinstance(value, bool):
            raise InputError(f"{where}: option {key} is a switch: write {key} = true or false")
        on, off = (flag, (param.secondary_opts or [None])[0]) if flag in param.opts else (flag, param.opts[0])
        chosen = on if value else off  # `streaming = false` is --no-streaming, not the default
        return [chosen] if chosen else []
    values = value if isinstance(value, list) and param.multiple else [value]
    words = []
    for item in values:
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            kind = "a list" if isinstance(item, list) else type(item).__name__
            raise InputError(f"{where}: option {key} takes a string or a number, not {kind}")
        text = _resolve(base, item) if key in PATH_OPTIONS else str(item)
        if not isinstance(param.type, click.Path):  # (a path may be made by an earlier step)
            try:
                param.type.convert(text, param, None)
            except click.BadParameter as exc:
                raise InputError(f"{where}: option {key}: {exc.format_message()}")
        words += [flag, text]
    return words


def _resolve(base: Path, value) -> str:
    text = str(value)
    if "://" in text or Path(text).is_absolute():
        return text
    return os.path.normpath(base / text)


def run(pipeline, *, dry_run: bool = False, force: bool = False) -> dict:
    """`hfbatch run`: run the steps of the TOML file `pipeline` in order, stopping at the first failure (its
    error, named by its step, is raised). With `dry_run`, run nothing and give each step's state instead;
    with `force`, pass --force to every step. Returns {"pipeline", "steps": [{"name", "command", and "state"
    (dry run) or "summary" (the step's --json summary)}]}."""
    plan = load_pipeline(Path(pipeline))
    steps = []
    for number, step in enumerate(plan, start=1):
        argv = step["argv"] + (["--force"] if force else [])
        record = {"name": step["name"], "command": f"hfbatch {shlex.join(argv)}"}
        if dry_run:
            steps.append({**record, "state": step_state(step["output"])})
            continue
        log.event("run", "step_start", step=step["name"], number=number, of=len(plan))
        steps.append({**record, "summary": run_step(f"step {number} ({step['name']})", argv)})
        log.event("run", "step_done", step=step["name"])
    return {"pipeline": str(pipeline), "steps": steps}


def run_step(name: str, argv: list[str]) -> dict:
    """One step, as its command run with `argv`: its summary, or its error with the step's name in front."""
    command = _command(argv[0])
    try:
        with command.make_context(argv[0], argv[1:]) as ctx:
            return command.invoke(ctx)
    except HfbatchError as exc:
        raise type(exc)(f"{name} failed: {exc.message}") from exc
    except click.ClickException as exc:  # (an option Click refused when the step ran, e.g. a missing input)
        raise InputError(f"{name} failed: {exc.format_message()}") from exc


def step_state(output: Path) -> str:
    if (output / "manifest.json").exists():
        return "complete (re-checked against its inputs when run)"
    if OutputPaths(output).partial.exists():
        return "partial (will resume)"
    return "to do"
