"""hfbatch run PIPELINE.toml: steps in order, finished ones skipped, stop at the first failure."""

from conftest import invoke, write_jsonl


def write_pipeline(path, steps):
    lines = []
    for step in steps:
        lines.append("[[step]]")
        for key, value in step.items():
            if isinstance(value, dict):
                lines.append(f"{key} = {{ " + ", ".join(f'{k} = "{v}"' for k, v in value.items()) + " }")
            elif isinstance(value, list):
                lines.append(f"{key} = [" + ", ".join(f'"{v}"' for v in value) + "]")
            else:
                lines.append(f'{key} = "{value}"')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pipeline_runs_skips_finished_steps_and_stops_at_a_failing_one(tmp_path, tiny_model, runner):
    write_jsonl(tmp_path / "docs.jsonl", [{"text": f"document number {i}", "body": "b"} for i in range(20)])
    steps = [{"job": "ingest", "inputs": ["docs.jsonl"], "output": "out/ds"},
             {"job": "embed", "inputs": ["out/ds"], "output": "out/emb", "options": {"model": str(tiny_model)}},
             {"job": "index", "inputs": ["out/emb"], "output": "out/idx"}]
    pipe = write_pipeline(tmp_path / "p.toml", steps)
    dry = invoke(runner, ["run", pipe, "--dry-run"]).output
    assert "1. 1-ingest: hfbatch ingest" in dry and "state: to do" in dry and not (tmp_path / "out").exists()
    invoke(runner, ["run", pipe])
    for name in ("ds", "emb", "idx"):
        assert (tmp_path / "out" / name / "manifest.json").exists()
    stamp = (tmp_path / "out" / "emb" / "manifest.json").read_text()
    second = invoke(runner, ["run", pipe])
    assert second.output.count("up_to_date") == 3
    assert (tmp_path / "out" / "emb" / "manifest.json").read_text() == stamp

    failing = write_pipeline(tmp_path / "bad.toml", [
        steps[0],
        {"job": "embed", "inputs": ["out/ds"], "output": "out/emb2",
         "options": {"model": str(tiny_model), "text-column": "nope"}},
        {"job": "index", "inputs": ["out/emb2"], "output": "out/idx2"}])
    result = invoke(runner, ["run", failing], expect=2)
    assert "step 2 (2-embed) failed" in result.output and "nope" in result.output
    assert not (tmp_path / "out" / "idx2").exists()


def test_bad_pipeline_file_is_a_clear_error(tmp_path, runner):
    pipe = tmp_path / "p.toml"
    pipe.write_text('[[step]]\njob = "explode"\noutput = "x"\n')
    assert "cannot be a pipeline step" in invoke(runner, ["run", pipe], expect=2).output
    pipe.write_text("[[step]\n")
    assert "not valid TOML" in invoke(runner, ["run", pipe], expect=2).output
