"""The `hfbatch` command group, shared option decorators, and error / exit-code handling.

Each job lives in its own module under `jobs/` and exports one Click command. The group imports a job's
module only when that job runs (or when help lists it), so `hfbatch info` or a no-op re-run does not pay
for importing torch.
"""

from __future__ import annotations

import errno
import functools
import importlib
import json
import math
import os
import sys
import time

import click

from . import __version__, log
from .errors import EXIT_FAILED, HfbatchError, InputError, JobFailed
from .sizes import parse_size

# name -> "module:attribute"; a new job is one line here plus its file in jobs/.
JOBS = {
    "ingest": "hfbatch.jobs.ingest:ingest",
    "embed": "hfbatch.jobs.embed:embed",
    "index": "hfbatch.jobs.index:index",
    "search": "hfbatch.jobs.search:search",
    "info": "hfbatch.jobs.info:info",
    "run": "hfbatch.jobs.run:run",
    "merge": "hfbatch.jobs.merge:merge",
    "export": "hfbatch.jobs.export:export",
    "classify": "hfbatch.jobs.classify:classify",
    "train": "hfbatch.jobs.train:train",
    "inspect": "hfbatch.jobs.inspect:inspect",
    "evaluate": "hfbatch.jobs.evaluate:evaluate",
    "tokenize": "hfbatch.jobs.tokenize:tokenize",
    "generate": "hfbatch.jobs.generate:generate",
    "train-tokenizer": "hfbatch.jobs.train_tokenizer:train_tokenizer",
}


class LazyGroup(click.Group):
    """Click's documented lazy-loading group: commands are imported on first use."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx, name):
        if name in self.lazy_commands:
            module_name, attr = self.lazy_commands[name].split(":")
            return getattr(importlib.import_module(module_name), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        """The one place where the library's errors become Click's: one line and the documented exit code."""
        try:
            return super().invoke(ctx)
        except HfbatchError as exc:
            raise click_error(exc) from exc


class CommandError(click.ClickException):
    """An hfbatch error as Click shows it: `Error: <message>`, exiting with the error's code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def click_error(exc: HfbatchError) -> CommandError:
    return CommandError(exc.message, exc.exit_code)


