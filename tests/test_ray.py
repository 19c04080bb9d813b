"""--executor ray: the same rows, order and values as a local run, on a Ray actor pool; worker and driver kills.

One local Ray per test session (`ray.init(num_cpus=2)`, shut down at the end), shared by every test here: the
in-process runs use it as it is, and the drivers run as their own processes join it with --ray-address. The
tests that need Ray skip when it is not installed (`pip install 'hfbatch[ray]'`; `make test` installs it).
Kills are deterministic: a worker waits at a known shard (HFBATCH_TEST_RAY_HOLD) until the test kills it.
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
from conftest import HFBATCH, finished_shards, ingested_sample, invoke, load, python_succeeds, write_jsonl

from hfbatch.runner import OutputPaths

ROWS, SHARD_ROWS = 120, 30  # four shards
COMMON = ["--shard-rows", str(SHARD_ROWS), "--precision", "fp32", "--batch-tokens", "256"]  # several batches a shard


@pytest.fixture(scope="session")
def ray_address():
    """The session's local Ray (2 CPUs); its address, for drivers in other processes."""
    ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'hfbatch[ray]'")
    # address "local": a Ray of its own, never a cluster that something else started on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=100 * 2**20,
             logging_level="warning")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return ingested_sample(tmp_path_factory.mktemp("ray"), ROWS)


@pytest.fixture(scope="module")
def local_embeddings(tmp_path_factory, dataset, tiny_model):
    from click.testing import CliRunner

    out = tmp_path_factory.mktemp("ray-local") / "emb"
    invoke(CliRunner(), ["embed", dataset, "-o", out, "--model", tiny_model, *COMMON])
    return out


def assert_same_embeddings(out, expected):
    a, b = load(expected), load(out)
    assert b["id"] == a["id"]
    np.testing.assert_allclose(np.asarray(b["embedding"]), np.asarray(a["embedding"]), atol=1e-5)


def test_embed_on_ray_equals_local(tmp_path, runner, ray_address, dataset, tiny_model, local_embeddings):
    out = tmp_path / "emb"
    result = invoke(runner, ["embed", dataset, "-o", out, "--model", tiny_model, *COMMON, "--executor", "ray",
                             "--num-workers", "2", "--json"])
    assert_same_embeddings(out, local_embeddings)
    assert load(out)["id"] == load(dataset)["id"]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["status"] == "ok" and summary["rows"] == ROWS and summary["rows_computed"] == ROWS
    assert len(summary["workers"]) == 2 and sum(w["shards"] for w in summary["workers"]) == ROWS // SHARD_ROWS
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["executor"] == "ray" and manifest["cluster"]["device_kinds"] == ["cpu"]
    assert manifest["cluster"]["cpus_per_worker"] == 1  # two actors on the session's 2 CPUs
    assert [w["shards"] for w in manifest["workers"]] == [w["shards"] for w in summary["workers"]]
    # the same config as a local run: a local re-run finds it up to date (the executor changes no rows)
    again = invoke(runner, ["embed", dataset, "-o", out, "--model", tiny_model, *COMMON, "--json"])
    assert json.loads(again.stdout.strip().splitlines()[-1])["status"] == "up_to_date"


def test_classify_on_ray_equals_local(tmp_path, runner, ray_address, dataset, tiny_model_factory):
    model = tiny_model_factory("ray-classifier", pooling=None, num_labels=3)
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    args = ["--model", model, *COMMON, "--top-k", "2"]
    invoke(runner, ["classify", dataset, "-o", local, *args])
    invoke(runner, ["classify", dataset, "-o", on_ray, *args, "--executor", "ray"])  # one actor, both CPUs
    a, b = load(local), load(on_ray)
    assert b["id"] == a["id"] and b["label"] == a["label"] and b["top_labels"] == a["top_labels"]
    np.testing.assert_allclose(np.asarray(b["score"]), np.asarray(a["score"]), atol=1e-5)
    np.testing.assert_allclose(np.asarray(b["top_scores"]), np.asarray(a["top_scores"]), atol=1e-5)
    manifest = json.loads((on_ray / "manifest.json").read_text())
    assert manifest["labels"] == ["label_0", "label_1", "label_2"]
    assert manifest["cluster"]["cpus_per_worker"] == 2 and len(manifest["workers"]) == 1


def test_tokenize_on_ray_equals_local(tmp_path, runner, ray_address, dataset, tiny_model):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    args = ["--model", tiny_model, "--shard-rows", str(SHARD_ROWS), "--max-length", "16"]
    invoke(runner, ["tokenize", dataset, "-o", local, *args])
    invoke(runner, ["tokenize", dataset, "-o", on_ray, *args, "--executor", "ray", "--num-workers", "2"])
    a, b = load(local), load(on_ray)
    assert b.to_dict() == a.to_dict() and len(a) == ROWS
    assert json.loads((on_ray / "manifest.json").read_text())["executor"] == "ray"


