"""The inspect job (`hfbatch inspect`): what a model directory holds, read from its files without loading the
weights."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

from .models import (
    default_max_length,
    read_json_object,
    read_pooling,
    resolve_model_dir,
    safetensors_files,
    safetensors_tensors,
)

HEADS = {  # architecture name suffix -> what the head does
    "ForSequenceClassification": "sequence classification",
    "ForTokenClassification": "token classification",
    "ForQuestionAnswering": "extractive question answering",
    "ForMaskedLM": "masked language modelling",
    "ForCausalLM": "causal language modelling",
    "ForPreTraining": "pre-training (masked LM + next sentence)",
    "ForMultipleChoice": "multiple choice",
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # integer tensors are buffers, not weights


def inspect(model_dir) -> dict:
    """`hfbatch inspect`: what `model_dir` holds (architecture, task head and labels, parameter count,
    tokenizer, max length, pooling, and the hfbatch jobs that can use it), as `--json` prints it. Names what
    is missing when the directory is incomplete. Nothing is loaded: the parameters are counted from the
    safetensors headers."""
    return describe(resolve_model_dir(model_dir, "MODEL_DIR"))  # names a missing config.json, weights, ...


def describe(path: Path) -> dict:
    config = read_json_object(path / "config.json")
    tokenizer_file = path / "tokenizer_config.json"
    tokenizer_config = read_json_object(tokenizer_file) if tokenizer_file.exists() else {}
    architectures = config.get("architectures") or []
    head = next((task for suffix, task in HEADS.items() for a in architectures if a.endswith(suffix)), None)
    info = {
        "path": str(path),
        "architecture": architectures[0] if architectures else None,
        "model_type": config.get("model_type"),
        "task_head": head or "none (a bare encoder: its outputs are hidden states)",
        "custom_code": bool(config.get("auto_map")),
        "parameters": parameter_count(path),
        "tokenizer": {
            "class": tokenizer_config.get("tokenizer_class"),
            "fast": (path / "tokenizer.json").exists(),
            "vocab_size": config.get("vocab_size"),
            "lower_case": tokenizer_config.get("do_lower_case"),
            "model_max_length": tokenizer_config.get("model_max_length"),
        },
        # The limit embed/classify cut at, by the same rule they use (from the files, not loaded objects).
        "max_length": default_max_length(
            path, SimpleNamespace(model_max_length=tokenizer_config.get("model_max_length")),
            SimpleNamespace(max_position_embeddings=config.get("max_position_embeddings"))),
        "max_position_embeddings": config.get("max_position_embeddings"),
    }
    if head == "sequence classification":
        id2label = config.get("id2label") or {}
        labels = [id2label[k] for k in sorted(id2label, key=int)]
        multi = config.get("problem_type") == "multi_label_classification"
        info["labels"] = labels
        info["problem_type"] = config.get("problem_type") or "single_label_classification"
        info["scores"] = "sigmoid" if multi or len(labels) == 1 else "softmax"
        info["default_label_names"] = all(label == f"LABEL_{i}" for i, label in enumerate(labels))
        info["use_with"] = ["classify"]
    elif head is None:
        pooling = read_pooling(path)
        info["pooling"] = {"mode": pooling.mode, "normalize": pooling.normalize, "source": pooling.source}
        info["use_with"] = ["embed", "search", "train --base-model"]
    else:
        info["use_with"] = ["train --base-model"]
    for name in ("manifest.json", "metrics.json"):  # written by `hfbatch train`
        if (path / name).exists():
            data = read_json_object(path / name)
            if name == "manifest.json":
                info["made_by"] = {"job": data.get("job"), "created_at": data.get("created_at")}
            else:
                info["eval"] = data.get("eval")
    if (path / "README.md").exists():
        info["model_card"] = "README.md"
    return info


def parameter_count(path: Path) -> dict:
    """Weights counted from the safetensors headers (the first 8 bytes give the JSON header's length):
    no tensor is read. A pickled pytorch_model.bin cannot be counted without loading it."""
    files = safetensors_files(path)
    if not files:
        return {"count": None, "files": [p.name for p in sorted(path.glob("pytorch_model*.bin"))],
                "note": "pickled weights: not counted without loading them (save as safetensors to see it)"}
    count, dtypes, size = 0, set(), 0
    for file in files:
        size += file.stat().st_size
        for dtype, shape in safetensors_tensors(file).values():
            if dtype in FLOAT_DTYPES:
                count += math.prod(shape)
                dtypes.add(dtype)
    names = [f.relative_to(path).as_posix() for f in files]
    return {"count": count, "dtypes": sorted(dtypes), "files": names, "bytes": size}


def text_lines(info: dict):
    params = info["parameters"]
    yield "architecture", f"{info['architecture']} ({info['model_type']})" + \
        ("; custom code: needs --trust-remote-code" if info["custom_code"] else "")
    head = info["task_head"]
    if "labels" in info:
        head += f", {len(info['labels'])} labels, {info['problem_type']} ({info['scores']} scores)"
    yield "task head", head
    if "labels" in info:
        yield "labels", ", ".join(f"{i} {label}" for i, label in enumerate(info["labels"])) + \
            (" (default names: the config has no id2label)" if info["default_label_names"] else "")
    if params["count"] is None:
        yield "parameters", f"unknown ({', '.join(params['files'])}: {params['note']})"
    else:
        count = f"{params['count'] / 1e6:.1f}M" if params["count"] >= 1e6 else f"{params['count']:,}"
        yield "parameters", f"{count} ({'/'.join(params['dtypes'])}, {', '.join(params['files'])}, " \
                            f"{params['bytes'] / 1e6:.1f} MB)"
    tok = info["tokenizer"]
    yield "tokenizer", f"{tok['class'] or 'unknown class'}, {'fast (tokenizer.json)' if tok['fast'] else 'slow only'}" \
                       f", vocab {tok['vocab_size']}" + (", lower-cased" if tok["lower_case"] else "")
    yield "max length", f"{info['max_length']} tokens (position embeddings: {info['max_position_embeddings']})"
    if "pooling" in info:
        pooling = info["pooling"]
        yield "pooling", f"{pooling['mode']}{', normalised' if pooling['normalize'] else ''} ({pooling['source']})"
    if "made_by" in info:
        yield "made by", f"hfbatch {info['made_by']['job']}, {info['made_by']['created_at']}"
    if info.get("eval"):
        yield "eval", ", ".join(f"{k} {v}" for k, v in info["eval"].items())
    if "model_card" in info:
        yield "model card", info["model_card"]
    yield "use with", ", ".join(f"hfbatch {job}" for job in info["use_with"])