@click.group(cls=LazyGroup, lazy_commands=JOBS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hfbatch")
@click.option("-v", "--verbose", is_flag=True, help="Debug-level log lines on stderr.")
def cli(verbose: bool) -> None:
    """Batch NLP jobs on whole corpora: ingest, embed, index, search, classify, train.

    Every job writes its output atomically with a manifest.json, resumes after being killed, and exits
    0 (ok), 1 (job failed), 2 (bad input or usage) or 75 (output locked by another run).

    \b
    Example:
        hfbatch ingest data/sample.jsonl -o out/dataset
        hfbatch embed out/dataset -o out/embeddings
        hfbatch index out/embeddings -o out/index
        hfbatch search out/index "a fast text editor"
    """
    quiet_environment()  # also under CliRunner, which does not go through main()
    log.setup(verbose)


def quiet_environment() -> None:
    """Offline, and no library progress bars in our logs (hfbatch draws its own, on a TTY only)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers must not deadlock
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    """Console entry point: user errors are one line (Click); anything unexpected is one line too,
    with the traceback only when HFBATCH_DEBUG=1."""
    quiet_environment()
    try:
        cli.main(standalone_mode=True)
    except SystemExit:
        raise
    except Exception as exc:  # a bug or an environment failure: still no traceback by default
        if os.environ.get("HFBATCH_DEBUG"):
            raise
        failed = environment_failure(exc)
        if failed is not None:
            click_error(failed).show()
            sys.exit(failed.exit_code)
        click.echo(f"Error: internal error: {type(exc).__name__}: {exc} (set HFBATCH_DEBUG=1 for the traceback)",
                   err=True)
        sys.exit(EXIT_FAILED)


NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EFBIG: "the file is too large for its filesystem",
           errno.EDQUOT: "the disk quota is used up"}
NO_ACCESS = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
             errno.EROFS: "the filesystem is read-only"}


def environment_failure(exc: BaseException) -> HfbatchError | None:
    """A read or write the system refused, as one line naming the path (None for any other exception). Out
    of room is a job failure: the previous output is untouched (outputs are replaced only when complete)
    and finished shards are kept; a path hfbatch may not use is bad usage."""
    if not isinstance(exc, OSError) or exc.errno not in NO_ROOM | NO_ACCESS:
        return None
    path = f" {exc.filename}" if exc.filename else ""
    if exc.errno in NO_ACCESS:
        return InputError(f"cannot use{path}: {NO_ACCESS[exc.errno]}; choose a path this user may read or write, "
                          f"or change its permissions")
    return JobFailed(f"cannot write{path}: {NO_ROOM[exc.errno]}; make room and run the job again (it resumes "
                     f"from the shards it finished)")


# ---- shared options ----------------------------------------------------------------------------------

class SizeType(click.ParamType):
    """A size with explicit units (hfbatch.sizes.parse_size): `128MB`, `1.5GiB`, `4000000`. The value is a
    ByteSize."""

    name = "size"

    def __init__(self, minimum: int = 1):
        self.minimum = minimum

    def convert(self, value, param, ctx):
        try:
            return parse_size(value, self.minimum)
        except InputError as exc:
            self.fail(exc.message, param, ctx)


class Number(click.FloatRange):
    """click.FloatRange that also refuses nan and inf: nan passes every range comparison, and would be
    recorded in a manifest (as invalid JSON) and never compare equal on a re-run."""

    def convert(self, value, param, ctx):
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a number; give a finite value ({self._describe_range()})", param, ctx)
        return rv


class BatchTokensType(click.ParamType):
    """`auto` or a token budget of at least 16 (hfbatch.batch_tuning.parse_batch_tokens)."""

    name = "auto|integer"

    def convert(self, value, param, ctx):
        from .batch_tuning import parse_batch_tokens

        try:
            return parse_batch_tokens(value)
        except InputError as exc:
            self.fail(exc.message.removeprefix("--batch-tokens "), param, ctx)


def output_option(f):
    return click.option("-o", "--output", "output", required=True, type=click.Path(file_okay=False),
                        help="Output directory (published atomically with a manifest.json).")(f)


def dataset_command(f):
    """A job over one dataset: `hfbatch JOB DATASET -o OUTPUT [options]` (the options are decorated below it)."""
    f = output_option(f)
    f = click.argument("dataset", type=click.Path(exists=True, file_okay=False))(f)
    return click.command()(f)


FORCE_HELP = ("Recompute OUTPUT and replace it when it is an hfbatch output made from other inputs or options. A "
              "directory hfbatch did not make is never replaced.")


def force_option(f_or_help=FORCE_HELP):
    """`--force`: as `@force_option`, or `@force_option("help")` where forcing means something else."""
    if callable(f_or_help):
        return click.option("--force", is_flag=True, help=FORCE_HELP)(f_or_help)
    return click.option("--force", is_flag=True, help=f_or_help)


def columns_option(help: str):
    """`--columns a,b --columns c` -> ["a", "b", "c"] (None when not given)."""
    return click.option("--columns", "columns", multiple=True, metavar="A,B,...", help=help,
                        callback=lambda ctx, param, values: _names(values))


def _names(values) -> list[str] | None:
    from .ingestion import parse_columns

    return parse_columns(values)


def json_flag(help: str):
    """`--json` of the commands that print a description (info, inspect), not a job summary."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def model_option(f):
    return click.option("--model", "model", default=None, metavar="DIR",
                        help="Local model directory (default: the bundled all-MiniLM-L6-v2).")(f)


def trust_remote_code_option(f):
    return click.option("--trust-remote-code", is_flag=True,
                        help="Allow the model directory's own Python code to run (off by default).")(f)


DEVICES = ["auto", "cpu", "cuda"]
PRECISIONS = ["auto", "fp32", "bf16", "fp16"]


def device_option(f):
    return click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                        help="auto = CUDA when available, else CPU.")(f)


def device_options(f):
    f = torch_device_options(f)
    return click.option("--backend", type=click.Choice(["auto", "torch", "openvino"]), default="auto",
                        show_default=True, help="Inference engine. auto = OpenVINO on CPU, torch on CUDA.")(f)


def torch_device_options(f):
    """--device, --devices, --precision: jobs that run a torch model (embed and classify add --backend)."""
    f = device_option(f)
    f = click.option("--devices", default=None, metavar="LIST", callback=_parse_devices,
                     help="Several devices at once, one worker process each, shards shared among them and "
                          "merged in order: GPU indices (0,1) or cuda:N; `cpu,cpu` splits the cores.")(f)
    f = click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
                     show_default=True,
                     help="auto = bf16 where the hardware has it (AVX512-BF16/AMX CPUs, CUDA), fp16 on older "
                          "CUDA, else fp32. fp32 is exact.")(f)
    return f


def query_device_options(f):
    """search and evaluate: where the query encoder runs, whatever device made the index's vectors."""
    f = click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
                     help="Device for embedding the queries: auto = CUDA when available, else CPU (whatever "
                          "device embedded the corpus).")(f)
    f = click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
                     help="Precision of the query encoder: auto = fp32 on CPU (queries are few: exact costs "
                          "little), bf16 on CUDA (fp16 on older CUDA). Not inherited from the embeddings.")(f)
    return f