def test_generate_on_ray_equals_local(tmp_path, runner, ray_address, tiny_model):
    from test_generate import PROMPTS, make_tiny_gpt2

    model = make_tiny_gpt2(tmp_path / "gpt2")
    write_jsonl(tmp_path / "prompts.jsonl", [{"id": f"p{i}", "text": t} for i, t in enumerate(PROMPTS)])
    invoke(runner, ["ingest", tmp_path / "prompts.jsonl", "-o", tmp_path / "ds"])
    args = ["--model", model, "--shard-rows", "2", "--max-new-tokens", "8", "--do-sample", "--seed", "7"]
    invoke(runner, ["generate", tmp_path / "ds", "-o", tmp_path / "local", *args])
    invoke(runner, ["generate", tmp_path / "ds", "-o", tmp_path / "ray", *args, "--executor", "ray",
                    "--num-workers", "2"])
    a, b = load(tmp_path / "local"), load(tmp_path / "ray")
    assert b["id"] == a["id"] and b["generation"] == a["generation"] and b["finish_reason"] == a["finish_reason"]
    assert json.loads((tmp_path / "ray" / "manifest.json").read_text())["executor"] == "ray"


def driver(args, env_extra):
    """`hfbatch ARGS` as its own process (a driver the test can kill)."""
    env = {**os.environ, "HFBATCH_PART_SECONDS": "0", **env_extra}  # a part after every batch
    return subprocess.Popen([*HFBATCH, *map(str, args)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def held_pid(hold: Path, proc: subprocess.Popen, limit_s: float = 300) -> int:
    """The pid of the worker waiting at HFBATCH_TEST_RAY_HOLD (it waits until killed: no race)."""
    deadline = time.monotonic() + limit_s
    while not (hold.exists() and hold.read_text().endswith("\n")):
        if proc.poll() is not None:
            raise AssertionError(f"the driver ended (rc {proc.returncode}) before a worker held:\n"
                                 f"{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("no worker reached the hold point")
        time.sleep(0.2)
    return int(hold.read_text())


def summary_of(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_a_worker_killed_mid_shard_is_retried_and_the_output_is_exact(tmp_path, ray_address, dataset, tiny_model,
                                                                      local_embeddings):
    out, hold = tmp_path / "emb", tmp_path / "hold"
    proc = driver(["embed", dataset, "-o", out, "--model", tiny_model, *COMMON, "--executor", "ray",
                   "--ray-address", ray_address, "--num-workers", "2", "--json"],
                  {"HFBATCH_TEST_RAY_HOLD": f"{hold}:1"})
    os.kill(held_pid(hold, proc), signal.SIGKILL)  # the worker computing shard 1, after its first batch
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert_same_embeddings(out, local_embeddings)
    assert "msg=ray_shard_failed shard=1" in stderr and "worker died" in stderr
    summary = summary_of(stdout)
    assert len(summary["workers"]) == 3  # two, and the one that replaced the killed worker
    assert sum(w["shards"] for w in summary["workers"]) == ROWS // SHARD_ROWS
    # the retry took the batches the killed worker had committed (parts live on the shared storage)
    assert summary["rows_resumed"] > 0 and summary["rows_computed"] + summary["rows_resumed"] == ROWS


def test_a_driver_killed_mid_run_resumes_to_the_same_output(tmp_path, ray_address, dataset, tiny_model,
                                                            local_embeddings):
    out, hold = tmp_path / "emb", tmp_path / "hold"
    args = ["embed", dataset, "-o", out, "--model", tiny_model, *COMMON, "--executor", "ray",
            "--ray-address", ray_address, "--num-workers", "1", "--json"]
    proc = driver(args, {"HFBATCH_TEST_RAY_HOLD": f"{hold}:2"})
    held_pid(hold, proc)  # the one worker is in shard 2: shards 0 and 1 are finished
    proc.kill()  # SIGKILL the driver; Ray ends its actors
    proc.communicate(timeout=60)
    assert not out.exists() and finished_shards(out) == 2
    rerun = driver(args, {})
    stdout, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr
    assert_same_embeddings(out, local_embeddings)
    assert "msg=resuming" in stderr and "shards_done=2" in stderr
    summary = summary_of(stdout)
    # only shards 2 and 3 were run again, shard 2 partly from the parts the killed run committed
    assert summary["rows_computed"] + summary["rows_resumed"] == ROWS - 2 * SHARD_ROWS
    assert summary["rows_resumed"] > 0
    assert not OutputPaths(out).partial.exists()


def test_a_shard_that_always_fails_fails_the_job_in_one_line(tmp_path, runner, monkeypatch, ray_address, dataset,
                                                             tiny_model):
    monkeypatch.setenv("HFBATCH_TEST_RAY_FAIL", "2")  # forwarded to the actors, which raise at shard 2
    out = tmp_path / "emb"
    result = invoke(runner, ["embed", dataset, "-o", out, "--model", tiny_model, *COMMON, "--executor", "ray",
                             "--max-retries", "1"], expect=1)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert errors[0].startswith("Error: shard 2 failed 2 times (--max-retries 1); last on node ")
    assert "RuntimeError: HFBATCH_TEST_RAY_FAIL: shard 2 fails on every attempt" in errors[0]
    assert "Traceback" not in result.output and not out.exists()
    assert result.output.count("msg=ray_shard_failed shard=2") == 2


def test_without_ray_the_error_is_one_line(tmp_path, runner, monkeypatch, dataset, tiny_model):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is missing
    out = tmp_path / "emb"
    for job in (["embed", dataset], ["classify", dataset]):
        result = invoke(runner, [*job, "-o", out, "--model", tiny_model, "--executor", "ray"], expect=2)
        assert result.output.strip() == ("Error: --executor ray needs Ray, which is not installed: "
                                         "pip install 'hfbatch[ray]'")
        assert not out.exists() and not OutputPaths(out).partial.exists()


def test_ray_is_imported_only_when_a_job_uses_it():
    code = ("import sys\n"
            "import hfbatch.ray_executor, hfbatch.embedding, hfbatch.classification\n"
            "assert 'click' not in sys.modules, 'the library imported click'\n"
            "import click, hfbatch.cli\n"
            "[hfbatch.cli.cli.get_command(click.Context(hfbatch.cli.cli), job) for job in ('embed', 'classify')]\n"
            "from hfbatch.ray_executor import executor_for\n"
            "assert executor_for('local') is None\n"
            "assert 'ray' not in sys.modules, 'ray imported'\n")
    python_succeeds(code)


def test_ray_options_need_the_ray_executor(tmp_path, runner, dataset, tiny_model):
    out = tmp_path / "emb"
    result = invoke(runner, ["embed", dataset, "-o", out, "--model", tiny_model, "--num-workers", "2"], expect=2)
    assert "--num-workers needs --executor ray" in result.output
    result = invoke(runner, ["embed", dataset, "-o", out, "--model", tiny_model, "--executor", "ray",
                             "--devices", "cpu,cpu"], expect=2)
    assert "Error: --devices is for the local executor" in result.output
    result = invoke(runner, ["classify", dataset, "-o", out, "--model", tiny_model, "--executor", "ray",
                             "--device", "cuda", "--gpus-per-worker", "0"], expect=2)
    assert "Error: --device cuda contradicts --gpus-per-worker 0" in result.output
    assert not out.exists() and not OutputPaths(out).partial.exists()


def test_the_python_api_takes_the_commands_ray_options(tmp_path, ray_address, dataset, tiny_model, local_embeddings):
    import hfbatch
    from hfbatch.errors import InputError

    out = tmp_path / "emb"
    with pytest.raises(InputError, match="--num-workers, --max-retries needs --executor ray"):
        hfbatch.embed(str(dataset), output=str(out), model=str(tiny_model), num_workers=2, max_retries=0)
    assert not out.exists()
    summary = hfbatch.embed(str(dataset), output=str(out), model=str(tiny_model), shard_rows=SHARD_ROWS,
                                    precision="fp32", batch_tokens=256, executor="ray", num_workers=1, max_retries=0)
    assert summary["rows"] == ROWS and [w["shards"] for w in summary["workers"]] == [ROWS // SHARD_ROWS]
    assert_same_embeddings(out, local_embeddings)


def test_an_address_where_no_cluster_answers_is_one_line(tmp_path, dataset, tiny_model):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    out = tmp_path / "emb"
    done = subprocess.run([*HFBATCH, "embed", dataset, "-o", out, "--model", tiny_model, "--executor", "ray"],
                          env={**os.environ, "RAY_ADDRESS": address}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
        f"Error: --ray-address {address}: no Ray cluster answers there (")
    assert not out.exists() and not OutputPaths(out).partial.exists()


def test_a_node_that_cannot_see_the_storage_says_what_it_cannot_do(tmp_path):
    from hfbatch.ray_executor import ShardWorker

    worker = ShardWorker("embed", str(tmp_path / "no-such-partial" / "shards"), "ray#0")
    problems = worker.check_storage([str(tmp_path / "no-such-dataset")])
    assert len(problems) == 2
    assert problems[0].startswith(f"cannot open the input {tmp_path / 'no-such-dataset'} (")
    assert problems[1].startswith(f"cannot write into {tmp_path / 'no-such-partial' / 'shards'} (")
    (tmp_path / "shards").mkdir()
    assert ShardWorker("embed", str(tmp_path / "shards"), "ray#0").check_storage([str(tmp_path)]) == []
    assert list((tmp_path / "shards").iterdir()) == []  # its probe file is gone


def test_cpu_actors_get_as_many_cpus_as_the_nodes_allow():
    from hfbatch.ray_executor import _cpus_per_worker

    assert _cpus_per_worker([2], 1) == 2 and _cpus_per_worker([2], 2) == 1 and _cpus_per_worker([2], 3) == 0
    assert _cpus_per_worker([16, 4], 2) == 8 and _cpus_per_worker([16, 4], 3) == 5
