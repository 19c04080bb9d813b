"""The merge job (`hfbatch merge`): the slices of a job run with --num-shards joined into one output, with a
check that every slice is there once and that all come from one run (same job, inputs and options)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InputError
from .runner import Job, require_complete

PER_SLICE = {"shard_index"}
COPIED = ("source_dataset", "text_column", "model", "dim", "max_length", "device", "precision", "backend",
          "pooling", "chunking")


def merge(parts, output, *, force: bool = False) -> dict:
    """`hfbatch merge`: join `parts` (outputs of one job run with --num-shards N --shard-index 0..N-1) into
    `output`, rows in the dataset's order. Returns the job's summary."""
    parts = [str(p) for p in ([parts] if isinstance(parts, str | os.PathLike) else parts)]
    if not parts:
        raise InputError("give the PARTS to merge (the outputs of --shard-index 0..N-1)")
    manifests = [require_complete(Path(p), "part") for p in parts]
    ordered = slices_in_order(parts, manifests)
    first = manifests[0]
    config = {k: v for k, v in first["config"].items() if k not in PER_SLICE | {"num_shards"}}
    with Job("merge", output, config=config, datasets=ordered, force=force) as job:
        if job.up_to_date:
            return job.summary()
        from .io import open_dataset

        for i, path in enumerate(ordered):
            if not job.shards.is_done(i):
                job.shards.write_shard(i, open_dataset(path, "part")[0].data.table)
        features = open_dataset(ordered[0], "part")[0].features
        job.publish_dataset(len(ordered), features, extra={
            "merged_from": first.get("job"), **{k: first[k] for k in COPIED if k in first}})
        return job.summary()


def slices_in_order(parts: list[str], manifests: list[dict]) -> list[str]:
    """The parts by slice index, once each: refused (one line) when one is missing or given twice, or when
    they are not slices of one run."""
    first = manifests[0]
    if not isinstance(first.get("slice"), dict) or not first["slice"].get("count"):
        raise InputError(f"{parts[0]} was not made with --num-shards; nothing to merge")
    count = slice_of(parts[0], first)[1]
    by_index = {}
    for path, manifest in zip(parts, manifests):
        if manifest.get("job") != first.get("job"):
            raise InputError(f"{path} was made by `hfbatch {manifest.get('job')}`, {parts[0]} by "
                             f"`hfbatch {first.get('job')}`")
        differing = sorted(k for k in set(manifest["config"]) | set(first["config"])
                           if k not in PER_SLICE and manifest["config"].get(k) != first["config"].get(k))
        if differing or manifest.get("inputs") != first.get("inputs"):
            what = f"options {', '.join(differing)}" if differing else "inputs"
            raise InputError(f"{path} and {parts[0]} differ in their {what}: they are not slices of one run")
        index, its_count = slice_of(path, manifest)
        if its_count != count:
            raise InputError(f"{path} is a slice of {its_count}, {parts[0]} of {count}: they are not slices of one run")
        if index in by_index:
            raise InputError(f"slice {index} is given twice: {by_index[index]} and {path}")
        by_index[index] = path
    if len(by_index) < count:
        # (count comes from a file: list the first few missing, never range(count) whole)
        missing = [i for i in range(min(count, len(by_index) + 10)) if i not in by_index][:10]
        raise InputError(f"slices {missing}{' ...' if count - len(by_index) > 10 else ''} of {count} are missing; "
                         f"run them with --shard-index, then merge")
    return [by_index[i] for i in range(count)]


def slice_of(path, manifest: dict) -> tuple[int, int]:
    """(index, count) of a --num-shards slice, as its manifest records it."""
    part = manifest.get("slice")
    index, count = (part.get("index"), part.get("count")) if isinstance(part, dict) else (None, None)
    if not (type(index) is int and type(count) is int and 0 <= index < count):  # (bool is no count)
        raise InputError(f"{path}/manifest.json records no valid slice (index below count) but {part!r}; re-run "
                         f"that slice with --force")
    return index, count
