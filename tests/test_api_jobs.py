"""export, merge, info, inspect and run through the Python API (`hfbatch.export(...)` etc.): the same results
as the commands' --json, and hfbatch's own errors."""

from __future__ import annotations

import json

import pytest
from conftest import invoke, load, write_jsonl

import hfbatch
from hfbatch.errors import InputError


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-jobs")
    write_jsonl(root / "docs.jsonl", [{"id": i, "text": f"document {i} about chess", "section": "games"}
                                      for i in range(23)])
    hfbatch.ingest([str(root / "docs.jsonl")], output=str(root / "ds"))
    return root / "ds"


def last_json(result) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_info_is_the_manifest_as_info_json_prints_it(runner, dataset):
    manifest = hfbatch.info(str(dataset))
    assert manifest == last_json_object(invoke(runner, ["info", dataset, "--json"]))
    assert manifest["job"] == "ingest" and manifest["rows"] == 23
    with pytest.raises(InputError, match="no manifest.json"):
        hfbatch.info(str(dataset.parent))


def last_json_object(result) -> dict:
    return json.loads(result.stdout)  # (info and inspect print one indented object)


def test_inspect_is_what_inspect_json_prints(runner, tiny_model, tmp_path):
    described = hfbatch.inspect(str(tiny_model))
    assert described == last_json_object(invoke(runner, ["inspect", tiny_model, "--json"]))
    assert described["pooling"]["mode"] == "mean" and described["parameters"]["count"] > 0
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(InputError, match="is incomplete: missing weights"):
        hfbatch.inspect(str(tmp_path))


def test_export_summary_and_file_equal_the_cli_and_a_users_file_is_refused(runner, dataset, tmp_path):
    summary = hfbatch.export(str(dataset), output=str(tmp_path / "api.csv"), columns=["id", "text"])
    printed = last_json(invoke(runner, ["export", dataset, "-o", tmp_path / "cli.csv", "--columns", "id,text",
                                        "--json"]))
    assert {k: v for k, v in summary.items() if k != "output"} == \
        {k: v for k, v in printed.items() if k not in ("output", "seconds")}
    assert summary["rows"] == 23 and summary["format"] == "csv"
    assert (tmp_path / "api.csv").read_text() == (tmp_path / "cli.csv").read_text()
    assert (tmp_path / "api.csv").read_text().splitlines()[0] == "id,text"

    users = tmp_path / "users.csv"
    users.write_text("mine\n")
    with pytest.raises(InputError, match="--force"):
        hfbatch.export(str(dataset), output=str(users))
    assert users.read_text() == "mine\n"
    with pytest.raises(InputError, match="--format 'xml'"):
        hfbatch.export(str(dataset), output=str(tmp_path / "x.csv"), fmt="xml")


def test_merge_of_embed_slices_equals_one_embed(dataset, tiny_model, tmp_path):
    options = {"model": str(tiny_model), "precision": "fp32", "backend": "torch", "shard_rows": 5}
    whole = hfbatch.embed(str(dataset), output=str(tmp_path / "whole"), **options)
    parts = [str(tmp_path / f"part-{i}") for i in range(2)]
    for i, part in enumerate(parts):
        hfbatch.embed(str(dataset), output=part, num_shards=2, shard_index=i, **options)
    with pytest.raises(InputError, match=r"slices \[1\] of 2 are missing"):
        hfbatch.merge(parts[:1], output=str(tmp_path / "merged"))
    summary = hfbatch.merge(list(reversed(parts)), output=str(tmp_path / "merged"))
    assert summary["status"] == "ok" and summary["rows"] == whole["rows"] == 23
    assert load(tmp_path / "merged").to_dict() == load(tmp_path / "whole").to_dict()
    assert hfbatch.merge(parts, output=str(tmp_path / "merged"))["status"] == "up_to_date"


def test_run_returns_each_steps_summary_and_names_the_failing_step(runner, dataset, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": 1, "text": "one"}, {"id": 2, "text": "two"}])
    pipeline = tmp_path / "pipeline.toml"
    pipeline.write_text('[[step]]\njob = "ingest"\ninputs = ["a.jsonl"]\noutput = "out/a"\n'
                        '[[step]]\nname = "export-a"\njob = "export"\ninputs = ["out/a"]\noutput = "out/a.jsonl"\n')
    dry = hfbatch.run(str(pipeline), dry_run=True)
    assert [step["state"] for step in dry["steps"]] == ["to do", "to do"] and not (tmp_path / "out").exists()

    summary = hfbatch.run(str(pipeline))
    assert [step["name"] for step in summary["steps"]] == ["1-ingest", "export-a"]
    assert [step["summary"]["rows"] for step in summary["steps"]] == [2, 2]
    assert summary["steps"][1]["command"] == f"hfbatch export {tmp_path}/out/a -o {tmp_path}/out/a.jsonl"
    assert len((tmp_path / "out" / "a.jsonl").read_text().splitlines()) == 2
    assert hfbatch.run(str(pipeline))["steps"][0]["summary"]["status"] == "up_to_date"
    printed = last_json(invoke(runner, ["run", pipeline, "--json"]))
    assert [step["summary"]["rows"] for step in printed["steps"]] == [2, 2]

    (tmp_path / "a.jsonl").unlink()
    pipeline.write_text(pipeline.read_text().replace("out/a\"\n[", "out/a\"\noptions = { force = true }\n["))
    with pytest.raises(InputError, match=r"^step 1 \(1-ingest\) failed: .*a.jsonl") as raised:
        hfbatch.run(str(pipeline))
    result = invoke(runner, ["run", pipeline], expect=2)
    assert result.output.strip().splitlines()[-1] == f"Error: {raised.value.message}"


@pytest.mark.parametrize("options, words", [
    ({"eval_fraction": 1.5}, ["--eval-fraction", "1.5", "below 1"]),
    ({"epochs": 0}, ["--epochs", "above 0"]),
    ({"batch_size": "16"}, ["--batch-size", "'16'", "integer"]),
    ({"device": "tpu"}, ["--device", "'tpu'", "cuda"]),
    ({"precision": "fp16"}, ["--precision", "'fp16'", "bf16"]),
    ({"label_column": "nope"}, ["'nope'", "--label-column"]),
])
def test_train_checks_the_options_click_would_before_it_starts(dataset, tmp_path, options, words):
    with pytest.raises(InputError) as raised:
        hfbatch.train(str(dataset), output=str(tmp_path / "model"), **{"label_column": "section", **options})
    for word in words:
        assert word in raised.value.message, raised.value.message
    assert not (tmp_path / "model").exists()
