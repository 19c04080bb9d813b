#!/usr/bin/env python
"""What this CPU allows: matmul GFLOP/s at the encoder's own shapes, and from it the most docs/s any
implementation of the model could reach on N Debian docs (the encoder's FLOPs per doc, computed from the
model config and each doc's token count, divided by the matmul rate).

A BERT-style encoder spends nearly all its time in matmuls, and token-budget batches leave almost no padding,
so `roof / FLOPs per doc` is a ceiling on docs/s at that precision. Comparing it with a baseline measured in
the same run (SentenceTransformer.encode, fp32) says which speed-up ratios are physically possible here.
embed_vs_st.py and classify_vs_pipeline.py print the same ceiling beside their measurements.

    .venv/bin/python bench/cpu_roof.py --n 2000 [--model DIR] [--no-baseline]
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

CORPUS = "/work/shared/corpora/debian-descriptions.jsonl.gz"
T = TypeVar("T")


def matmul_gflops(hidden: int, intermediate: int, dtype: str = "float32", tokens: int = 2048,
                  seconds: float = 1.5, threads: int | None = None) -> float:
    """Best sustained torch matmul rate over the encoder's shapes (attention and FFN projections) and a large
    square one (BLAS at its best: a generous roof), on all cores this process may use (or `threads`). On a
    shared machine the rate drifts with the neighbours: measure it more than once in a run and keep the best."""
    import torch

    from hfbatch.openvino_backend import available_cpus

    kept = torch.get_num_threads()  # put back after: a one-thread roof must not leave torch on one thread
    torch.set_num_threads(threads or available_cpus())
    dt = getattr(torch, dtype)
    best = 0.0
    try:
        for m, k, n in [(tokens, hidden, intermediate), (tokens, intermediate, hidden), (tokens, hidden, hidden),
                        (2048, 2048, 2048)]:
            a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
            for _ in range(3):
                a @ b
            start, runs = time.perf_counter(), 0
            while time.perf_counter() - start < seconds:
                a @ b
                runs += 1
            best = max(best, 2 * m * k * n * runs / (time.perf_counter() - start) / 1e9)
    finally:
        torch.set_num_threads(kept)
    return best


def around(roof: Callable[[], float], work: Callable[[], T]) -> tuple[T, float]:
    """`work()`, and the better of the roof measured just before and just after it: on the 2-core AMX VM
    the roof moved 1,000-2,200 GFLOP/s within a run, so a share of the roof uses the one next to it."""
    before = roof()
    result = work()
    return result, max(before, roof())


def encoder_flops(config, lengths: np.ndarray, first_token_last_layer: bool = False) -> float:
    """Multiply-add FLOPs of a BERT-style encoder over sequences of these lengths (no padding): the
    projections' and the attention's; with `first_token_last_layer` those of a graph whose last layer
    computes the first token only (hfbatch.openvino_backend.first_token_last_layer)."""
    return projection_flops(config, lengths, first_token_last_layer) + \
        attention_flops(config, lengths, first_token_last_layer)


def projection_flops(config, lengths: np.ndarray, first_token_last_layer: bool = False) -> float:
    """Per layer and token the Q/K/V/output projections (4·h²) and the FFN (2·h·i), multiply and add apart.
    A last layer narrowed to the first token still projects Q, K and V for every token, the output and the
    FFN for one token a sequence."""
    h, i = config.hidden_size, config.intermediate_size
    tokens = lengths.astype(np.float64).sum()
    layer = 2 * tokens * (4 * h * h + 2 * h * i)
    last = 2 * tokens * 3 * h * h + 2 * len(lengths) * (h * h + 2 * h * i) if first_token_last_layer else layer
    return float((config.num_hidden_layers - 1) * layer + last)


def attention_flops(config, lengths: np.ndarray, first_token_last_layer: bool = False) -> float:
    """Per layer attention's scores and mixing: 2·L·h per token each, multiply and add apart (for the first
    query alone in a narrowed last layer)."""
    lengths = lengths.astype(np.float64)
    layer = 2 * 2 * (lengths ** 2).sum() * config.hidden_size
    last = 2 * 2 * lengths.sum() * config.hidden_size if first_token_last_layer else layer
    return float((config.num_hidden_layers - 1) * layer + last)


def token_lengths(model_dir, texts: list[str], max_length: int | None = None) -> np.ndarray:
    from transformers import AutoConfig, AutoTokenizer

    from hfbatch.models import default_max_length

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    limit = max_length or default_max_length(Path(model_dir), tokenizer, AutoConfig.from_pretrained(str(model_dir)))
    ids = tokenizer(texts, truncation=True, max_length=limit)["input_ids"]
    return np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))


def roof_dtype(precision: str | None = None) -> str:
    """The torch dtype whose matmul roof a run at `precision` ("bf16" or "fp32", as hfbatch reports the one
    in force) is judged against; None: the precision hfbatch runs by default on this CPU."""
    if precision is None:
        from hfbatch.models import cpu_has_bf16

        precision = "bf16" if cpu_has_bf16() else "fp32"
    return "bfloat16" if precision == "bf16" else "float32"


def model_gflops(model_dir, dtype: str = "float32", seconds: float = 1.5) -> float:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    return matmul_gflops(config.hidden_size, config.intermediate_size, dtype, seconds=seconds)


def ceiling(model_dir, texts: list[str], dtype: str = "float32", also_measured: float = 0.0) -> dict:
    """{gflops, flops_per_doc, tokens, docs_per_s}: the most docs/s this CPU allows at `dtype`; the roof is
    measured now, and the best of that and `also_measured` (an earlier measurement in the same run) is used."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    lengths = token_lengths(model_dir, texts)
    gflops = max(also_measured, matmul_gflops(config.hidden_size, config.intermediate_size, dtype))
    flops = encoder_flops(config, lengths)
    return {"dtype": dtype, "gflops": gflops, "tokens": int(lengths.sum()), "flops_per_doc": flops / len(texts),
            "docs_per_s": gflops * 1e9 / (flops / len(texts))}


