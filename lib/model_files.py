"""A model directory's tokenizer and config read straight from its files, without transformers.

Importing transformers imports torch (about 1 s on an idle 2-core machine, several on a busy one), and the
OpenVINO path needs neither once the converted model is cached: its tokenizer is the `tokenizers` library's
own `Tokenizer` (what a transformers fast tokenizer wraps) and its config is config.json. So a whole
`hfbatch embed` / `classify` process on CPU starts without torch:

    tokenizer = TokenizerFile.load(model_dir)       # None: the directory needs transformers' loader
    config = ConfigFile.load(model_dir)             # None: likewise

`TokenizerFile(texts, pairs, truncation=..., max_length=...)` gives the ids that transformers' fast tokenizer
gives for the same call (the same backend, configured the way transformers configures it per call: longest-
first truncation on the tokenizer's truncation side, no padding, special tokens added); anything else it is
asked for (offsets, stride windows, special-token counts) goes to transformers' tokenizer, loaded then.
"""

from __future__ import annotations

import json
import os
from functools import cached_property
from pathlib import Path

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"

# a call splits over threads only where each gets this many rows (thread start-up is ~0.1 ms; a row ~0.15 ms)
ROWS_PER_TOKENIZER_THREAD = 256

# the keyword arguments of a transformers tokenizer call that TokenizerFile answers itself (with these values)
_OWN_CALL = {"truncation": (True, False), "max_length": None, "padding": (False,), "return_attention_mask": (False,),
             "return_overflowing_tokens": (False,), "return_length": (False,), "return_token_type_ids": None,
             "verbose": None}


