"""hfbatch removes only what it made (issue 13, section 1): `--force` and the paths beside an output never
delete, truncate or write through a user's files; each refusal is one `Error:` line naming the path, exit 2,
and a refused run writes nothing."""

import json
import os
from pathlib import Path

import pytest
from conftest import invoke, write_jsonl

import hfbatch.runner as runner_module
from hfbatch.errors import InputError
from hfbatch.runner import MARKER, OutputLock, OutputPaths, make_marked_dir

ROWS = [{"text": "alpha"}, {"text": "beta"}, {"text": "gamma"}]


def tree(root: Path) -> dict:
    """Every path under `root` with its bytes (files), its target (symlinks, not followed) or "dir"."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                found[key] = ("symlink", os.readlink(path))
            elif path.is_dir():
                found[key] = "dir"
            else:
                found[key] = path.read_bytes()
    return found


def refused(runner, args, *names: Path):
    """Run `hfbatch ARGS`, which must be refused: exit 2, one `Error:` line naming each of `names`."""
    result = invoke(runner, args, expect=2)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert all(str(name) in errors[0] for name in names), errors[0]
    assert "Traceback" not in result.output and "internal error" not in result.output
    assert isinstance(result.exception, SystemExit)
    return errors[0]


@pytest.fixture
def src(tmp_path):
    return write_jsonl(tmp_path / "a.jsonl", ROWS)


@pytest.fixture
def proj(tmp_path):
    """A user's project directory: files hfbatch must never touch."""
    proj = tmp_path / "proj"
    (proj / "src").mkdir(parents=True)
    (proj / "src" / "main.py").write_text("print('hello')\n")
    (proj / "notes.txt").write_text("my notes\n")
    return proj


def published(out: Path) -> bool:
    return json.loads((out / "manifest.json").read_text())["job"] == "ingest"


# ---- the output itself ----------------------------------------------------------------------------------

@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_output_that_is_the_current_directory_is_refused(runner, tmp_path, src, proj, monkeypatch, force):
    monkeypatch.chdir(proj)
    before = tree(tmp_path)
    refused(runner, ["ingest", src, "-o", ".", *force], proj)
    assert tree(tmp_path) == before


def test_output_that_holds_the_current_directory_is_refused(runner, tmp_path, src, proj, monkeypatch):
    monkeypatch.chdir(proj / "src")
    before = tree(tmp_path)
    message = refused(runner, ["ingest", src, "-o", "..", "--force"], proj)
    assert "current directory" in message
    assert tree(tmp_path) == before


@pytest.mark.parametrize("output", ["corpus", "."], ids=["the-input-dir", "above-the-input-dir"])
def test_output_that_is_or_holds_an_input_is_refused(runner, tmp_path, monkeypatch, output):
    corpus = tmp_path / "work" / "corpus"
    corpus.mkdir(parents=True)
    write_jsonl(corpus / "a.jsonl", ROWS)
    write_jsonl(corpus / "b.jsonl", ROWS[:1])
    monkeypatch.chdir(tmp_path)  # so that "." is the parent of corpus but not the current directory
    before = tree(tmp_path)
    target = (tmp_path / "work" / output).resolve()
    message = refused(runner, ["ingest", corpus, "-o", target, "--force"], target)
    assert "input" in message
    assert tree(tmp_path) == before


def test_an_input_dataset_inside_the_output_is_refused(runner, tmp_path, src, tiny_model):
    invoke(runner, ["ingest", src, "-o", tmp_path / "out" / "ds"])
    before = tree(tmp_path)
    refused(runner, ["embed", tmp_path / "out" / "ds", "-o", tmp_path / "out", "--model", tiny_model, "--force"],
            tmp_path / "out")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("output", ["home", "home/thesis"], ids=["home", "a-user-dir-in-home"])
@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_home_and_a_user_directory_are_never_replaced(runner, tmp_path, src, monkeypatch, output, force):
    home = tmp_path / "home"
    (home / "thesis").mkdir(parents=True)
    (home / "thesis" / "chapter1.tex").write_text("\\section{Intro}\n")
    (home / ".bashrc").write_text("export X=1\n")
    monkeypatch.setenv("HOME", str(home))
    before = tree(tmp_path)
    message = refused(runner, ["ingest", src, "-o", tmp_path / output, *force], tmp_path / output)
    assert "--force" not in message  # --force recomputes hfbatch outputs; it is no way to replace these
    assert tree(tmp_path) == before


