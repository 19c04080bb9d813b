"""bench/gpu_embed.py, the one-command GPU check, run on CPU with a tiny model: it must work end to end
before a GPU machine is lent, so that the device run is that one command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_embed_script_on_cpu(tiny_model, tmp_path):
    report_file = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_embed.py"), "--device", "cpu", "--model", str(tiny_model),
           "--corpus", str(ROOT / "data" / "sample.jsonl"), "--n", "40", "--precision", "fp32",
           "--devices", "cpu,cpu", "--workdir", str(tmp_path / "work"), "--json", str(report_file)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["docs"] == 40 and report["device"] == "cpu"
    rows = report["rows"]
    assert set(rows) == {"hfbatch job (ingest + embed processes)", "hfbatch embed process alone",
                         "hfbatch embed --devices cpu,cpu", "ST defaults (fp32, batch 32)"}
    # fp32 on CPU: hfbatch's published vectors are sentence-transformers' own, with --devices too
    for name, row in rows.items():
        assert row["min_cos"] > 1 - 1e-6, (name, row)
        assert row["docs_per_s"] > 0
    assert rows["ST defaults (fp32, batch 32)"]["x_st_defaults"] == pytest.approx(1.0)
    classify = report["classify"]
    assert classify["rows"] == 40 and 0.9 <= classify["top_label_agreement"] <= 1.0
    assert set(report["goals"]) == {"job >= 10x ST defaults", "every cosine >= 0.9999"}
    assert report["goals"]["every cosine >= 0.9999"] is True
