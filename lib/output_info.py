"""The info job (`hfbatch info`): what an output directory holds, from its manifest."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError
from .runner import REJECTS, require_complete

SHOWN = {"job", "rows", "created_at", "elapsed_s", "inputs", "versions", "config", "features", "sources",
         "counts", "schema", "rejects_by_kind", "output", "fingerprint", "hfbatch_version"}
MAX_SOURCES = 20


def info(path) -> dict:
    """`hfbatch info`: the manifest of `path` (any finished hfbatch output), as `--json` prints it."""
    return require_complete(Path(path), "output")


def describe(path, manifest: dict) -> list[str]:
    """The manifest as `hfbatch info` prints it for people: one line each for job and rows, counts, rejects,
    columns, other recorded values, sources, options, inputs and versions."""
    try:
        return list(_lines(path, manifest))
    except (AttributeError, TypeError, KeyError, ValueError) as exc:  # a manifest edited by hand
        raise InputError(f"{Path(path) / 'manifest.json'} holds something hfbatch does not write "
                         f"({type(exc).__name__}: {exc}); `hfbatch info --json {path}` shows it as it is")


def _lines(path, manifest: dict):
    yield (f"{path}: hfbatch {manifest.get('job')} output, {manifest.get('rows')} rows, "
           f"made {manifest.get('created_at')} in {manifest.get('elapsed_s')} s")
    counts = manifest.get("counts") or {}
    if counts:
        yield f"  counts: {_counts(counts)}"
    kinds = manifest.get("rejects_by_kind") or {}
    if kinds:
        yield (f"  rejects: {_counts(dict(sorted(kinds.items(), key=lambda kv: -kv[1])))} "
               f"(rows in {Path(path) / REJECTS})")
    schema = manifest.get("schema")
    if schema:
        yield "  columns: " + ", ".join(f"{name} ({kind})" for name, kind in schema.items())
    for key in sorted(k for k in manifest if k not in SHOWN):
        value = manifest[key]
        yield f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}"
    yield from _source_lines(manifest.get("sources") or {})
    yield "  options: " + ", ".join(f"{k}={v}" for k, v in sorted(manifest.get("config", {}).items())
                                    if v not in (None, {}, [], False))
    for item in manifest.get("inputs", []):
        ident = item.get("sha256") or item.get("manifest_sha256")
        size = f"{_size(item.get('size'))}, " if item.get("kind") == "file" else ""
        yield f"  input: {item['path']} ({item['kind']}, {size}sha256 {str(ident)[:16]})"
    yield "  versions: " + ", ".join(f"{k} {v}" for k, v in sorted(manifest.get("versions", {}).items()))


def _source_lines(sources: dict):
    if not sources:
        return
    yield f"  sources ({len(sources)}):"
    width = min(max(len(name) for name in sources), 48)
    for name, c in list(sources.items())[:MAX_SOURCES]:
        dropped = "".join(f", {c[k]} {k}" for k in ("filtered", "duplicates") if c.get(k))
        yield (f"    {name:<{width}}  {c.get('rows', 0):>9} rows  {c.get('rejects', 0):>6} rejected"
               f"{dropped}  ({c.get('read', '?')} read)")
    if len(sources) > MAX_SOURCES:
        yield f"    ... and {len(sources) - MAX_SOURCES} more (--json lists them all)"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _counts(counts: dict) -> str:
    return ", ".join(f"{v} {k}" for k, v in counts.items())
