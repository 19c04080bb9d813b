"""Do two hfbatch builds make the same outputs? Runs each on the shared corpus and compares row by row.

    python bench/same_outputs.py --old /work/main/.venv/bin/hfbatch --new ./.venv/bin/hfbatch
    python bench/same_outputs.py --old ... --new ... --model-jobs --n 2000   # also embed, index, search

The first --n rows of /work/shared/corpora/debian-descriptions.jsonl.gz (default: all 60,558) are written to a
temp JSON Lines file, and both hfbatch commands (any command prefix: a console script, `python -m ...`) run on
it, each as its own process and into its own directory:
  ingest           default options
  ingest-streamed  --streaming --shard-size 4MB --dedup (byte-range units, several shards, dedup state
                   carried across them)
  ingest-parts     the same rows in four files
  ingest-incr      ingest-parts' output updated with --incremental after a row of one file changed and a fifth
                   file was added (three files are carried over, two parsed)
and with --model-jobs (slow: embed runs the bundled MiniLM; use --n for a smaller run):
  embed            of each side's own ingest output
  index            of each side's own embeddings
  search           --queries over each side's own index, k=10 (ids, scores, texts, in order)

Compared: every column of every row, in order (floats bit for bit: embeddings too), the side files
(content_hashes.parquet, the index's rows.parquet), rejects.jsonl, index.faiss byte for byte, the names of
the files in each output, and the manifests less what differs between any two runs (times, build ids,
versions, the temp paths, hashes of upstream manifests). Outputs are read with `datasets` and pyarrow, not
with hfbatch's own readers. Prints a table of what was compared, "identical" or the first difference, the
time each command took on each side, and exits 1 on any difference.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from measure import run_measured  # noqa: E402

CORPUS = "/work/shared/corpora/debian-descriptions.jsonl.gz"
QUERIES = ["a chess game", "python web framework", "text editor for the terminal", "monitor network traffic",
           "3d real-time strategy game", "library for reading PDF files"]
# manifest keys that differ between two runs of the same build: when, which run, which versions, and the
# hashes of upstream manifests (which hold those: `manifest_sha256`, `embeddings_manifest_sha256`, ...), and
# times in seconds (`elapsed_s`, `build_s`, ...) and speeds (`qps`)
VOLATILE = {"created_at", "build_id", "versions", "hfbatch_version", "fingerprint", "mtime_ns", "qps"}
SIDES = ("old", "new")


def write_corpus(path: Path, n: int | None) -> int:
    """The first `n` rows of the shared corpus (all of them for None) as JSON Lines; returns the rows."""
    rows = 0
    with gzip.open(CORPUS, "rt", encoding="utf-8") as src, open(path, "w", encoding="utf-8") as out:
        for line in src:
            if n is not None and rows >= n:
                break
            out.write(line)
            rows += 1
    return rows


# ---- comparing ------------------------------------------------------------------------------------------

def _float_bits(values: pa.Array) -> np.ndarray:
    numbers = values.to_numpy(zero_copy_only=False)
    return numbers.view(f"u{numbers.dtype.itemsize}")


def column_difference(a: pa.ChunkedArray, b: pa.ChunkedArray) -> int | None:
    """The first row where two columns of the same type and length differ (floats, and lists of floats,
    compared bit for bit: -0.0 is not 0.0, a NaN is equal to the same NaN), or None."""
    a, b = a.combine_chunks(), b.combine_chunks()
    rows = np.flatnonzero(np.asarray(a.is_null()) != np.asarray(b.is_null())).tolist()
    kind = a.type
    is_list = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    if pa.types.is_floating(kind.value_type if is_list else kind):
        if is_list:
            lengths_a = pc.fill_null(pc.list_value_length(a), 0).to_numpy()
            lengths_b = pc.fill_null(pc.list_value_length(b), 0).to_numpy()
            rows += np.flatnonzero(lengths_a != lengths_b)[:1].tolist()
            if not rows:
                flat = np.flatnonzero(_float_bits(pc.list_flatten(a)) != _float_bits(pc.list_flatten(b)))[:1]
                rows += np.searchsorted(np.cumsum(lengths_a), flat, side="right").tolist()
        else:
            rows += np.flatnonzero(_float_bits(a) != _float_bits(b))[:1].tolist()
    else:
        for start in range(0, len(a), 10_000):
            values_a, values_b = a[start:start + 10_000].to_pylist(), b[start:start + 10_000].to_pylist()
            if values_a != values_b:
                rows.append(start + next(i for i, (x, y) in enumerate(zip(values_a, values_b)) if x != y))
                break
    return min(rows) if rows else None


def table_difference(a: pa.Table, b: pa.Table) -> str | None:
    """Where two tables first differ (schema, rows, then column by column, row by row), or None."""
    a, b = a.replace_schema_metadata(None), b.replace_schema_metadata(None)
    if a.schema != b.schema:
        return f"schema {a.schema} vs {b.schema}"
    if a.num_rows != b.num_rows:
        return f"{a.num_rows} rows vs {b.num_rows}"
    for name in a.column_names:
        row = column_difference(a.column(name), b.column(name))
        if row is not None:
            return f"column {name!r}, row {row}: {_short(a.column(name)[row])} vs {_short(b.column(name)[row])}"
    return None


def _short(value) -> str:
    text = repr(value.as_py() if hasattr(value, "as_py") else value)
    return text if len(text) <= 80 else text[:77] + "..."


def _volatile(key: str) -> bool:
    return key in VOLATILE or key.endswith("manifest_sha256") or key.endswith("_s")


def _scrub(value, roots: dict[str, str]):
    """A manifest without what differs between any two runs, with each side's temp directory named alike."""
    if isinstance(value, dict):
        return {k: _scrub(v, roots) for k, v in value.items() if not _volatile(k)}
    if isinstance(value, list):
        return [_scrub(v, roots) for v in value]
    if isinstance(value, str):
        for root, name in roots.items():
            value = value.replace(root, name)
    return value


