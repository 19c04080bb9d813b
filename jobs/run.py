"""hfbatch run: a pipeline file of jobs (ingest -> embed -> index ...), run in order, skipping finished steps.
The work is hfbatch.pipeline.run."""

from __future__ import annotations

import click

from hfbatch.cli import json_summary


@click.command("run")
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False))
@click.option("--dry-run", is_flag=True, help="Print the steps and their state; run nothing.")
@click.option("--force", is_flag=True, help="Pass --force to every step (recompute everything).")
@json_summary("run")
def run(pipeline, dry_run, force):
    """Run the jobs of a PIPELINE file in order, stopping at the first failure.

    Each [[step]] has `job`, `inputs` (list), `output` and an `options` table of the job's own options
    (switches as true or false, repeatable options as lists). The whole file is checked before any step
    runs. Finished steps whose inputs and options did not change are skipped (each job's own no-op check); a
    killed step resumes. The exit code is the failing step's (1 failed, 2 bad input, 75 locked). With --json,
    the summary lists each step's own summary.

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
    from hfbatch.pipeline import run as run_pipeline

    summary = run_pipeline(pipeline, dry_run=dry_run, force=force)
    if dry_run and not click.get_current_context().params.get("as_json"):
        for number, step in enumerate(summary["steps"], start=1):
            click.echo(f"{number}. {step['name']}: {step['command']}\n   state: {step['state']}")
    return summary
