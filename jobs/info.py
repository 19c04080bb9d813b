"""hfbatch info: what an output directory holds, from its manifest."""

from __future__ import annotations

import json
from pathlib import Path

import click

SKIP = {"inputs", "versions", "config", "features", "sources"}


@click.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
def info(path, as_json):
    """Show the manifest of PATH (any hfbatch output): job, rows, inputs, options, versions.

    \b
    Example:
        hfbatch info out/embeddings
    """
    from hfbatch.runner import require_complete

    manifest = require_complete(Path(path), "output")
    if as_json:
        click.echo(json.dumps(manifest, indent=2, sort_keys=True))
        return
    click.echo(f"{path}: hfbatch {manifest.get('job')} output, {manifest.get('rows')} rows, "
               f"made {manifest.get('created_at')} in {manifest.get('elapsed_s')} s")
    for key in sorted(k for k in manifest if k not in SKIP):
        value = manifest[key]
        if key in ("job", "rows", "created_at", "elapsed_s"):
            continue
        click.echo(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    click.echo("  options: " + ", ".join(f"{k}={v}" for k, v in sorted(manifest.get("config", {}).items())))
    for item in manifest.get("inputs", []):
        ident = item.get("sha256") or item.get("manifest_sha256")
        click.echo(f"  input: {item['path']} ({item['kind']}, {str(ident)[:16]})")
    for name, counts in (manifest.get("sources") or {}).items():
        click.echo(f"  source {name}: {counts['rows']} rows, {counts['rejects']} rejected")
    click.echo("  versions: " + ", ".join(f"{k} {v}" for k, v in sorted(manifest.get("versions", {}).items())))
