"""hfbatch inspect: what a model directory holds, read from its files without loading the weights.
The work is hfbatch.inspection.inspect."""

from __future__ import annotations

import json

import click

from hfbatch.cli import json_flag


@click.command()
@click.argument("model_dir")
@json_flag("Print the description as one JSON object.")
def inspect(model_dir, as_json):
    """Describe MODEL_DIR: architecture, task head and labels, parameter count, tokenizer, max length and
    pooling, and which hfbatch jobs can use it. Names what is missing when the directory is incomplete.

    Nothing is loaded: the parameter count comes from the safetensors headers.

    \b
    Example:
        hfbatch inspect out/section-model
    """
    from hfbatch.inspection import inspect as describe_model
    from hfbatch.inspection import text_lines

    info = describe_model(model_dir)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(info["path"])
    for key, value in text_lines(info):
        click.echo(f"  {key + ':':<13} {value}")
