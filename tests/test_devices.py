"""--devices: one worker process per device, shards shared among them, the output in the dataset's order.

Without GPUs here, the worker machinery runs with `cpu,cpu` (each worker on its own share of the cores);
CUDA device lists are checked against what the machine has before anything starts.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import HFBATCH, finished_shards, invoke, load, make_tiny_model, sample_rows, write_jsonl

from hfbatch.devices import parse_devices
from hfbatch.errors import InputError
from hfbatch.runner import OutputPaths


def test_parse_devices():
    assert parse_devices(None) is None
    assert parse_devices("0,1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda:1, 3") == ["cuda:1", "cuda:3"]
    assert parse_devices("cpu,cpu") == ["cpu", "cpu"]
    for bad, says in [("gpu0", "not a device"), ("cpu,0", "mixes CPU and CUDA"), ("0,cuda:0", "GPU twice")]:
        with pytest.raises(InputError, match=says):
            parse_devices(bad)


def test_a_gpu_worker_sees_only_its_gpu_counted_among_the_visible_ones(monkeypatch):
    from hfbatch.devices import claim_device

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert claim_device("cuda:1", 1, 2) == "cuda" and os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, GPU-5f3c")  # the job was given GPUs 2 and a UUID
    assert claim_device("cuda:1", 1, 2) == "cuda" and os.environ["CUDA_VISIBLE_DEVICES"] == "GPU-5f3c"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    claim_device("cuda:0", 0, 2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from click.testing import CliRunner

    work = tmp_path_factory.mktemp("devices")
    write_jsonl(work / "rows.jsonl", sample_rows(300))
    invoke(CliRunner(), ["ingest", work / "rows.jsonl", "-o", work / "ds"])
    return work / "ds"


def test_gpus_this_machine_lacks_are_refused_before_anything_runs(tmp_path, runner, dataset, tiny_model):
    import torch

    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out = tmp_path / "emb"
    result = invoke(runner, ["embed", dataset, "-o", out, "--model", tiny_model, "--devices", f"{have},{have + 1}"],
                    expect=2)
    assert f"--devices cuda:{have},cuda:{have + 1}: this machine has " in result.output
    assert "Traceback" not in result.output and not out.exists() and not OutputPaths(out).partial.exists()
    result = invoke(runner, ["embed", dataset, "-o", out, "--model", tiny_model, "--device", "cuda",
                             "--devices", "cpu,cpu"], expect=2)
    assert "--device cuda contradicts --devices cpu,cpu" in result.output
    result = invoke(runner, ["classify", dataset, "-o", out, "--model", tiny_model, "--devices", "gpu"], expect=2)
    assert "Error: --devices: 'gpu' is not a device" in result.output


def test_embed_on_two_workers_equals_one_process(tmp_path, runner, dataset, tiny_model):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--model", tiny_model, "--shard-rows", "40", "--precision", "fp32"]
    invoke(runner, ["embed", dataset, "-o", one, *args])
    invoke(runner, ["embed", dataset, "-o", two, *args, "--devices", "cpu,cpu"])
    a, b = load(one), load(two)
    assert b["id"] == a["id"] == load(dataset)["id"]  # 8 shards from two workers, merged in order
    np.testing.assert_allclose(np.asarray(b["embedding"]), np.asarray(a["embedding"]), atol=1e-6)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["rows"] == 300 and manifest["counts"]["computed"] == 300
    assert [d["device"] for d in manifest["devices"]] == ["cpu", "cpu"] and manifest["device"] == "cpu,cpu"
    assert manifest["config"]["devices"] == "cpu"  # the kind: the list changes speed, not rows
    # the same command again is a no-op, as with another worker count; no --devices at all is another
    # option (other precisions may follow), refused without --force
    assert "up_to_date" in invoke(runner, ["embed", dataset, "-o", two, *args, "--devices", "cpu,cpu"]).output
    assert "up_to_date" in invoke(runner, ["embed", dataset, "-o", two, *args, "--devices", "cpu"]).output
    assert "devices" in invoke(runner, ["embed", dataset, "-o", two, *args], expect=2).output


def test_classify_on_two_workers_equals_one_process(tmp_path, runner, dataset, tiny_model_factory):
    model = tiny_model_factory("tiny-cls-devices", pooling=None, num_labels=3)
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["--model", model, "--shard-rows", "50", "--precision", "fp32", "--top-k", "2"]
    invoke(runner, ["classify", dataset, "-o", one, *args])
    invoke(runner, ["classify", dataset, "-o", two, *args, "--devices", "cpu,cpu"])
    a, b = load(one).to_dict(), load(two).to_dict()
    assert b["id"] == a["id"] and b["label"] == a["label"] and b["top_labels"] == a["top_labels"]
    np.testing.assert_allclose(b["top_scores"], a["top_scores"], atol=1e-6)
    assert json.loads((two / "manifest.json").read_text())["labels"] == ["label_0", "label_1", "label_2"]


def test_a_worker_error_is_one_line_naming_the_worker(tmp_path, runner, dataset, tiny_model):
    out = tmp_path / "emb"
    # the tiny model takes 128 tokens: a 500-token window is refused inside each worker, before its weights load
    result = invoke(runner, ["embed", dataset, "-o", out, "--model", tiny_model, "--chunk-tokens", "500",
                             "--devices", "cpu,cpu"], expect=2)
    assert "(worker on cpu)" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()[-1]) < 400 and not out.exists()


def children_of(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # fields after the name: state, ppid, ...
            found.add(int(stat.parent.name))
    return found


def spawned_workers(pid: int) -> list[int]:
    """The job's worker processes (not multiprocessing's resource tracker)."""
    return sorted(w for w in children_of(pid) if b"spawn_main" in Path(f"/proc/{w}/cmdline").read_bytes())


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="reads the process table from /proc")
def test_kill_9_of_the_job_stops_its_workers_and_the_rerun_resumes(tmp_path, dataset):
    # a model big enough that shards take a moment, so the kill lands while workers are computing
    model = make_tiny_model(tmp_path / "model", hidden_size=128, intermediate_size=512, num_hidden_layers=4)
    ref, out = tmp_path / "ref", tmp_path / "out"
    args = ["--model", model, "--shard-rows", "10", "--precision", "fp32", "--batch-tokens", "256"]
    subprocess.run(HFBATCH + ["embed", str(dataset), "-o", str(ref), *map(str, args)], check=True,
                   capture_output=True)
    shards = OutputPaths(out).shards
    proc = subprocess.Popen(HFBATCH + ["embed", str(dataset), "-o", str(out), *map(str, args),
                                       "--devices", "cpu,cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while proc.poll() is None and finished_shards(out) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = spawned_workers(proc.pid)
    assert proc.poll() is None, f"finished before the kill: {proc.stderr.read()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(workers) == 2, workers
    deadline = time.monotonic() + 10
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(w) for w in workers), "workers outlived the killed job"
    done = finished_shards(out)
    assert 3 <= done < 30 and not out.exists()

    # a worker killed on its own (OOM killer, a signal): the job says which one died and exits 1. The kill
    # is forced, not raced: each worker SIGKILLs itself at its 2nd part commit inside a shard (hfbatch.parts)
    env = {**os.environ, "HFBATCH_PART_SECONDS": "0", "HFBATCH_TEST_KILL": "part:2"}
    proc = subprocess.run(HFBATCH + ["embed", str(dataset), "-o", str(out), *map(str, args), "--devices", "cpu,cpu"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1, proc.stderr[-1000:]
    err = proc.stderr
    assert "Error: the worker on cpu died (exit code -9) before finishing" in err and "Traceback" not in err
    assert finished_shards(out) >= done and not out.exists()
    done = finished_shards(out)
    # every finished shard was written by one of the job's workers (which of them: a worker that starts
    # faster takes more shards, so that both wrote some is not guaranteed and not asserted)
    writers = {json.loads(record.read_text())["worker"] for record in shards.glob("*.json")}
    assert writers and writers <= {"cpu#0", "cpu#1"}, writers

    rerun = subprocess.run(HFBATCH + ["embed", str(dataset), "-o", str(out), *map(str, args), "--devices",
                                      "cpu,cpu"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-1000:]
    assert f"shards_done={done}" in rerun.stderr
    a, b = load(ref), load(out)
    assert b["id"] == a["id"]
    np.testing.assert_allclose(np.asarray(b["embedding"]), np.asarray(a["embedding"]), atol=1e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["computed"] == 300
    assert sum(d["shards"] for d in manifest["devices"]) == 30 - done  # what this run's workers did


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores to split")
def test_cpu_workers_get_disjoint_shares_of_the_cores():
    code = ("import os, sys; from hfbatch.devices import claim_device; "
            "claim_device('cpu', int(sys.argv[1]), 2); print(sorted(os.sched_getaffinity(0)))")
    shares = [json.loads(subprocess.run([sys.executable, "-c", code, str(rank)], capture_output=True, text=True,
                                        check=True).stdout) for rank in (0, 1)]
    assert shares[0] and shares[1] and not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(os.sched_getaffinity(0))


def test_many_pending_shards_and_a_failing_worker_end_promptly(tmp_path):
    """50,000 pending shards (a 500M-row corpus) and workers that fail on start: one error line, at once."""
    script = tmp_path / "fail.py"
    script.write_text(
        "import functools, sys\n"
        "from pathlib import Path\n"
        "from hfbatch import log\n"
        "from hfbatch.executor import run_shards\n"
        "from hfbatch.errors import InputError\n"
        "from hfbatch.runner import ShardDir\n"
        "def broken(device):\n"
        "    raise InputError('no such model')\n"
        "if __name__ == '__main__':\n"
        "    log.setup()\n"
        "    try:\n"
        "        run_shards('test', ShardDir(Path(sys.argv[1])), list(range(50_000)), broken, ['cpu', 'cpu'],\n"
        "                   log.Progress('test', 0))\n"
        "    except InputError as exc:\n"
        "        print(exc.message)\n")
    (tmp_path / "shards").mkdir()
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "shards")], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-1000:]
    assert done.stdout.strip().startswith("no such model (worker on cpu)")


def test_workers_that_would_compute_rows_differently_are_refused():
    from hfbatch.errors import InputError
    from hfbatch.executor import _check_same_settings

    same = {"precision": "bf16", "backend": "torch", "dim": 384, "max_length": 256}
    _check_same_settings({0: same, 1: dict(same)}, ["cuda:0", "cuda:1"])
    with pytest.raises(InputError, match="precision bf16 on cuda:0 but fp16 on cuda:1.*give --precision"):
        _check_same_settings({0: same, 1: {**same, "precision": "fp16"}}, ["cuda:0", "cuda:1"])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").exists(), reason="reads the process table from /proc")
def test_ctrl_c_stops_the_workers_without_tracebacks(tmp_path, dataset):
    model = make_tiny_model(tmp_path / "model", hidden_size=128, intermediate_size=512, num_hidden_layers=4)
    out = tmp_path / "out"
    proc = subprocess.Popen(HFBATCH + ["embed", str(dataset), "-o", str(out), "--model", str(model), "--shard-rows",
                                       "10", "--devices", "cpu,cpu"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not finished_shards(out) and time.monotonic() < deadline:
        time.sleep(0.01)
    workers = spawned_workers(proc.pid)
    assert len(workers) == 2
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole process group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Aborted!" in err
    assert "Traceback" not in err and "leaked" not in err, err[-2000:]
    assert not any(alive(w) for w in workers) and not out.exists()