def test_force_help_says_what_it_replaces(runner):
    help_text = " ".join(invoke(runner, ["ingest", "--help"]).output.split())
    assert "when it is an hfbatch output" in help_text and "hfbatch did not make is never replaced" in help_text


def test_root_is_refused(runner, tmp_path, src):
    before = tree(tmp_path)
    refused(runner, ["ingest", src, "-o", "/", "--force"], "--output /")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("output", ["notes.txt/ds", "notes.txt/a/b/ds"], ids=["parent", "ancestor"])
def test_output_under_a_file_is_refused(runner, tmp_path, src, output):
    (tmp_path / "notes.txt").write_text("a file, not a directory\n")
    before = tree(tmp_path)
    refused(runner, ["ingest", src, "-o", tmp_path / output], tmp_path / "notes.txt")
    assert tree(tmp_path) == before


def test_an_empty_directory_made_for_the_output_is_used(runner, tmp_path, src):
    (tmp_path / "out").mkdir()
    invoke(runner, ["ingest", src, "-o", tmp_path / "out"])
    assert published(tmp_path / "out")
    assert not (tmp_path / "out" / MARKER).exists()  # the marker is for side dirs; outputs have manifests
    assert sorted(tmp_path.iterdir()) == [OutputPaths(tmp_path / "out").lock, tmp_path / "a.jsonl", tmp_path / "out"]


def test_a_json_manifest_that_is_not_hfbatchs_does_not_make_a_directory_replaceable(runner, tmp_path, src):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"name": "my web app", "version": 3}\n')  # e.g. a PWA manifest
    (mine / "index.html").write_text("<html></html>\n")
    before = tree(tmp_path)
    refused(runner, ["ingest", src, "-o", mine, "--force"], mine)
    assert tree(tmp_path) == before


# ---- the side paths: lock, work directory, temp directories -----------------------------------------------

@pytest.mark.parametrize("lockfile", ["uv.lock", "Cargo.lock"])
def test_a_users_lock_file_beside_the_output_keeps_its_bytes(runner, tmp_path, src, lockfile):
    user_lock = tmp_path / lockfile
    user_lock.write_bytes(b"# do not edit\nversion = 1\n")
    out = tmp_path / Path(lockfile).stem
    invoke(runner, ["ingest", src, "-o", out])
    assert published(out) and user_lock.read_bytes() == b"# do not edit\nversion = 1\n"


def test_a_users_lock_file_keeps_its_bytes_when_the_run_is_refused(runner, tmp_path, src):
    (tmp_path / "uv.lock").write_bytes(b"version = 1\n")
    (tmp_path / "uv").mkdir()
    (tmp_path / "uv" / "pyproject.toml").write_text("[project]\n")
    before = tree(tmp_path)
    refused(runner, ["ingest", src, "-o", tmp_path / "uv", "--force"], tmp_path / "uv")
    assert tree(tmp_path) == before


def hfbatch_path(out: Path, which: str) -> Path:
    paths = OutputPaths(out)
    return {"lock": paths.lock, "partial": paths.partial, "tmp": paths.tmp(12345)}[which]


@pytest.mark.parametrize("which", ["lock", "partial", "tmp"])
@pytest.mark.parametrize("force", [[], ["--force"]], ids=["plain", "force"])
def test_a_symlink_at_a_side_path_is_refused_and_not_followed(runner, tmp_path, src, which, force):
    out = tmp_path / "out"
    invoke(runner, ["ingest", src, "-o", out])  # an output of ours, so that only the side path is at stake
    target = tmp_path / "elsewhere"
    if which == "lock":
        target.write_bytes(b"precious\n")
    else:
        target.mkdir()
        (target / "keep.txt").write_text("keep\n")
    side = hfbatch_path(out, which)
    side.unlink(missing_ok=True)
    side.symlink_to(target)
    write_jsonl(src, ROWS[:2])  # a changed input, so that a run would write shards
    before = tree(tmp_path)
    refused(runner, ["ingest", src, "-o", out, *force], side)
    assert tree(tmp_path) == before


