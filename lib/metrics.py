"""Retrieval metrics with binary relevance. Pure Python: ranked ids and relevant ids in, numbers out.

For one query, `ranked` is the retrieved ids best first and `relevant` the set of ids that count as hits:
    recall@k  = |relevant ∩ ranked[:k]| / |relevant|
    MRR@k     = 1 / rank of the first relevant id in ranked[:k], 0 if none there
    nDCG@k    = DCG@k / IDCG@k, DCG@k = sum over relevant ranked[i], i < k, of 1 / log2(i + 2);
                IDCG@k = the DCG of the ideal ranking, min(k, |relevant|) hits at the top
Averages are over queries with at least one relevant id (others are undefined and left out).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence


def recall_at_k(ranked: Sequence, relevant: Iterable, k: int) -> float:
    relevant = set(relevant)
    if not relevant:
        raise ValueError("recall is undefined without relevant ids")
    return len(relevant.intersection(ranked[:k])) / len(relevant)


def mrr_at_k(ranked: Sequence, relevant: Iterable, k: int) -> float:
    relevant = set(relevant)
    for rank, item in enumerate(ranked[:k], start=1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence, relevant: Iterable, k: int) -> float:
    relevant = set(relevant)
    if not relevant:
        raise ValueError("nDCG is undefined without relevant ids")
    seen = set()
    dcg = 0.0
    for i, item in enumerate(ranked[:k]):
        if item in relevant and item not in seen:   # a duplicate hit does not count twice
            dcg += 1.0 / math.log2(i + 2)
            seen.add(item)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal


# the metrics `hfbatch evaluate` reports: name -> (function, k)
STANDARD = {"recall@1": (recall_at_k, 1), "recall@10": (recall_at_k, 10), "recall@100": (recall_at_k, 100),
            "mrr@10": (mrr_at_k, 10), "ndcg@10": (ndcg_at_k, 10)}


def evaluate(runs: Iterable[tuple[Sequence, Iterable]], metrics: dict | None = None) -> dict:
    """Mean of each metric over (ranked, relevant) pairs; "queries" = how many were averaged."""
    metrics = metrics or STANDARD
    totals = {name: 0.0 for name in metrics}
    count = 0
    for ranked, relevant in runs:
        relevant = set(relevant)
        if not relevant:
            continue
        count += 1
        for name, (fn, k) in metrics.items():
            totals[name] += fn(ranked, relevant, k)
    return {"queries": count, **{name: (total / count if count else 0.0) for name, total in totals.items()}}
