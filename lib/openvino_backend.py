"""OpenVINO CPU inference backend: convert a local Hugging Face model directory once, cache the IR, run it.

    enc = OpenVINOEncoder(model_dir, task="embed", pooling="mean", normalize=True, precision="bf16")
    vectors = enc.run(input_ids, attention_mask)          # float32 [B, H]

* Conversion uses ``openvino.convert_model`` on the transformers model (``AutoModel`` for ``task="embed"``,
  ``AutoModelForSequenceClassification`` for ``task="classify"``) traced with dynamic batch and sequence dims.
  Not optimum-intel.
* For embeddings the pooling (masked mean / CLS / masked max, optional L2 normalisation) is appended to the
  graph with OpenVINO ops, so only ``[B, H]`` comes back. Those ops are marked "precise", but the CPU plugin
  of OpenVINO 2026.4 runs them in bf16 all the same under a bf16 hint (their runtimePrecision says so), which
  still gives cosines of 0.99997 to fp32. ``pooling=None`` returns the model's main output
  (``last_hidden_state`` ``[B, T, H]`` or ``logits`` ``[B, labels]``).
* A classifier under bf16 is compiled as two models (``split_head``): the encoder in bf16 up to its last
  LayerNorm, and the head (LayerNorm's scale, pooler, classifier) in f32, so only near-ties flip its labels.
* Where the output reads the first token alone (a classifier's head, CLS pooling), the cached graph's last
  layer computes that token only (``first_token_last_layer``), kept only where it gives the whole graph's
  output on a probe batch (``same_function``); the entry's meta.json says which (``last_layer``).
* OpenVINO's compiled-model cache (``CACHE_DIR``) lives in ``compiled/`` inside the IR's entry, and the
  weight files' sha256 are remembered by stat in ``file-digests.json``: a warm start hashes and compiles
  nothing.
* The converted IR is cached under ``cache_dir`` (argument) or ``$HFBATCH_CACHE_DIR/openvino`` or
  ``~/.cache/hfbatch/openvino``, in one folder per key: a sha256 over the model's config and weight files
  (relative paths + bytes), the graph options and the library versions. An entry is written in a temporary
  folder beside it and renamed into place whole, so a reader never sees half an entry and concurrent
  writers cannot corrupt one. A hit does not import torch or transformers at all.
* ``precision="bf16"`` compiles with ``INFERENCE_PRECISION_HINT=bf16`` where the CPU has native bf16
  (``cpu_has_bf16()``), else falls back to f32 (``OpenVINOEncoder.precision`` says which one is in force);
  ``precision="fp32"`` is the exact mode (``INFERENCE_PRECISION_HINT=f32``).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Bump when the way a graph is built changes, so old cache entries are not reused.
GRAPH_FORMAT = 1

#: Attention implementation traced into the graph ("sdpa" becomes OpenVINO's fused ScaledDotProductAttention).
ATTN_IMPLEMENTATION = "sdpa"

TASKS = ("embed", "classify")
POOLINGS = ("mean", "cls", "max", None)
PRECISIONS = ("bf16", "fp32")
PERFORMANCE_HINTS = ("LATENCY", "THROUGHPUT")

IR_XML = "model.xml"
IR_BIN = "model.bin"
META = "meta.json"
COMPILED = "compiled"  # OpenVINO's compiled-model cache (CACHE_DIR) inside an entry

# Weight files that AutoModel.from_pretrained reads from the top of a model directory.
_WEIGHT_SUFFIXES = (".safetensors", ".bin")
_WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")

#: How many conversions this process has done (tests use it to prove a cache hit converts nothing).
conversions = 0

_core = None
_core_lock = threading.Lock()


def get_core():
    """One ``openvino.Core`` per process (it is thread-safe and caches plugins)."""
    global _core
    with _core_lock:
        if _core is None:
            import openvino as ov

            _core = ov.Core()
        return _core


def available_cpus() -> int:
    """Cores this process may run on (affinity-aware), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively: OpenVINO says so, or the CPU flags do (hfbatch.models)."""
    from .models import cpu_has_bf16 as cpu_flags_have_bf16

    try:
        caps = get_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if any(str(c).upper() == "BF16" for c in caps):
            return True
    except Exception:  # pragma: no cover - depends on the OpenVINO build
        log.debug("could not read OPTIMIZATION_CAPABILITIES", exc_info=True)
    return cpu_flags_have_bf16()


def default_cache_dir() -> Path:
    """``$HFBATCH_CACHE_DIR/openvino`` if that variable is set, else ``~/.cache/hfbatch/openvino``."""
    root = os.environ.get("HFBATCH_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "openvino"
    return Path.home() / ".cache" / "hfbatch" / "openvino"


# --------------------------------------------------------------------------------------------- cache key


def _model_files(model_dir: Path) -> list[Path]:
    files = []
    for p in sorted(model_dir.iterdir()):
        if not p.is_file():
            continue
        n = p.name
        if n == "config.json" or n.endswith(_WEIGHT_INDEX_SUFFIXES) or n.endswith(_WEIGHT_SUFFIXES):
            files.append(p)
    if not any(p.name == "config.json" for p in files):
        raise FileNotFoundError(f"{model_dir}: no config.json (not a transformers model directory)")
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in files):
        raise FileNotFoundError(f"{model_dir}: no weight file (*.safetensors or *.bin)")
    return files


_file_digest_memo: dict[str, str] = {}
DIGESTS = "file-digests.json"  # sha256 of weight files by their stat, kept in the cache dir between runs
_MAX_DIGESTS = 256


def _stat_key(p: Path) -> str:
    """A file's identity for the digest memo: path, size, inode, mtime and ctime in ns. Any write changes
    ctime (which no user call can set back), so a changed file never matches its old digest."""
    st = p.stat()
    return f"{p.resolve()}|{st.st_size}|{st.st_ino}|{st.st_mtime_ns}|{st.st_ctime_ns}"


def _load_digests(cache_dir: Path | None) -> None:
    if cache_dir is None or _file_digest_memo:
        return
    try:
        stored = json.loads((cache_dir / DIGESTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(stored, dict):
        _file_digest_memo.update({k: v for k, v in stored.items() if isinstance(v, str) and len(v) == 64})


def _save_digests(cache_dir: Path | None) -> None:
    """Best effort (a lost update only means hashing that file again next time); atomic, never half-written."""
    if cache_dir is None:
        return
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        keep = dict(list(_file_digest_memo.items())[-_MAX_DIGESTS:])
        fd, tmp = tempfile.mkstemp(prefix=f".{DIGESTS}.tmp-", dir=cache_dir)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(keep, f)
            os.replace(tmp, cache_dir / DIGESTS)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError:
        log.debug("could not save %s", cache_dir / DIGESTS, exc_info=True)


def _file_digest(p: Path) -> tuple[bytes, bool]:
    """(sha256 of the file, whether it was hashed now rather than found in the memo)."""
    memo_key = _stat_key(p)
    d = _file_digest_memo.get(memo_key)
    if d is not None:
        return bytes.fromhex(d), False
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _file_digest_memo[memo_key] = h.hexdigest()
    return h.digest(), True


def _graph_options(task: str, pooling: str | None, normalize: bool) -> dict[str, Any]:
    import openvino as ov

    try:
        from importlib.metadata import version

        tf_version = version("transformers")
    except Exception:  # pragma: no cover
        tf_version = "?"
    options = {
        "graph_format": GRAPH_FORMAT,
        "task": task,
        "pooling": pooling,
        "normalize": bool(normalize),
        "attn_implementation": ATTN_IMPLEMENTATION,
        "openvino": ov.get_version(),
        "transformers": tf_version,
    }
    if narrows_last_layer(task, pooling):  # (an option of its own: the other entries keep their keys)
        options["narrow_last_layer"] = True
    return options


def narrows_last_layer(task: str, pooling: str | None) -> bool:
    """Whether the graph's output may read the first token alone (a classifier's head, CLS pooling), so
    conversion tries `first_token_last_layer`."""
    return task == "classify" or pooling == "cls"


def cache_key(model_dir: str | os.PathLike, *, task: str = "embed", pooling: str | None = None,
              normalize: bool = False, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 (hex) over config + weight files (relative path and bytes), graph options and versions.
    With `cache_dir` the files' digests are remembered there by stat, so a later process hashes no weights."""
    _check_options(task, pooling, normalize)
    model_dir = Path(model_dir)
    cache_dir = Path(cache_dir) if cache_dir is not None else None
    _load_digests(cache_dir)
    h = hashlib.sha256()
    hashed = False
    for p in _model_files(model_dir):
        # as models.model_content_hash(whole=True) counts a file, with its sha256 for its bytes
        h.update(f"{p.relative_to(model_dir).as_posix()}\0{p.stat().st_size}\0".encode())
        digest, new = _file_digest(p)
        h.update(digest)
        hashed |= new
    if hashed or (cache_dir is not None and not (cache_dir / DIGESTS).exists()):  # (the memo is per process)
        _save_digests(cache_dir)
    h.update(json.dumps(_graph_options(task, pooling, normalize), sort_keys=True).encode())
    return h.hexdigest()


