"""The classify job (`hfbatch classify`): a dataset's text -> `id`, `label`, `score` (and the top K).

`ClassifyShards` (run by hfbatch.executor.run_shards) runs the model's sequence-classification head over each
shard; `probabilities` turns its logits into what transformers' pipeline reports; `labels_table` writes them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .batch_tuning import parse_batch_tokens
from .batching import warn_truncated
from .embedding import ModelRun
from .errors import InputError
from .runner import Job


def classify(dataset, output, *, model, text_column="text", text_pair_column=None, top_k=None, multi_label=False,
             device="auto", devices=None, precision="auto", backend="auto", max_length=None,
             batch_tokens="auto", shard_rows=10_000, trust_remote_code=False, force=False,
             executor="local", ray_address=None, num_workers=None,
             gpus_per_worker=None, max_retries=None) -> dict:
    """The classify job: DATASET's text column -> OUTPUT's labels and scores. Takes the command's options
    (`devices` a list such as ["cuda:0", "cuda:1"]; `executor` "local" or "ray", with
    the Ray executor's options) and returns the summary that --json prints."""
    from .models import model_fingerprint, resolve_model_dir
    from .ray_executor import executor_for

    executor = executor_for(executor, device, devices, ray_address, num_workers, gpus_per_worker,
                            max_retries)  # None: this machine
    batch_tokens = parse_batch_tokens(batch_tokens)
    model_dir = resolve_model_dir(model)
    head = read_head(model_dir)
    multi_label = multi_label or head["problem_type"] == "multi_label_classification"
    config = {"model": str(model_dir), "model_fingerprint": model_fingerprint(model_dir),
              "text_column": text_column, "text_pair_column": text_pair_column, "top_k": top_k,
              "multi_label": multi_label, "device": device, "precision": precision, "backend": backend,
              "max_length": max_length, "shard_rows": shard_rows}

    if devices:
        from .devices import check_devices, devices_kind

        check_devices(devices, device)
        config["devices"] = devices_kind(devices)  # only when given: single-device outputs keep their config

    with Job("classify", output, config=config, datasets=[dataset], force=force, reads=[model_dir]) as job:
        if job.up_to_date:  # decided from manifests alone: a no-op re-run never imports torch
            return job.summary()
        from .executor import run_job_shards
        from .io import open_arrow_dataset, require_text_column

        source, _ = open_arrow_dataset(dataset)
        require_text_column(source, text_column, dataset)
        if text_pair_column:
            require_text_column(source, text_pair_column, dataset, option="--text-pair-column")
        plan = ClassifyPlan(dataset=str(dataset), text_column=text_column, text_pair_column=text_pair_column,
                            model_dir=str(model_dir), device=device, precision=precision, backend=backend,
                            max_length=max_length, batch_tokens=batch_tokens, trust_remote_code=trust_remote_code,
                            shard_rows=shard_rows, multi_label=multi_label, top_k=top_k)
        n_shards, done = run_job_shards(job, len(source), shard_rows, functools.partial(ClassifyShards, plan), devices,
                                        executor=executor, device=device, inputs=[dataset])
        info = done.info
        k = min(top_k, len(info["labels"])) if top_k else None
        job.publish_dataset(n_shards, labels_features(source.features["id"], k), extra={
            "source_dataset": str(job.inputs[0]["path"]), "text_column": text_column,
            "text_pair_column": text_pair_column, "model": str(model_dir),
            "scores": "sigmoid" if multi_label or len(info["labels"]) == 1 else "softmax", **info})
        warn_truncated(job, info["max_length"])
        return {**job.summary(), **done.summary()}


@dataclass(frozen=True)
class ClassifyPlan(ModelRun):
    """A classify run's options, for each process computing its shards."""

    text_pair_column: str | None
    multi_label: bool
    top_k: int | None


class ClassifyShards:
    """One process's classify work (see hfbatch.executor): the dataset and the model on `device`."""

    def __init__(self, plan: ClassifyPlan, device: str | None = None):
        from pathlib import Path

        from .io import open_arrow_dataset
        from .tokenized import open_tokens

        self.plan = plan
        model_dir = Path(plan.model_dir)
        source, source_manifest = open_arrow_dataset(plan.dataset)
        self.source, self.tokens = open_tokens("classify", plan.dataset, source_manifest, source, model_dir,
                                               plan.max_length, plan.text_column, plan.text_pair_column,
                                               plan.trust_remote_code)  # tokens: None for a text dataset
        self.classifier = plan.encoder_run("classify", device, rows=len(self.source))
        self.labels = [self.classifier.config.id2label[i] for i in range(self.classifier.dim)]
        self.k = min(plan.top_k, len(self.labels)) if plan.top_k else None
        self.info = {"labels": self.labels, "max_length": self.classifier.max_length, **self.classifier.settings}

    def prepare(self, i):
        plan = self.plan
        shard = slice(i * plan.shard_rows, (i + 1) * plan.shard_rows)
        rows, ids = self.source[shard], self.source.data.column("id")[shard]  # (the ids as stored, in Arrow)
        if self.tokens is not None:  # a `hfbatch tokenize` output: its ids, checked to be this model's
            return ids, self.tokens.take(rows)
        return ids, self.classifier.tokenize(rows[plan.text_column], rows[plan.text_pair_column]
                                                    if plan.text_pair_column else None)

    def compute(self, i, prepared, on_rows, parts=None):
        ids, tokenized = prepared
        scores = probabilities(self.classifier.run(tokenized, on_batch=on_rows, parts=parts), self.plan.multi_label)
        return labels_table(ids, scores, self.labels, self.k), {"truncated": tokenized.truncated}


def read_head(model_dir) -> dict:
    """The classification head the config declares; refuses a bare encoder, whose head would be random."""
    from .models import read_json_object

    config = read_json_object(model_dir / "config.json")
    architectures = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise InputError(f"{model_dir} has no sequence-classification head (architectures: "
                         f"{', '.join(architectures) or 'none'}); fine-tune one with `hfbatch train` or give "
                         f"a *ForSequenceClassification model")
    return {"problem_type": config.get("problem_type")}


def probabilities(logits, multi_label: bool):
    """What transformers' text-classification pipeline reports: softmax over labels, sigmoid per label for
    multi-label models and for single-logit (regression-style) heads. Computed in float64, stored float32."""
    import numpy as np

    x = logits.astype(np.float64)
    if multi_label or x.shape[1] == 1:
        return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)
    x = np.exp(x - x.max(axis=1, keepdims=True))
    return (x / x.sum(axis=1, keepdims=True)).astype(np.float32)