@pytest.mark.parametrize("which,kind", [("lock", "dir"), ("partial", "dir"), ("tmp", "dir"),
                                        ("partial", "file"), ("tmp", "file")])
def test_what_hfbatch_did_not_make_at_a_side_path_is_refused(runner, tmp_path, src, which, kind):
    out = tmp_path / "out"
    side = hfbatch_path(out, which)
    if kind == "dir":
        side.mkdir()
        (side / "data.csv").write_text("a,b\n")
    else:
        side.write_text("a,b\n")
    before = tree(tmp_path)
    refused(runner, ["ingest", src, "-o", out, "--force"], side)
    assert tree(tmp_path) == before


def test_a_file_at_the_lock_path_that_is_not_hfbatchs_lock_is_not_written(runner, tmp_path, src):
    lock = OutputPaths(tmp_path / "out").lock
    lock.write_bytes(b"someone else's data\n")
    before = tree(tmp_path)
    refused(runner, ["ingest", src, "-o", tmp_path / "out"], lock)
    assert tree(tmp_path) == before


def test_the_lock_itself_never_follows_a_symlink(tmp_path):
    """The lock's own open (not only the check before it) refuses a symlink: O_NOFOLLOW."""
    target = tmp_path / "target"
    target.write_bytes(b"precious\n")
    lock = OutputLock(tmp_path / "out")
    lock.path.symlink_to(target)
    lock.refuse_foreign = lambda: None  # as if the symlink appeared after the check
    with pytest.raises(InputError, match="symbolic link"):
        lock.acquire()
    assert target.read_bytes() == b"precious\n"


@pytest.mark.parametrize("name", ["foo.partial", "foo.lock", ".foo.tmp-1"])
def test_paths_that_older_hfbatch_used_are_a_users_and_untouched(runner, tmp_path, src, name):
    user = tmp_path / name
    user.mkdir()
    (user / "thesis.tex").write_text("keep\n")
    invoke(runner, ["ingest", src, "-o", tmp_path / "foo", "--force"])
    assert published(tmp_path / "foo") and (user / "thesis.tex").read_text() == "keep\n"


def test_an_output_name_with_glob_characters_sweeps_only_its_own_temp_dirs(runner, tmp_path, src):
    others = [make_marked_dir(OutputPaths(tmp_path / name).tmp(4242)) for name in ("abc", "a", "ab*")]
    for other in others:
        (other / "half.arrow").write_bytes(b"another run's work")
    own_stale = make_marked_dir(OutputPaths(tmp_path / "a*").tmp(4242))  # a killed run of this output
    invoke(runner, ["ingest", src, "-o", tmp_path / "a*"])
    assert published(tmp_path / "a*") and not own_stale.exists()
    assert all((other / "half.arrow").read_bytes() == b"another run's work" for other in others)


def test_a_partial_symlink_gets_no_shards_and_force_still_says_why(runner, tmp_path, src):
    out = tmp_path / "foo"
    target = tmp_path / "mydata"
    target.mkdir()
    (target / "keep.txt").write_text("keep\n")
    OutputPaths(out).partial.symlink_to(target)
    before = tree(tmp_path)
    refused(runner, ["ingest", src, "-o", out], OutputPaths(out).partial)
    refused(runner, ["ingest", src, "-o", out, "--force"], OutputPaths(out).partial)
    assert tree(tmp_path) == before


# ---- a kill between publish and the work directory's removal --------------------------------------------

class Killed(Exception):
    """Stands for SIGKILL: nothing after it runs, no clean-up."""


@pytest.mark.parametrize("how", ["before-removal", "part-way-through-removal"])
def test_the_work_directory_of_a_published_run_is_removed_by_the_next_run(runner, tmp_path, src, monkeypatch,
                                                                           how):
    out = tmp_path / "out"
    partial = OutputPaths(out).partial
    real_remove = runner_module.remove_made_dir

    def killed_removing(path):
        if path == partial:
            if how == "part-way-through-removal":
                (path / "job.json").unlink()  # remove_made_dir's first step, then the kill
            raise Killed()
        real_remove(path)

    monkeypatch.setattr(runner_module, "remove_made_dir", killed_removing)
    result = invoke(runner, ["ingest", src, "-o", out], expect=1)
    assert isinstance(result.exception, Killed)
    assert published(out) and (partial / MARKER).exists()  # the orphan a kill leaves
    monkeypatch.undo()
    build = json.loads((out / "manifest.json").read_text())["build_id"]

    invoke(runner, ["ingest", src, "-o", out])  # up to date: nothing recomputed, the orphan removed
    assert json.loads((out / "manifest.json").read_text())["build_id"] == build
    assert not partial.exists()