def mode_option(f):
    """search and evaluate: which parts of the index rank the hits (hfbatch.retrieval's module doc)."""
    from hfbatch.retrieval import MODES

    return click.option("--mode", type=click.Choice(MODES), default=None,
                        help="hybrid: dense and lexical fused; dense: the model only; lexical: BM25 only "
                             "[default: hybrid where the index has both parts, else the part it has].")(f)


def lexical_weight_option(f):
    from hfbatch.retrieval import DEFAULT_LEXICAL_WEIGHT

    return click.option("--lexical-weight", type=Number(0.0, 1.0), default=None, metavar="W",
                        help=f"Hybrid mode: the share of the normalised BM25 score in the fused score [default: "
                             f"{DEFAULT_LEXICAL_WEIGHT}, chosen on bench/debian_retrieval.py's dev queries].")(f)


def _parse_devices(ctx, param, value):
    from .devices import parse_devices

    return parse_devices(value)


def executor_options(f):
    """`--executor local|ray` and the Ray executor's options (hfbatch.ray_executor.executor_for checks them)."""
    f = click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="Where the shards are computed: on this machine, or on a Ray cluster (pip install "
                          "'hfbatch[ray]'); the output is the same.")(f)
    f = click.option("--ray-address", default=None, envvar="RAY_ADDRESS", metavar="ADDRESS",
                     help="--executor ray: the cluster to join (env RAY_ADDRESS); default: a local Ray started "
                          "for the job.")(f)
    f = click.option("--num-workers", type=click.IntRange(min=1), default=None,
                     help="--executor ray: model actors, each loading the model once (default: one per GPU "
                          "with GPUs, else one per node).")(f)
    f = click.option("--gpus-per-worker", type=Number(min=0), default=None,
                     help="--executor ray: GPUs per actor (default 1 with --device cuda, else 0: CPU actors, "
                          "each given an equal share of the CPUs).")(f)
    return click.option("--max-retries", type=click.IntRange(min=0), default=None,
                        help="--executor ray: tries after the first for a shard whose worker died or failed "
                             "(default 2).")(f)


def batching_options(f):
    """Options of every job that runs a model over a dataset (embed, classify)."""
    f = click.option("--shard-rows", type=click.IntRange(min=1), default=10_000, show_default=True,
                     help="Rows per resumable shard; inside a shard, finished batches are committed every "
                          "few seconds, so a killed run redoes only the work since then.")(f)
    f = click.option("--batch-tokens", type=BatchTokensType(), default="auto", show_default=True,
                     help="Tokens per batch, padding included (rows are sorted by length first). auto: on "
                          "the CPU (OpenVINO), the budget measured fastest for this model on this machine, "
                          "once, and remembered in the model cache; 2048 elsewhere.")(f)
    return max_length_option(f)


def max_length_option(f):
    return click.option("--max-length", type=click.IntRange(min=1), default=None,
                        help="Tokens per text (default: the model's own limit); longer texts are cut and "
                             "counted.")(f)


def text_column_option(f):
    return click.option("--text-column", default="text", show_default=True, help="Column holding the text.")(f)


def json_summary(job_name: str):
    """Adds `--json`: print a one-object summary on stdout when the job ends, for cron and scripts.

    The wrapped command returns a dict (rows in/out, output, ...); errors are summarised too, then re-raised
    so the exit code stays the documented one.
    """

    def decorate(f):
        @click.option("--json", "as_json", is_flag=True, help="Print a one-line JSON summary on stdout.")
        @functools.wraps(f)
        def wrapper(*args, as_json: bool, **kwargs):
            start = time.monotonic()
            summary = {"job": job_name, "status": "ok"}
            try:
                try:
                    result = f(*args, **kwargs) or {}
                except OSError as exc:  # a full disk is a job failure like the others, with its summary
                    failed = environment_failure(exc)
                    if failed is None:
                        raise
                    raise failed from exc
                summary.update(result)
            except (HfbatchError, click.ClickException) as exc:
                if as_json:
                    message = exc.message if isinstance(exc, HfbatchError) else exc.format_message()
                    summary.update(status="failed", exit_code=exc.exit_code, error=message)
                    summary["seconds"] = round(time.monotonic() - start, 3)
                    click.echo(json.dumps(summary))
                raise
            summary["seconds"] = round(time.monotonic() - start, 3)
            if as_json:
                click.echo(json.dumps(summary, default=str))
            return summary

        return wrapper

    return decorate