def _check_options(task: str, pooling: str | None, normalize: bool) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, not {task!r}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, not {pooling!r}")
    if task == "classify" and (pooling is not None or normalize):
        raise ValueError("task='classify' returns logits: pooling must be None and normalize False")
    if normalize and pooling is None:
        raise ValueError("normalize=True needs a pooling (it normalises the pooled [B, H] vector)")


# ------------------------------------------------------------------------------------------- conversion


def _load_torch_model(model_dir: Path, task: str):
    from .models import load_torch_model

    # (hfbatch.models' loader: fp32 on the CPU, ATTN_IMPLEMENTATION ("sdpa") where the architecture has it)
    return load_torch_model(model_dir, "AutoModel" if task == "embed" else "AutoModelForSequenceClassification")


def _forward_input_names(model) -> list[str]:
    import inspect

    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 1) and \
            getattr(model.config, "model_type", "") not in ("roberta", "xlm-roberta", "camembert"):
        # RoBERTa-likes accept token_type_ids but only ever use type 0; leave the input out of their graph.
        names.append("token_type_ids")
    return names


def _main_output_module(model, input_names: list[str]):
    import torch

    class MainOutput(torch.nn.Module):
        """The HF model returning only its first output (last_hidden_state / logits): no pooler, no tuple."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kw = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kw["token_type_ids"] = token_type_ids
            return self.m(**kw, return_dict=True)[0]

    return MainOutput(model).eval()


def _mark_precise(nodes) -> None:
    """Ask the CPU plugin to keep these nodes in f32 under a bf16 inference precision hint."""
    for n in nodes:
        try:
            n.get_rt_info()["precise_0"] = ""
        except Exception:  # pragma: no cover - rt_info API differences between versions
            log.debug("could not mark %s precise", n, exc_info=True)


def _append_pooling(ov_model, pooling: str, normalize: bool):
    import openvino as ov
    import openvino.opset13 as ops

    params = {p.get_friendly_name(): p for p in ov_model.get_parameters()}
    mask_param = params["attention_mask"]
    hidden = ov_model.get_results()[0].input_value(0)  # the node feeding the Result, not the Result
    new = []

    def k(node):
        new.append(node)
        return node

    h = k(ops.convert(hidden, ov.Type.f32))  # a no-op in f32; a real cast out of bf16
    mask = k(ops.convert(mask_param, ov.Type.f32))  # [B, T]
    mask3 = k(ops.unsqueeze(mask, ops.constant(np.array([-1], dtype=np.int64))))  # [B, T, 1]
    axis1 = ops.constant(np.array([1], dtype=np.int64))
    if pooling == "mean":
        summed = k(ops.reduce_sum(k(ops.multiply(h, mask3)), axis1, keep_dims=False))  # [B, H]
        counts = k(ops.reduce_sum(mask3, axis1, keep_dims=False))  # [B, 1]
        counts = k(ops.maximum(counts, ops.constant(np.array(1e-9, dtype=np.float32))))
        pooled = k(ops.divide(summed, counts))
    elif pooling == "cls":
        pooled = k(ops.gather(h, ops.constant(np.array(0, dtype=np.int64)), ops.constant(np.array(1, dtype=np.int64))))
    elif pooling == "max":
        is_pad = k(ops.equal(mask3, ops.constant(np.array(0.0, dtype=np.float32))))
        masked = k(ops.select(is_pad, ops.constant(np.array(-1e9, dtype=np.float32)), h))
        pooled = k(ops.reduce_max(masked, axis1, keep_dims=False))
    else:  # pragma: no cover - checked before
        raise ValueError(pooling)
    if normalize:
        # torch.nn.functional.normalize: x / max(||x||, 1e-12)
        pooled = k(ops.normalize_l2(pooled, ops.constant(np.array([1], dtype=np.int64)), 1e-12, "max"))
    _mark_precise(new)
    pooled.output(0).get_tensor().set_names({"embedding"})
    return ov.Model([ops.result(pooled)], ov_model.get_parameters(), "hfbatch_embed")


def convert(model_dir: str | os.PathLike, *, task: str = "embed", pooling: str | None = None,
            normalize: bool = False):
    """Convert the model directory to an ``openvino.Model`` (no caching). Imports torch and transformers."""
    global conversions
    _check_options(task, pooling, normalize)
    import openvino as ov
    import torch

    model_dir = Path(model_dir)
    t0 = time.perf_counter()
    model = _load_torch_model(model_dir, task)
    names = _forward_input_names(model)
    wrapper = _main_output_module(model, names)
    example = {n: torch.ones(2, 8, dtype=torch.long) for n in names}
    example["input_ids"] = torch.full((2, 8), 5, dtype=torch.long)  # a plain token id, in any vocabulary
    if "token_type_ids" in example:
        example["token_type_ids"] = torch.zeros(2, 8, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        # The trace bakes in Python-level branches of the attention-mask code (padding_length, is_causal),
        # which are the same for every shape of an encoder's input: the tests check other shapes.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.simplefilter("ignore", category=DeprecationWarning)  # torch.jit.trace, used by the converter
        warnings.simplefilter("ignore", category=FutureWarning)
        ov_model = ov.convert_model(
            wrapper,
            example_input=example,
            input=[(n, ov.PartialShape([-1, -1]), ov.Type.i64) for n in names],
        )
    for p, n in zip(ov_model.get_parameters(), names):
        p.set_friendly_name(n)
        p.output(0).get_tensor().set_names({n})
    if pooling is not None:
        ov_model = _append_pooling(ov_model, pooling, normalize)
    else:
        ov_model.output(0).get_tensor().set_names({"logits" if task == "classify" else "last_hidden_state"})
    conversions += 1
    log.info("converted %s (task=%s, pooling=%s) to OpenVINO in %.1f s", model_dir, task, pooling,
             time.perf_counter() - t0)
    return ov_model


def _first_token(output, axis: int):
    import openvino.opset13 as ops

    def i64(v):
        return ops.constant(np.array([v], dtype=np.int64))
    return ops.slice(output, i64(0), i64(1), i64(1), i64(axis)).output(0)


def _downstream(node) -> set[str]:
    """The names of `node` and of every node computed from it."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.get_name() in seen:
            continue
        seen.add(n.get_name())
        stack.extend(t.get_node() for out in n.outputs() for t in out.get_target_inputs())
    return seen