def labels_features(id_feature: dict, k: int | None):
    """The output's features in `to_dict()` form (saved with pyarrow alone: see Publisher.assemble_dataset)."""
    from .dataset import list_feature, value_feature

    features = {"id": id_feature, "label": value_feature("string"), "score": value_feature("float32")}
    if k:
        features["top_labels"] = list_feature(value_feature("string"), k)
        features["top_scores"] = list_feature(value_feature("float32"), k)
    return features


def labels_table(ids, scores, labels: list[str], k: int | None):
    """`ids`: an Arrow column (the source's, as the jobs pass it) or a list."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from .dataset import arrow_array, arrow_column, arrow_strings

    # A stable sort on the negated scores keeps the lower label id first on ties, as argmax does.
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k or 1]
    names = arrow_strings(labels)
    best = order[:, 0]
    columns = {"id": arrow_column(ids), "label": pc.take(names, arrow_array(best)),
               "score": arrow_array(scores[np.arange(len(best)), best].astype(np.float32, copy=False))}
    if k:
        top = np.take_along_axis(scores, order, axis=1).astype(np.float32, copy=False)
        columns["top_labels"] = pa.FixedSizeListArray.from_arrays(pc.take(names, arrow_array(order)), k)
        columns["top_scores"] = pa.FixedSizeListArray.from_arrays(arrow_array(top), k)
    return pa.table(columns)
