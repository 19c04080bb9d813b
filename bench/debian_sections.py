"""Debian-section data for the classification demo and benchmark, from the shared corpus.

    prepare: the rows of the N largest sections, at most TRAIN per section for training and HELDOUT per
             section never trained on, as train.jsonl and heldout.jsonl (for `hfbatch ingest`).
    score:   accuracy of an `hfbatch classify` output against the held-out dataset's `section` column.

    python bench/debian_sections.py prepare -o out/debian --train-per-section 800 --heldout-per-section 250
    python bench/debian_sections.py score out/debian-heldout out/debian-labels

The corpus is ../shared/corpora/debian-descriptions.jsonl.gz beside the repository unless --corpus (or the
environment variable HFBATCH_DEBIAN_CORPUS) says otherwise. `make demo-classify` runs both steps.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
from collections import Counter, defaultdict
from pathlib import Path

CORPUS = Path(os.environ.get("HFBATCH_DEBIAN_CORPUS") or
              Path(__file__).resolve().parents[1].parent / "shared" / "corpora" / "debian-descriptions.jsonl.gz")


def read_corpus(path: Path = CORPUS) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"the shared Debian corpus is not at {path}; pass --corpus PATH (or set "
                         f"HFBATCH_DEBIAN_CORPUS) to the debian-descriptions.jsonl.gz file")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def split_sections(rows: list[dict], sections: int, train_per_section: int, heldout_per_section: int,
                   seed: int = 0) -> tuple[list[str], list[dict], list[dict]]:
    """(the N largest sections, training rows, held-out rows), both sorted by id."""
    largest = [name for name, _ in Counter(r["section"] for r in rows).most_common(sections)]
    by_section = defaultdict(list)
    for row in rows:
        if row["section"] in largest:
            by_section[row["section"]].append(row)
    rng = random.Random(seed)
    train, heldout = [], []
    for name in largest:  # held-out rows first, so a bigger training sample never eats into them
        group = by_section[name]
        rng.shuffle(group)
        heldout += group[:heldout_per_section]
        train += group[heldout_per_section:heldout_per_section + train_per_section]
    return largest, sorted(train, key=lambda r: r["id"]), sorted(heldout, key=lambda r: r["id"])


def prepare(out: Path, sections: int, train_per_section: int, heldout_per_section: int, seed: int,
            corpus: Path = CORPUS) -> None:
    largest, train, heldout = split_sections(read_corpus(corpus), sections, train_per_section,
                                             heldout_per_section, seed)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("heldout", heldout)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    print(f"sections: {', '.join(largest)}")
    print(f"{out}/train.jsonl: {len(train)} rows; {out}/heldout.jsonl: {len(heldout)} rows")


def score(heldout: Path, labels: Path) -> float:
    import datasets

    source = datasets.load_from_disk(str(heldout))
    gold = dict(zip(source["id"], source["section"]))
    predicted = datasets.load_from_disk(str(labels))
    hits, per_section = 0, defaultdict(lambda: [0, 0])
    for row_id, label in zip(predicted["id"], predicted["label"]):
        ok = gold[row_id] == label
        hits += ok
        per_section[gold[row_id]][0] += ok
        per_section[gold[row_id]][1] += 1
    accuracy = hits / len(predicted)
    for name, (ok, n) in sorted(per_section.items()):
        print(f"  {name:<10} {ok / n:.3f}  ({n} rows)")
    print(f"held-out accuracy: {accuracy:.4f} ({hits}/{len(predicted)})")
    return accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("prepare")
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--corpus", type=Path, default=CORPUS, help="debian-descriptions.jsonl.gz (default: %(default)s)")
    p.add_argument("--sections", type=int, default=8)
    p.add_argument("--train-per-section", type=int, default=800)
    p.add_argument("--heldout-per-section", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    s = commands.add_parser("score")
    s.add_argument("heldout", type=Path)
    s.add_argument("labels", type=Path)
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.output, args.sections, args.train_per_section, args.heldout_per_section, args.seed,
                args.corpus)
    else:
        score(args.heldout, args.labels)


if __name__ == "__main__":
    main()