def test_the_work_directory_of_an_unpublished_run_is_resumed_not_removed(runner, tmp_path, src, monkeypatch):
    out = tmp_path / "out"

    def killed(*args, **kwargs):
        raise Killed()

    monkeypatch.setattr(runner_module, "publish_dir", killed)
    invoke(runner, ["ingest", src, "-o", out], expect=1)
    assert not out.exists() and list(OutputPaths(out).shards.glob("*.json"))
    monkeypatch.undo()

    monkeypatch.setattr(runner_module.ShardDir, "finish_shard", killed)  # resuming computes no shard again
    invoke(runner, ["ingest", src, "-o", out])
    assert json.loads((out / "manifest.json").read_text())["rows"] == len(ROWS)
    assert not OutputPaths(out).partial.exists()


def test_an_output_inside_an_input_dataset_is_refused(runner, tmp_path, src, tiny_model):
    """A dataset job's output, or an export's file, inside the dataset it reads (with --force too): the
    export would have replaced the dataset's own Arrow file with JSON Lines."""
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    before = tree(tmp_path)
    arrow = next((tmp_path / "ds").glob("*.arrow"))
    refused(runner, ["export", tmp_path / "ds", "-o", arrow, "--format", "jsonl", "--force"], arrow, "inside")
    refused(runner, ["export", tmp_path / "ds", "-o", tmp_path / "ds" / "x.jsonl"], "inside")
    refused(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "ds" / "emb", "--model", tiny_model, "--force"],
            tmp_path / "ds" / "emb", "inside")
    assert tree(tmp_path) == before
    invoke(runner, ["export", tmp_path / "ds", "-o", tmp_path / "rows.jsonl"])
    assert len((tmp_path / "rows.jsonl").read_text().splitlines()) == len(ROWS)


def test_search_output_over_the_datasets_its_index_reads_is_refused(runner, tmp_path, src, tiny_model):
    """search reads the index's source dataset (text, --filter) and records its embeddings: -o over either, with
    --force, would have replaced them with the hits."""
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    invoke(runner, ["embed", tmp_path / "ds", "-o", tmp_path / "emb", "--model", tiny_model, "--precision", "fp32"])
    invoke(runner, ["index", tmp_path / "emb", "-o", tmp_path / "idx"])
    before = tree(tmp_path)
    for target in (tmp_path / "ds", tmp_path / "emb"):
        refused(runner, ["search", tmp_path / "idx", "a query", "-o", target, "--force"], target, "input")
    assert tree(tmp_path) == before
    hits = invoke(runner, ["search", tmp_path / "idx", "a query", "-k", "2"]).stdout.splitlines()
    assert [json.loads(h)["text"] is not None for h in hits] == [True, True]


def test_an_output_over_the_model_directory_a_job_reads_is_refused(runner, tmp_path, src, tiny_model):
    """--model (and --base-model, --tokenizer) directories are inputs too: `-o MODEL --force`, or an output
    holding the model, replaced them with the job's output. Here the model is an hfbatch output itself (made
    by train), so only the input check can save it."""
    import shutil

    model = tmp_path / "work" / "model"
    shutil.copytree(tiny_model, model)
    (model / "manifest.json").write_text(json.dumps({"hfbatch": "0.1.0", "job": "train"}))
    invoke(runner, ["ingest", src, "-o", tmp_path / "ds"])
    before = tree(tmp_path)
    for target in (model, model.parent):
        refused(runner, ["embed", tmp_path / "ds", "-o", target, "--model", model, "--force"], target, "input")
        refused(runner, ["tokenize", tmp_path / "ds", "-o", target, "--model", model, "--force"], target, "input")
    refused(runner, ["embed", tmp_path / "ds", "-o", model / "emb", "--model", model], "inside")
    assert tree(tmp_path) == before