def first_token_last_layer(ov_model):
    """A clone of a classifier's graph whose last layer computes the first token only, or None where its
    shape is not the one this knows.

    BERT's pooler and the RoBERTa / DistilBERT / ELECTRA heads read the first token's final hidden state, and
    everything after the last attention is per token (output projection, residual, LayerNorm, feed-forward).
    So the last attention takes the first query only (keys and values stay whole) and the residual the first
    token only: the last layer's projections and feed-forward run on one token instead of T (in a 6-layer
    model a sixth of the encoder's work, less a twelfth of that for the keys and values). The caller checks
    that the clone gives the same logits (`same_function`): a head that reads other tokens does not."""
    model = ov_model.clone()
    ordered = model.get_ordered_ops()
    attentions = [n for n in ordered if n.get_type_name() == "ScaledDotProductAttention"]
    if not attentions:
        return None
    attention = attentions[-1]
    below = _downstream(attention)
    # what the nodes after the attention take from before it, constants aside: the residual, alone
    mixed = [i for n in ordered if n.get_name() in below and n.get_name() != attention.get_name()
             for i in n.inputs() if i.get_source_output().get_node().get_name() not in below
             and i.get_source_output().get_node().get_type_name() != "Constant"]
    if len(mixed) != 1 or mixed[0].get_source_output().get_partial_shape().rank.get_length() != 3:
        return None
    residual = mixed[0]
    query = attention.input(0)
    if query.get_partial_shape().rank.get_length() != 4:
        return None
    query.replace_source_output(_first_token(query.get_source_output(), 2))  # [B, heads, 1, d]
    if attention.get_input_size() > 3:  # the mask, [B, 1, T, T] or broadcastable: its first query row
        mask = attention.input(3)
        shape = mask.get_partial_shape()
        rank = shape.rank.get_length()
        if rank >= 2 and not (shape[rank - 2].is_static and shape[rank - 2].get_length() == 1):
            mask.replace_source_output(_first_token(mask.get_source_output(), rank - 2))
    residual.replace_source_output(_first_token(residual.get_source_output(), 1))  # [B, 1, H]
    model.validate_nodes_and_infer_types()
    return model


