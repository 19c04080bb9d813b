"""hfbatch info: what an output directory holds, from its manifest. The work is hfbatch.output_info."""

from __future__ import annotations

import json

import click

from hfbatch.cli import json_flag


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@json_flag("Print the whole manifest as JSON.")
def info(path, as_json):
    """Show the manifest of PATH (any hfbatch output): job, rows, sources, rejects, schema, inputs,
    options, versions.

    \b
    Example:
        hfbatch info out/dataset
        hfbatch info out/embeddings --json | jq .rows
    """
    from hfbatch.output_info import describe
    from hfbatch.output_info import info as read_info

    manifest = read_info(path)
    if as_json:
        click.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    for line in describe(path, manifest):
        click.echo(line)