def _json_object(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class TokenizerFile:
    """A model's tokenizer.json through the `tokenizers` library, called like a transformers fast tokenizer."""

    is_fast = True

    def __init__(self, path: Path, backend, settings: dict):
        self.path = path
        self.backend_tokenizer = backend
        self.truncation_side = settings.get("truncation_side", "right")
        limit = settings.get("model_max_length")
        self.model_max_length = int(limit) if isinstance(limit, (int, float)) and limit > 0 else int(1e30)
        pad = settings.get("pad_token") or (backend.padding or {}).get("pad_token")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        self.pad_token_id = backend.token_to_id(pad) if isinstance(pad, str) else None

    @classmethod
    def load(cls, path: Path, trust_remote_code: bool = False) -> TokenizerFile | None:
        """The directory's tokenizer.json, or None where transformers' loader is needed (no tokenizer.json,
        remote code, an unreadable tokenizer_config.json, or a tokenizer class that rewrites the ids)."""
        path = Path(path)
        if trust_remote_code or not (path / TOKENIZER_JSON).is_file():
            return None
        settings = _json_object(path / TOKENIZER_CONFIG) if (path / TOKENIZER_CONFIG).exists() else {}
        if settings is None or settings.get("auto_map") or not _plain_fast_class(settings.get("tokenizer_class")):
            return None
        from tokenizers import Tokenizer

        try:
            backend = Tokenizer.from_file(str(path / TOKENIZER_JSON))
        except Exception:  # noqa: BLE001 - a file tokenizers cannot read: transformers' loader says why
            return None
        tokenizer = cls(path, backend, settings)
        backend.no_padding()
        return tokenizer

    def __call__(self, texts, pairs=None, **kwargs):
        if any(k not in _OWN_CALL or (_OWN_CALL[k] is not None and v not in _OWN_CALL[k])
               for k, v in kwargs.items()):
            return self.transformers_tokenizer(texts, pairs, **kwargs)
        backend = self.backend_tokenizer
        if kwargs.get("truncation"):
            backend.enable_truncation(int(kwargs["max_length"]), strategy="longest_first",
                                      direction=self.truncation_side)
        else:
            backend.no_truncation()
        inputs = list(texts) if pairs is None else list(zip(texts, pairs))
        encodings = self._encode_batch(inputs)
        out = {"input_ids": [e.ids for e in encodings]}
        if pairs is not None and kwargs.get("return_token_type_ids", True):  # single texts: all 0, the default
            out["token_type_ids"] = [e.type_ids for e in encodings]
        if kwargs.get("truncation"):  # what truncation cut goes to `overflowing`: which rows were cut, for free
            out["truncated"] = [bool(e.overflowing) for e in encodings]
        return out

    def _encode_batch(self, inputs: list) -> list:
        """The backend's encodings of `inputs`, in order. Without offsets (`encode_batch_fast`, the same ids)
        and, for large calls, split over one thread per core: the backend releases the GIL, and its own
        thread pool is off (TOKENIZERS_PARALLELISM=false, for forked workers). On the 2-core machine a shard
        of 4,000 docs tokenized in 0.35 s on two threads against 0.60 s on one, the same ids."""
        from concurrent.futures import ThreadPoolExecutor

        from .openvino_backend import available_cpus

        backend = self.backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # tokenizers >= 0.21
        threads = min(available_cpus(), len(inputs) // ROWS_PER_TOKENIZER_THREAD)
        if threads < 2:
            return encode(inputs, add_special_tokens=True)
        step = -(-len(inputs) // threads)
        with ThreadPoolExecutor(threads) as pool:
            parts = pool.map(lambda start: encode(inputs[start:start + step], add_special_tokens=True),
                             range(0, len(inputs), step))
            return [e for part in parts for e in part]

    @cached_property
    def transformers_tokenizer(self):
        from .models import load_tokenizer

        return load_tokenizer(self.path)

    def __getattr__(self, name):
        # what TokenizerFile does not answer itself (num_special_tokens_to_add, ...): transformers' tokenizer
        if name.startswith("__") or name == "transformers_tokenizer":
            raise AttributeError(name)
        return getattr(self.transformers_tokenizer, name)


def _plain_fast_class(name) -> bool:
    """Tokenizer classes whose ids are the tokenizer.json backend's as they are. Others (LayoutLM's boxes,
    Whisper's or Bloom's extras, ...) go to transformers. No class named: the generic fast tokenizer."""
    if name is None:
        return True
    return isinstance(name, str) and name.removesuffix("Fast").removesuffix("Tokenizer") in _PLAIN_TOKENIZERS


_PLAIN_TOKENIZERS = {"PreTrained", "TokenizersBackend", "Bert", "DistilBert", "Roberta", "XLMRoberta", "Camembert",
                     "MPNet", "Electra", "Deberta", "DebertaV2", "Albert", "MobileBert", "Funnel", "SqueezeBert"}


class ConfigFile:
    """config.json's values as attributes (hidden_size, max_position_embeddings, num_labels, id2label)."""

    def __init__(self, values: dict):
        self.__dict__.update(values)
        id2label = values.get("id2label")
        if isinstance(id2label, dict) and id2label:
            self.id2label = {int(k): str(v) for k, v in id2label.items()}
        else:
            count = values.get("num_labels", 2)
            self.id2label = {i: f"LABEL_{i}" for i in range(count)}
        self.num_labels = len(self.id2label)

    @classmethod
    def load(cls, path: Path, trust_remote_code: bool = False) -> ConfigFile | None:
        """The directory's config.json when it names the sizes plainly, else None (transformers' AutoConfig
        maps other names: DistilBERT's `dim`, ...)."""
        if trust_remote_code:
            return None
        values = _json_object(Path(path) / "config.json")
        if values is None or values.get("auto_map") or not isinstance(values.get("model_type"), str):
            return None  # (AutoConfig refuses a config without model_type, with its own message)
        if not all(isinstance(values.get(k), int) for k in ("hidden_size", "max_position_embeddings")):
            return None
        id2label = values.get("id2label")
        if id2label is not None and not (isinstance(id2label, dict) and all(str(k).isdigit() for k in id2label)):
            return None
        return cls(values)


def may_have_gpu() -> bool:
    """False when this machine certainly has no GPU torch could use (no NVIDIA or ROCm device node), so
    `--device auto` can choose the CPU without importing torch. CUDA_VISIBLE_DEVICES="" hides them too."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg"))
