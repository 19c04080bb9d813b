"""The command surface: every command documented with an example, errors are one line with exit codes."""

import json
import subprocess
import sys

import pytest
from conftest import invoke, write_jsonl

from hfbatch.cli import JOBS, cli


@pytest.mark.parametrize("name", sorted(JOBS))
def test_every_command_has_help_with_an_example(runner, name):
    result = invoke(runner, [name, "--help"])
    assert "Example:" in result.output, f"`hfbatch {name} --help` shows no example"
    command = cli.get_command(None, name)
    assert command.help and len(command.help.strip()) > 40


def test_group_help_lists_every_command(runner):
    output = invoke(runner, ["--help"]).output
    for name in JOBS:
        assert name in output


def test_unknown_option_is_a_usage_error(runner):
    result = invoke(runner, ["ingest", "--no-such-option"], expect=2)
    assert "No such option" in result.output


def test_missing_input_is_one_line_exit_2_without_traceback(runner, tmp_path):
    result = invoke(runner, ["ingest", str(tmp_path / "nope.jsonl"), "-o", str(tmp_path / "out")], expect=2)
    assert "nope.jsonl" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_missing_text_column_names_the_available_ones(runner, tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"body": "hello", "title": "x"}])
    result = invoke(runner, ["ingest", src, "-o", tmp_path / "out"], expect=2)
    assert "'text'" in result.output and "body" in result.output and "title" in result.output
    assert "--text-column" in result.output
    assert not (tmp_path / "out").exists()


def test_reader_refuses_a_directory_without_manifest(runner, tmp_path, tiny_model):
    half = tmp_path / "half"
    half.mkdir()
    (half / "data-00000-of-00001.arrow").write_bytes(b"")
    result = invoke(runner, ["embed", half, "-o", tmp_path / "emb", "--model", tiny_model], expect=2)
    assert "no manifest.json" in result.output


def test_incomplete_model_dir_names_what_is_missing(runner, tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world"}])
    invoke(runner, ["ingest", tmp_path / "a.jsonl", "-o", tmp_path / "ds"])
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    result = invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", "--model", model], expect=2)
    assert "weights" in result.output and "tokenizer" in result.output


def test_console_script_reports_version():
    exe = __import__("shutil").which("hfbatch") or str(__import__("pathlib").Path(sys.executable).parent / "hfbatch")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True)
    assert "hfbatch" in out.stdout


def test_the_library_raises_its_own_errors_and_never_imports_click(tmp_path):
    """lib/ below cli.py is usable without Click: its errors are plain exceptions that the CLI translates."""
    modules = ["errors", "runner", "io", "expr", "indexing", "retrieval", "ingestion", "devices", "models", "embedding",
               "classification", "batching", "chunking", "tokenized", "training", "exporting", "merging",
               "output_info", "inspection", "hashing", "metrics", "log"]
    code = (f"import sys\nfor m in {modules!r}: __import__('hfbatch.' + m)\n"
            "assert 'click' not in sys.modules, 'click imported'\n"
            "from hfbatch.errors import HfbatchError, InputError\n"
            "from hfbatch.runner import require_complete\n"
            "try:\n    require_complete(sys.argv[1])\nexcept InputError as exc:\n"
            "    print(type(exc).__mro__[1].__name__, exc.exit_code, exc.message)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "missing")], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"HfbatchError 2 input {tmp_path / 'missing'} does not exist")


def test_a_library_error_is_one_line_with_its_exit_code_through_the_cli(runner, tmp_path):
    result = invoke(runner, ["embed", tmp_path / "missing", "-o", tmp_path / "out"], expect=2)
    assert result.output.strip().splitlines()[-1].startswith("Error: ") and "Traceback" not in result.output