def json_difference(a, b, where: str = "") -> str | None:
    if type(a) is not type(b):
        return f"{where or 'value'}: {_short(a)} vs {_short(b)}"
    if isinstance(a, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                return f"{where}.{key}: {'missing' if key not in a else 'present'} vs " \
                       f"{'missing' if key not in b else 'present'}"
            found = json_difference(a[key], b[key], f"{where}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where}: {len(a)} items vs {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := json_difference(x, y, f"{where}[{i}]"))), None)
    return None if a == b else f"{where}: {_short(a)} vs {_short(b)}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def compare_outputs(step: str, dirs: dict[str, Path], roots: dict[str, str]) -> list[tuple[str, str, str]]:
    """(step, what, "identical" or the first difference) for each thing compared in two outputs."""
    import datasets

    from hfbatch.dataset import is_saved_dataset
    from hfbatch.indexing import INDEX_FILE
    from hfbatch.runner import REJECTS

    old, new = dirs["old"], dirs["new"]
    checks = []

    def check(what: str, difference: str | None) -> None:
        checks.append((step, what, difference or "identical"))

    names = {side: sorted(p.name for p in d.iterdir()) for side, d in dirs.items()}
    check(f"files ({len(names['old'])})", None if names["old"] == names["new"] else f"{names['old']} vs {names['new']}")
    if is_saved_dataset(old):
        a, b = (datasets.load_from_disk(str(d)).data.table for d in (old, new))
        check(f"rows ({a.num_rows:,} x {a.num_columns}: {', '.join(a.column_names)})", table_difference(a, b))
    for side_file in ("content_hashes.parquet", "rows.parquet"):
        if (old / side_file).exists() or (new / side_file).exists():
            check(side_file, table_difference(pq.read_table(old / side_file), pq.read_table(new / side_file))
                  if (old / side_file).exists() and (new / side_file).exists() else "only on one side")
    for raw_file in (REJECTS, INDEX_FILE):
        if (old / raw_file).exists() or (new / raw_file).exists():
            same = (old / raw_file).exists() and (new / raw_file).exists() \
                and _sha256(old / raw_file) == _sha256(new / raw_file)
            check(f"{raw_file} (bytes)", None if same else "the files differ")
    manifests = [_scrub(json.loads((d / "manifest.json").read_text()), roots) for d in (old, new)]
    check("manifest (less times, ids, versions, paths)", json_difference(*manifests))
    return checks


# ---- running --------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="command prefix of the old hfbatch")
    parser.add_argument("--new", required=True, help="command prefix of the new hfbatch")
    parser.add_argument("--n", type=int, default=None, help="first N rows of the corpus (default: all)")
    parser.add_argument("--model-jobs", action="store_true", help="also embed, index and search (slow)")
    parser.add_argument("--keep", default=None, help="work in this directory and keep it (default: a temp dir)")
    args = parser.parse_args()
    commands = {"old": shlex.split(args.old), "new": shlex.split(args.new)}

    with tempfile.TemporaryDirectory(prefix="same-outputs-") as scratch:
        work = Path(args.keep or scratch).resolve()
        roots = {str(work / side): "<side>" for side in SIDES}
        for side in SIDES:
            (work / side).mkdir(parents=True, exist_ok=True)
        corpus = work / "corpus" / "debian.jsonl"
        corpus.parent.mkdir(exist_ok=True)
        n_rows = write_corpus(corpus, args.n)
        checks: list[tuple[str, str, str]] = []
        times: list[tuple[str, dict]] = []

        def run(step: str, arguments) -> dict:
            """`hfbatch ARGUMENTS` on each side ({side} in an argument is that side's directory), then the two
            outputs (-o) compared. Returns each side's Measured."""
            took, dirs = {}, {}
            for side in SIDES:
                cmd = commands[side] + [str(a).format(side=work / side) for a in arguments]
                measured = run_measured(cmd)
                if measured.done.returncode:
                    raise SystemExit(f"{side}: {shlex.join(cmd)} failed ({measured.done.returncode}):\n"
                                     f"{measured.done.stderr[-3000:]}")
                took[side] = measured
                if "-o" in cmd:
                    dirs[side] = Path(cmd[cmd.index("-o") + 1])
            times.append((step, took))
            if dirs:
                checks.extend(compare_outputs(step, dirs, roots))
            return took

        run("ingest", ["ingest", corpus, "-o", "{side}/ingest"])
        run("ingest-streamed", ["ingest", corpus, "-o", "{side}/ingest-streamed", "--streaming", "--shard-size",
                                "4MB", "--dedup"])
        # --incremental: the corpus in four files, then one row of the third changed and a fifth file added
        # (the first, second and fourth are carried over from the output being updated)
        parts = work / "corpus-parts"
        parts.mkdir(exist_ok=True)
        lines = corpus.read_text(encoding="utf-8").splitlines(keepends=True)
        quarter = -(-len(lines) // 4)
        for i in range(4):
            (parts / f"part-{i}.jsonl").write_text("".join(lines[i * quarter:(i + 1) * quarter]), encoding="utf-8")
        run("ingest-parts", ["ingest", parts, "-o", "{side}/ingest-parts"])
        third = (parts / "part-2.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
        row = json.loads(third[len(third) // 2])
        third[len(third) // 2] = json.dumps({**row, "text": row["text"] + " (changed)"}) + "\n"
        (parts / "part-2.jsonl").write_text("".join(third), encoding="utf-8")
        (parts / "part-4.jsonl").write_text(json.dumps({"id": 10**9, "text": "a new package"}) + "\n")
        run("ingest-incr", ["ingest", parts, "-o", "{side}/ingest-parts", "--incremental"])
        if args.model_jobs:
            run("embed", ["embed", "{side}/ingest", "-o", "{side}/embed"])
            run("index", ["index", "{side}/embed", "-o", "{side}/index"])
            queries = work / "queries.txt"
            queries.write_text("\n".join(QUERIES) + "\n")
            took = run("search", ["search", "{side}/index", "--queries", queries, "-k", "10"])
            hits = {side: [json.loads(line) for line in took[side].done.stdout.splitlines() if line.strip()]
                    for side in SIDES}
            hits = {side: _scrub(h, roots) for side, h in hits.items()}
            checks.append(("search", f"hits ({len(hits['old'])}: {len(QUERIES)} queries x k=10)",
                           json_difference(hits["old"], hits["new"]) or "identical"))

    print(f"corpus: first {n_rows:,} rows of {CORPUS}")
    print(f"old: {args.old}\nnew: {args.new}\n")
    width = max(len(what) for _, what, _ in checks)
    print(f"{'step':16} {'compared':{width}}  result")
    for step, what, result in checks:
        print(f"{step:16} {what:{width}}  {result}")
    print(f"\n{'command':16} {'old wall s':>10} {'old cpu s':>10} {'new wall s':>10} {'new cpu s':>10}")
    for step, took in times:
        print(f"{step:16} {took['old'].wall_s:10.2f} {took['old'].cpu_s:10.2f} {took['new'].wall_s:10.2f} "
              f"{took['new'].cpu_s:10.2f}")
    different = [c for c in checks if c[2] != "identical"]
    print(f"\n{'IDENTICAL' if not different else f'{len(different)} DIFFERENCE(S)'}: {len(checks)} comparisons")
    sys.exit(1 if different else 0)


if __name__ == "__main__":
    main()