def matmul_only_forward(config, lengths: np.ndarray, dtype: str = "bfloat16", batch_tokens: int = 2048,
                        repeats: int = 2) -> dict:
    """The encoder's own matmuls and nothing else, at the token-budget batches hfbatch makes of these docs
    (length-sorted, `batch_tokens` a batch): per layer the Q, K, V and output projections, the FFN's two, and
    attention's per-head scores and mixing (batched [B*heads, L, head_dim] products), on random inputs of
    the same shapes. No softmax, LayerNorm, GELU, residual adds, pooling or tokenizing.

    It says whether the model's own shapes (hidden size 384, 32-wide heads, ~2,048-token batches) let the
    matmuls reach the roof. On the 2-core AMX machine they ran at 0.9-1.1 TFLOP/s whatever the roof read:
    84-109% of a roof of 0.9-1.2 TFLOP/s, where an engine loses the rest in its other work (attention's
    softmax, LayerNorm, GELU, adds, layout changes), but 53% of one of 2.1 TFLOP/s, which then no engine on
    these kernels can get near.
    Returns {gflops, seconds, batches} for the best of `repeats` passes (FLOPs as `encoder_flops`: real
    tokens only, so padding counts against it as it does against an engine)."""
    import torch

    from hfbatch.batching import budget_batches
    from hfbatch.openvino_backend import available_cpus

    torch.set_num_threads(available_cpus())
    dt = getattr(torch, dtype)
    h, i, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    weights = {name: torch.randn(k, n, dtype=dt) for name, (k, n) in
               {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "up": (h, i), "down": (i, h)}.items()}
    shapes = [(len(rows), int(lengths[rows].max())) for rows in budget_batches(lengths, batch_tokens)]

    most = max(rows * length for rows, length in shapes)
    # inputs made once, outside the timing, each batch a view of their first rows; the attention operands
    # already in the [B*heads, L, head_dim] layout, so no transpose copy is timed
    x, up = torch.randn(most, h, dtype=dt), torch.randn(most, i, dtype=dt)
    q, k, v = (torch.randn(most * h, dtype=dt) for _ in range(3))

    def one_pass() -> float:
        start = time.perf_counter()
        for rows, length in shapes:
            tokens, per_head = rows * length, (rows * heads, length, h // heads)
            qh, kh, vh = (t[:tokens * h].view(per_head) for t in (q, k, v))
            for _ in range(config.num_hidden_layers):
                for name in ("q", "k", "v", "o", "up"):
                    x[:tokens] @ weights[name]
                up[:tokens] @ weights["down"]
                torch.bmm(torch.bmm(qh, kh.transpose(1, 2)), vh)
        return time.perf_counter() - start

    with torch.inference_mode():
        one_pass()  # warm-up: first-touch of every shape's kernels
        seconds = min(one_pass() for _ in range(repeats))
    return {"gflops": encoder_flops(config, lengths) / seconds / 1e9, "seconds": seconds, "batches": len(shapes),
            "batch_tokens": batch_tokens}


def matmul_only_line(c: dict, model_dir, texts: list[str], batch_tokens: int = 2048) -> tuple[str, dict]:
    """One line (and its figures) for the benches: the matmul-only forward of `c`'s dtype against the roof
    measured just before and just after it (the better of the two): the roof moves within a run."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir))
    lengths = token_lengths(model_dir, texts)
    m, m["roof_gflops"] = around(lambda: matmul_gflops(config.hidden_size, config.intermediate_size, c["dtype"],
                                                       seconds=0.4),
                                 lambda: matmul_only_forward(config, lengths, c["dtype"], batch_tokens))
    m["of_roof"] = m["gflops"] / m["roof_gflops"]
    m["docs_per_s"] = len(texts) / m["seconds"]
    return (f"{c['dtype']} matmul-only forward (the encoder's own matmuls at {batch_tokens}-token batches, "
            f"nothing else): {m['gflops']:.0f} GFLOP/s, {m['docs_per_s']:.0f} docs/s = {m['of_roof']:.0%} of the "
            f"roof measured around it ({m['roof_gflops']:.0f} GFLOP/s; what an engine loses beyond that, it loses "
            f"outside its matmuls)"), m


#: OpenVINO CPU node types that are matrix products (the projections, and attention's own when unfused)
MATMUL_NODES = ("FullyConnected", "MatMul")


def op_profile(model_dir, texts: list[str], task: str = "embed", batch_tokens: int = 2048,
               seconds: float = 1.0) -> dict:
    """Where hfbatch's own OpenVINO forward spends its time, from the CPU plugin's per-op counters
    (PERF_COUNT), over the token-budget batches of these docs, on one thread (one stream: one core, as hfbatch
    runs one stream per core), against the one-thread roof measured just before and just after (the better).

    Ops fall in three groups: matmuls (FullyConnected: the projections and the FFN, with their fused GELU and
    bias), attention (the fused scaled-dot-product Subgraph: scores, mask, softmax, mixing) and the rest
    (LayerNorm, residual adds, layout transposes and reorders, casts, embeddings, pooling). A second pass with
    OpenVINO's attention fusion off (SNIPPETS_MODE=DISABLE) times attention's softmax on its own (its Softmax
    nodes).

    The caps say how close to the roof an engine on these kernels could come: the forward's FLOPs (as
    `encoder_flops`) over the time they would take at the roof plus the time of what is left as OpenVINO runs
    it. `cap_matmuls_and_attention`: every FullyConnected and the whole attention at the roof, only the rest
    as run (the loosest bound). `cap_all_matmuls`: every matmul, attention's included, at the roof; the
    softmax as the unfused pass ran it and the rest as run. `rest_speedup_for_75`: how much faster the rest
    would have to run for 75% even in the loosest case. The other way round, with the FullyConnected
    matmuls as OpenVINO runs them (what no change outside its kernels moves): `cap_matmuls_as_run`, with
    attention and the rest free, and `others_speedup_for_75`, how much faster attention and the rest together
    would have to run for 75% (None: not even free would do)."""
    import collections

    from transformers import AutoConfig

    from hfbatch.batching import budget_batches, pad, padded_width
    from hfbatch.embedding import EncoderRun
    from hfbatch.models import engine_arrays
    from hfbatch.openvino_backend import get_core, read_meta

    config = AutoConfig.from_pretrained(str(model_dir))
    run = EncoderRun(Path(model_dir), task=task, batch_tokens=batch_tokens)  # hfbatch's default settings
    engine = run.encoder.engine
    tokenized = run.tokenize(texts)
    lengths = np.fromiter((len(s) for s in tokenized.input_ids), dtype=np.int64, count=len(tokenized))
    # padded as the jobs pad them (the multiple hfbatch.batch_tuning remembered for this graph and CPU)
    width = functools.partial(padded_width, multiple=run.pad_multiple, max_width=run.max_length)
    padded = (pad(tokenized, rows, run.tokenizer.pad_token_id or 0, width)
              for rows in budget_batches(lengths, batch_tokens, width))
    feeds = [engine._inputs(*engine_arrays(b)) for b in padded]
    # the FLOPs this graph computes: fewer where its last layer runs on the first token only
    narrowed = read_meta(engine.ir_path).get("last_layer") == "first token"
    flops = encoder_flops(config, lengths, narrowed)
    dtype = roof_dtype(engine.precision)

    def one_pass(snippets: str) -> dict:
        settings = {k: v for k, v in engine.config.items() if k != "CACHE_DIR"}  # a compile of its own
        settings.update(PERFORMANCE_HINT="LATENCY", INFERENCE_NUM_THREADS=1, NUM_STREAMS=1, PERF_COUNT=True,
                        SNIPPETS_MODE=snippets)
        request = get_core().compile_model(str(engine.ir_path), "CPU", settings).create_infer_request()
        request.infer(feeds[0])  # warm-up
        by_type: collections.Counter = collections.Counter()
        start = time.perf_counter()
        for feed in feeds:
            request.infer(feed)
            for p in request.profiling_info:
                attention = p.node_type == "Subgraph" and "scaled_dot_product_attention" in p.node_name
                by_type["attention" if attention else p.node_type] += p.real_time.total_seconds()
        return {"wall_s": time.perf_counter() - start, "by_type": dict(by_type)}

    (fused, unfused), roof = around(
        lambda: matmul_gflops(config.hidden_size, config.intermediate_size, dtype, seconds=seconds, threads=1),
        lambda: (one_pass("ENABLE"), one_pass("DISABLE")))
    at_roof = flops / (roof * 1e9)  # seconds for all the FLOPs at the roof

    def cap(rest_s: float) -> float:
        return at_roof / (at_roof + rest_s)

    groups = {"matmuls": sum(fused["by_type"].get(t, 0.0) for t in MATMUL_NODES),
              "attention": fused["by_type"].get("attention", 0.0)}
    groups["rest"] = sum(fused["by_type"].values()) - groups["matmuls"] - groups["attention"]
    softmax = unfused["by_type"].get("Softmax", 0.0)
    return {"dtype": dtype, "docs": len(texts), "batches": len(feeds), "pad_multiple": run.pad_multiple,
            "roof_1thread_gflops": roof,
            "first_token_last_layer": narrowed, "flops_of_full_forward": flops / encoder_flops(config, lengths),
            "of_roof": flops / fused["wall_s"] / 1e9 / roof, "groups_s": groups,
            "by_type_s": fused["by_type"], "unfused_by_type_s": unfused["by_type"],
            "matmul_gflops": projection_flops(config, lengths, narrowed) / groups["matmuls"] / 1e9
            if groups["matmuls"] else 0.0,
            "cap_matmuls_and_attention": cap(groups["rest"]), "softmax_s": softmax,
            "cap_all_matmuls": cap(groups["rest"] + softmax),
            "rest_speedup_for_75": groups["rest"] / (at_roof / 3),
            "cap_matmuls_as_run": at_roof / groups["matmuls"] if groups["matmuls"] else 0.0,
            "others_speedup_for_75": (groups["attention"] + groups["rest"]) / (at_roof / 0.75 - groups["matmuls"])
            if at_roof / 0.75 > groups["matmuls"] else None}


def profile_sample(texts: list[str], n: int = 600) -> list[str]:
    """Every k-th of `texts`, about `n` (the profile runs one thread and twice: a sample is enough)."""
    return texts[::max(1, len(texts) // n)][:n]


def op_profile_line(p: dict) -> str:
    g, total = p["groups_s"], sum(p["groups_s"].values())
    narrowed = "" if not p.get("first_token_last_layer") else (
        f" (its last layer on the first token only: {p['flops_of_full_forward']:.0%} of a full forward's FLOPs, "
        f"the figures here count those it computes)")
    return (f"OpenVINO's own per-op counters, 1 thread, {p['docs']} docs in {p['batches']} batches (padded to "
            f"a multiple of {p.get('pad_multiple', 1)}){narrowed}: "
            f"{p['of_roof']:.0%} of the 1-thread {p['dtype']} roof ({p['roof_1thread_gflops']:.0f} GFLOP/s); time in "
            f"matmuls {g['matmuls'] / total:.0%} (at {p['matmul_gflops']:.0f} GFLOP/s), attention "
            f"{g['attention'] / total:.0%}, the rest {g['rest'] / total:.0%}. With every matmul and the whole "
            f"attention at the roof and the rest as run: at most {p['cap_matmuls_and_attention']:.0%} of the roof; "
            f"with the matmuls (attention's too) at the roof and the softmax as run: at most "
            f"{p['cap_all_matmuls']:.0%}. {rest_for_75(p['rest_speedup_for_75'])}. {matmuls_as_run(p)}")


def matmuls_as_run(p: dict) -> str:
    """The bound from the FullyConnected matmuls as OpenVINO runs them: what attention and the rest leave."""
    line = (f"With the FullyConnected matmuls as run and attention and the rest free: at most "
            f"{p['cap_matmuls_as_run']:.0%}")
    speedup = p["others_speedup_for_75"]
    if speedup is None:
        return line + "; so 75% needs faster matmul kernels, whatever else is done"
    return line + f"; 75% then needs attention and the rest together {speedup:.1f}x faster than run"


def rest_for_75(speedup: float) -> str:
    """What 75% of the roof asks of the rest (LayerNorm, adds, layout, casts), in the loosest case."""
    if speedup > 1:
        return f"75% would need the rest (LayerNorm, adds, layout, casts) {speedup:.1f}x faster"
    return (f"The rest (LayerNorm, adds, layout, casts) does not keep it from 75%: it could take "
            f"{1 / speedup:.1f}x its time")


def describe(c: dict, baseline_docs_per_s: float | None = None, baseline: str = "") -> str:
    line = (f"{c['dtype']} ceiling on this CPU: matmul {c['gflops']:.0f} GFLOP/s, {c['tokens']:,} tokens, "
            f"{c['flops_per_doc'] / 1e9:.2f} GFLOP/doc -> at most {c['docs_per_s']:.0f} docs/s")
    if baseline_docs_per_s:
        line += f" = {c['docs_per_s'] / baseline_docs_per_s:.2f}x {baseline}"
    return line


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--model", default=None)
    ap.add_argument("--corpus", default=CORPUS)
    ap.add_argument("--no-baseline", action="store_true", help="skip SentenceTransformer.encode")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from embed_vs_st import default_model, load_docs, st_encode

    from hfbatch.models import cpu_has_bf16

    model = args.model or default_model()
    texts = [d["text"] for d in load_docs(args.corpus, args.n)]
    print(f"{len(texts)} docs; model {model}; cpus {os.cpu_count()}; cpu_has_bf16={cpu_has_bf16()}; "
          f"load average {os.getloadavg()[0]:.1f}")
    st_rate = None
    before = {dtype: model_gflops(model, dtype) for dtype in ["float32"] + (["bfloat16"] if cpu_has_bf16() else [])}
    if not args.no_baseline:
        _, secs, _ = st_encode(model, texts, "torch")
        st_rate = len(texts) / secs
    ceilings = {dtype: ceiling(model, texts, dtype, also_measured=gflops) for dtype, gflops in before.items()}
    for c in ceilings.values():
        print(describe(c, st_rate, "ST fp32"))
        for batch_tokens in (2048, 8192):
            print("  " + matmul_only_line(c, model, texts, batch_tokens)[0])
    print(op_profile_line(op_profile(model, profile_sample(texts))))
    if st_rate:
        fp32 = ceilings["float32"]
        used = st_rate * fp32["flops_per_doc"] / 1e9
        print(f"SentenceTransformer.encode fp32, batch 32: {st_rate:.1f} docs/s = {used:.0f} GFLOP/s, "
              f"{used / fp32['gflops']:.0%} of the fp32 matmul rate")


if __name__ == "__main__":
    main()