def same_function(a, b, inputs: list[str], rtol: float = 1e-4) -> bool:
    """Whether two graphs give the same output (f32, to `rtol` of its scale) on a padded batch of plain token
    ids, 3 rows of different lengths."""
    ids = np.array([[2] + list(range(5, 5 + n)) + [3] + [0] * (9 - n) for n in (9, 4, 1)], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": (ids > 0).astype(np.int64), "token_type_ids": np.zeros_like(ids)}
    feed = {n: feed[n] for n in inputs}
    outs = [infer_f32(m, feed) for m in (a, b)]
    return outs[0].shape == outs[1].shape and bool(
        np.allclose(outs[0], outs[1], rtol=rtol, atol=rtol * float(np.abs(outs[0]).max() + 1e-6)))


def infer_f32(model, feed: dict) -> np.ndarray:
    """The first output of `model` (an ov.Model or an IR path) compiled in f32 and run once on `feed`."""
    request = get_core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"}).create_infer_request()
    return request.infer(feed)[0]


# ------------------------------------------------------------------------------------------------ cache


def _entry_complete(entry: Path) -> bool:
    return (entry / META).is_file() and (entry / IR_XML).is_file() and (entry / IR_BIN).is_file()


def _sweep_stale_tmp(cache_dir: Path, max_age_s: float = 24 * 3600) -> None:
    """Remove temporary folders and files left by writers that were killed (older than a day)."""
    now = time.time()
    try:
        for p in cache_dir.iterdir():
            if p.name.startswith(".") and ".tmp-" in p.name:
                try:
                    if now - p.stat().st_mtime > max_age_s:
                        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
                except OSError:
                    pass
    except OSError:
        pass


def _write_entry(cache_dir: Path, key: str, ov_model, meta: dict[str, Any]) -> Path:
    """Write an entry in a temporary folder beside its final place, then rename it there whole."""
    import openvino as ov

    entry = cache_dir / key
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.tmp-", dir=cache_dir))
    try:
        ov.save_model(ov_model, str(tmp / IR_XML), compress_to_fp16=False)
        for name in (IR_XML, IR_BIN):
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        with open(tmp / META, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, entry)  # atomic; fails if another writer got there first
        except OSError:
            if not _entry_complete(entry):
                raise
            log.debug("cache entry %s was written by another process meanwhile", entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry


class _ConversionLock:
    """An inter-process lock so that concurrent loaders of one model convert it once.

    Best effort: if the lock cannot be had in ``timeout`` seconds the caller converts anyway, which is still
    safe because entries are published by an atomic rename.
    """

    def __init__(self, cache_dir: Path, key: str, timeout: float = 600):
        self._lock = None
        try:
            from filelock import FileLock

            self._lock = FileLock(str(cache_dir / f".{key[:16]}.lock"), timeout=timeout)
        except ImportError:  # pragma: no cover - filelock is a dependency
            pass

    def __enter__(self):
        if self._lock is not None:
            from filelock import Timeout

            try:
                self._lock.acquire()
            except Timeout:
                log.warning("waited too long for %s; converting without it", self._lock.lock_file)
                self._lock = None
        return self

    def __exit__(self, *exc):
        if self._lock is not None:
            self._lock.release()
        return False


def get_ir(model_dir: str | os.PathLike, *, task: str = "embed", pooling: str | None = None,
           normalize: bool = False, cache_dir: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """Path of the cached ``model.xml`` for these options, converting (and caching) on a miss.

    Returns ``(xml_path, cache_hit)``; ``cache_hit`` is False when this call converted the model.
    """
    model_dir = Path(model_dir).resolve()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    key = cache_key(model_dir, task=task, pooling=pooling, normalize=normalize, cache_dir=cache_dir)
    entry = cache_dir / key
    if _entry_complete(entry):
        return entry / IR_XML, True
    cache_dir.mkdir(parents=True, exist_ok=True)
    _sweep_stale_tmp(cache_dir)
    with _ConversionLock(cache_dir, key):
        if _entry_complete(entry):  # another process converted it while we waited
            return entry / IR_XML, True
        if entry.exists():  # not ours to half-repair: move the broken entry aside, then rebuild
            broken = Path(tempfile.mkdtemp(prefix=f".{key[:16]}.tmp-broken-", dir=cache_dir))
            os.rename(entry, broken / "entry")
            shutil.rmtree(broken, ignore_errors=True)
        ov_model = convert(model_dir, task=task, pooling=pooling, normalize=normalize)
        ov_model, last_layer = _narrowed_where_same(ov_model, task, pooling, model_dir)
        meta = {
            "last_layer": last_layer,
            "key": key,
            "model_dir": str(model_dir),
            "inputs": [p.get_friendly_name() for p in ov_model.get_parameters()],
            "output_rank": ov_model.output(0).get_partial_shape().rank.get_length(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **_graph_options(task, pooling, normalize),
        }
        entry = _write_entry(cache_dir, key, ov_model, meta)
    return entry / IR_XML, False


def _narrowed_where_same(ov_model, task: str, pooling: str | None, model_dir: Path):
    """`(graph, "first token")` where `first_token_last_layer` applies and gives the same output, else
    `(ov_model, "all tokens")`. Checked on tiny random BERT, RoBERTa, XLM-R, ELECTRA and DistilBERT
    classifiers (narrowed) and DeBERTa-v2 and ModernBERT ones (not). It is only a speed-up: any OpenVINO
    error while narrowing or checking keeps the whole graph."""
    if not narrows_last_layer(task, pooling):
        return ov_model, "all tokens"
    try:
        narrowed = first_token_last_layer(ov_model)
        inputs = [p.get_friendly_name() for p in ov_model.get_parameters()]
        if narrowed is not None and same_function(ov_model, narrowed, inputs):
            log.info("%s: the last layer computes the first token only", model_dir)
            return narrowed, "first token"
    except Exception as exc:  # (OpenVINO raises RuntimeError and its own types from shape inference)
        log.info("%s: the last layer stays whole (%s: %s)", model_dir, type(exc).__name__, exc)
    return ov_model, "all tokens"


def read_meta(ir_path: Path) -> dict:
    """The meta.json of the cache entry holding this IR (its options, inputs, `last_layer`)."""
    return json.loads((Path(ir_path).parent / META).read_text(encoding="utf-8"))


def compiled_cache_dir(ir_path: Path) -> Path | None:
    """Where OpenVINO keeps this IR's compiled blobs (its CACHE_DIR): `compiled/` inside the IR's own cache
    entry, a folder hfbatch made, so the blobs go when the entry goes. Importing a blob skips the CPU plugin's
    graph transformations on every later run. None (no blob cache) where the entry is not writable, e.g. a
    cache shared read-only; ``ov_config={"CACHE_DIR": ""}`` turns it off too."""
    entry = Path(ir_path).parent
    if not os.access(entry, os.W_OK):
        return None
    return entry / COMPILED


HEAD_INPUT = "encoder_hidden"
HEAD_ROWS = 16  # the f32 head runs on batches padded to a multiple of this many rows (OpenVINOEncoder._finish)


def _head_region(model):
    """The nodes between the model's output and the encoder: walking back from the Result up to (not
    through) LayerNorm's MVN. Returns (nodes, MVNs reached, Parameters reached)."""
    nodes, mvns, params, seen = [], [], [], set()
    stack = [model.get_results()[0].input_value(0).get_node()]
    while stack:
        node = stack.pop()
        if node.get_name() in seen:  # (not id(): the Python wrappers are made anew and their ids reused)
            continue
        seen.add(node.get_name())
        kind = node.get_type_name()
        if kind == "Constant":
            continue
        if kind == "Parameter":
            params.append(node)
            continue
        if kind == "MVN":
            mvns.append(node)
            continue
        nodes.append(node)
        stack.extend(i.get_source_output().get_node() for i in node.inputs())
    return nodes, mvns, params


def split_head(ir_path: Path):
    """A classifier's IR cut in two at its last LayerNorm: `(encoder, head, head_inputs)`, the encoder up to
    the normalised hidden states and the head (LayerNorm's scale and shift, pooler, classifier) taking them as
    `encoder_hidden` (plus the model inputs in `head_inputs` it reads). The CPU plugin ignores
    precision marks on single nodes under a bf16 hint, so a head kept in f32 is a model of its own. None
    where the graph has not exactly one LayerNorm between its output and the rest, or the head would need
    most of the graph."""
    import openvino as ov
    import openvino.opset13 as ops

    core = get_core()
    head = core.read_model(str(ir_path))
    nodes, mvns, params = _head_region(head)
    if len(mvns) != 1 or len(nodes) > 64:
        return None
    cut = mvns[0].get_friendly_name()
    body = core.read_model(str(ir_path))
    body_cut = next(n for n in body.get_ops() if n.get_friendly_name() == cut)
    encoder = ov.Model([ops.result(body_cut.output(0))], body.get_parameters(), "hfbatch_encoder")
    hidden = ops.parameter(mvns[0].get_output_partial_shape(0), mvns[0].get_output_element_type(0), name=HEAD_INPUT)
    hidden.output(0).get_tensor().set_names({HEAD_INPUT})
    for target in list(mvns[0].output(0).get_target_inputs()):
        target.replace_source_output(hidden.output(0))
    head_inputs = [p.get_friendly_name() for p in params]
    return encoder, ov.Model(head.get_results(), [hidden, *params], "hfbatch_head"), head_inputs


# ---------------------------------------------------------------------------------------------- encoder


class OpenVINOEncoder:
    """A compiled OpenVINO model for one model directory and one set of graph options.

    ``run`` is thread-safe (one infer request, under a lock). ``run_many`` keeps one batch in flight on each
    of the compiled model's streams and yields the outputs in order: under the default THROUGHPUT hint the CPU
    plugin makes one stream per core (2 on 2 cores, 1 thread each), which on the 2-core AMX machine ran
    the same batches 1.09-1.12x faster than one 2-thread stream, with the same output bits (the threads
    split a batch's work, not its sums).
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        *,
        task: str = "embed",
        pooling: str | None = "mean",
        normalize: bool = False,
        precision: str = "bf16",
        num_threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        performance_hint: str = "THROUGHPUT",
        num_streams: int | None = None,
        ov_config: dict[str, Any] | None = None,
    ):
        if task == "classify" and pooling == "mean":
            pooling = None  # the default pooling does not apply to a classifier
        _check_options(task, pooling, normalize)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
        if performance_hint not in PERFORMANCE_HINTS:
            raise ValueError(f"performance_hint must be one of {PERFORMANCE_HINTS}, not {performance_hint!r}")
        self.model_dir = Path(model_dir)
        self.task, self.pooling, self.normalize = task, pooling, bool(normalize)
        self.requested_precision = precision
        if precision == "bf16" and not cpu_has_bf16():
            log.warning("this CPU has no native bf16: OpenVINO runs %s in f32", self.model_dir)
            precision = "fp32"
        self.precision = precision  # the one in force
        self.num_threads = int(num_threads) if num_threads else available_cpus()

        t0 = time.perf_counter()
        self.ir_path, self.cache_hit = get_ir(self.model_dir, task=task, pooling=pooling, normalize=normalize,
                                              cache_dir=cache_dir)
        self.convert_s = time.perf_counter() - t0

        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": performance_hint,
            "INFERENCE_NUM_THREADS": self.num_threads,
            # Pinned threads stall behind any other busy process on a shared machine; unpinned measured as fast
            # or faster on the 2-core dev box. ov_config={"ENABLE_CPU_PINNING": True} to pin.
            "ENABLE_CPU_PINNING": False,
        }
        if num_streams is not None:
            config["NUM_STREAMS"] = int(num_streams)
        compiled_dir = compiled_cache_dir(self.ir_path)
        if compiled_dir is not None:
            config["CACHE_DIR"] = str(compiled_dir)
        config.update(ov_config or {})
        self.config = config
        t0 = time.perf_counter()
        split = split_head(self.ir_path) if task == "classify" and precision == "bf16" else None
        self.head_inputs: list[str] = []
        self._head = None
        # One model with dynamic batch and sequence dims for every batch shape. A model reshaped to one static
        # shape ran the same MiniLM batch 10-12% faster on the AMX Xeon (its residual Adds and LayerNorm scales
        # become fused subgraphs), but each shape is then a compiled model of its own: ~145 MiB resident,
        # 1.1 s to compile cold and a 90 MB cache blob, for the ~16 shapes a padded job uses.
        if split is None:
            self.compiled = get_core().compile_model(str(self.ir_path), "CPU", config)
        else:  # the encoder in bf16, the classification head (and the last LayerNorm's scale) in f32
            body, head, self.head_inputs = split
            self.compiled = get_core().compile_model(body, "CPU", config)
            # The head is a few small matmuls on [B, 1, H], run in the caller's thread while both streams
            # keep the cores busy: one thread of its own, no streams of its own.
            self._head = get_core().compile_model(head, "CPU", {
                **config, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": 1, "NUM_STREAMS": 1})
            self._head_request = self._head.create_infer_request()
        self.compile_s = time.perf_counter() - t0
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.streams = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        self._requests = [self.compiled.create_infer_request() for _ in range(self.streams)]
        self._request = self._requests[0]
        self._lock = threading.Lock()

    # -- properties
    @property
    def dim(self) -> int | None:
        """Last dimension of the output (hidden size or number of labels), when static."""
        d = (self._head or self.compiled).output(0).get_partial_shape()[-1]
        return d.get_length() if d.is_static else None

    def describe(self) -> dict[str, Any]:
        """What a manifest should record about this backend."""
        import openvino as ov

        return {
            "backend": "openvino",
            "openvino": ov.get_version(),
            "task": self.task,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "precision": self.precision,
            "requested_precision": self.requested_precision,
            "num_threads": self.num_threads,
            "performance_hint": self.config["PERFORMANCE_HINT"],
            "streams": self.streams,
            "ir": str(self.ir_path),
        }

    # -- inference
    def _inputs(self, input_ids, attention_mask, token_type_ids=None) -> dict[str, np.ndarray]:
        ids = np.ascontiguousarray(input_ids, dtype=np.int64)
        mask = np.ascontiguousarray(attention_mask, dtype=np.int64)
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must be equal [B, T]")
        feed = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.input_names:
            if token_type_ids is None:
                feed["token_type_ids"] = np.zeros_like(ids)
            else:
                feed["token_type_ids"] = np.ascontiguousarray(token_type_ids, dtype=np.int64)
        return feed

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray,
            token_type_ids: np.ndarray | None = None) -> np.ndarray:
        """One batch: int64 ``[B, T]`` arrays in, float32 out (``[B, H]`` pooled, ``[B, T, H]``, or logits)."""
        feed = self._inputs(input_ids, attention_mask, token_type_ids)
        if feed["input_ids"].shape[0] == 0:
            rank = (self._head or self.compiled).output(0).get_partial_shape().rank.get_length()
            shape = (0, self.dim or 0) if rank == 2 else (0, feed["input_ids"].shape[1], self.dim or 0)
            return np.zeros(shape, dtype=np.float32)
        with self._lock:
            out = self._request.infer(feed, share_inputs=True, share_outputs=True)
            return self._finish(out[0], feed)

    def run_many(self, batches: Iterable[tuple]) -> Iterator[np.ndarray]:
        """`run` over ``(input_ids, attention_mask[, token_type_ids])`` batches, one in flight per stream;
        the outputs come in input order. The next batch is taken (and padded by the caller's generator) while
        the others run."""
        with self._lock:
            free, pending = collections.deque(self._requests), collections.deque()
            try:
                for batch in batches:
                    feed = self._inputs(*batch)
                    if feed["input_ids"].shape[0] == 0:
                        raise ValueError("run_many takes non-empty batches")
                    if not free:
                        yield self._collect(pending, free)
                    request = free.popleft()
                    request.start_async(feed, share_inputs=True)  # `pending` keeps the arrays alive
                    pending.append((request, feed))
                while pending:
                    yield self._collect(pending, free)
            finally:
                for request, _ in pending:  # abandoned midway: no request may still write into memory
                    request.wait()

    def _collect(self, pending: collections.deque, free: collections.deque) -> np.ndarray:
        request, feed = pending.popleft()
        request.wait()
        result = self._finish(request.get_output_tensor(0).data, feed)
        free.append(request)
        return result

    def _finish(self, body_out: np.ndarray, feed: dict) -> np.ndarray:
        """The model's output, in memory of its own: through the f32 head where the model was split."""
        if self._head is not None:
            rows = body_out.shape[0]
            hidden = body_out
            if not self.head_inputs:
                # rows padded to a multiple of HEAD_ROWS: every new batch size costs the plugin 1-2 ms of
                # set-up against 0.3 ms for a size it has seen, and budget batches come in dozens of sizes.
                # The head works row by row (scale, shift, dense layers), so the padding changes no row.
                padded = -(-rows // HEAD_ROWS) * HEAD_ROWS
                hidden = np.zeros((padded,) + body_out.shape[1:], dtype=body_out.dtype)
                hidden[:rows] = body_out
            head_feed = {HEAD_INPUT: hidden, **{n: feed[n] for n in self.head_inputs}}
            body_out = self._head_request.infer(head_feed, share_inputs=True, share_outputs=True)[0][:rows]
        return np.array(body_out, dtype=np.float32, copy=True)  # the one copy, before the request runs again
