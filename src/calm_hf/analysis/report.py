"""`calm analyze`: the paper's linear analyses of one checkpoint on one dataset -> report.md, report.json, figures.

    calm analyze --model runs/calm --dataset runs/tokenized --labels labels.json --output_dir analysis

`--model` is any folder holding a CalM dual-axis transformer (`CalmForCausalNeuralModeling`, or a bare `CalmModel`:
then the forecast analyses are skipped) with its tokenizer in `tokenizer/`. `--dataset` is a trial DatasetDict of
`build_trial_dataset` (tokenized or not) with its `calm_sessions.json`. Sessions are matched to the model's session
and neuron tables by name (`config.session_names`), else by position.

`--labels` is a JSON file of annotations, keyed by session name so it does not depend on id layouts:

```json
{"trial":   {"direction":  {"mrcuts24": [0, 45, ...]}},          # one value per trial (trial_index order)
 "neuron":  {"assembly":   {"zf-f1": [0, null, 3, ...]}},         # one value per neuron of the session; null = none
 "session": {"subject":    {"sess-a": "mouse1", "sess-b": "mouse1", "sess-c": "mouse2"}}}
```

What is computed (every number beside its controls: the same analysis on an UNTRAINED model of the same config,
and with SHUFFLED labels):

1. per trial label: each neuron's d' in `--response_window` (all trials of all splits), neurons with |d'| above
   `--dprime_threshold` pooled across sessions, PCA and LDA of their neuron embeddings by preferred condition, a
   logistic probe of the preferred condition (5-fold CV);
2. per neuron label (plus the neuron's session when there are several): logistic probe and LDA of neuron
   embeddings; per session label: logistic probe of session embeddings when every class has >= 2 sessions
   (reported as not testable otherwise);
3. forecasts of the `--split` trials (context `--context_frames`) by the model, the untrained model and baselines
   (ridge AR, per-neuron AR, per-frame mean, fitted per session on train/validation): per-neuron Pearson r and
   PC-trajectory r, each with its trial-shuffle control.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import figures
from .linear import (
    embedding_lda,
    embedding_pca,
    pc_trajectory_correlation,
    probe_embeddings,
    shuffle_control,
    trial_responses,
    tuned_groups,
    tuning_dprime,
)

logger = logging.getLogger("calm_hf.analyze")


@dataclass
class AnalyzeArguments:
    model: str = field(metadata={"help": "Checkpoint folder (DAT weights + tokenizer/)."})
    dataset: str = field(metadata={"help": "Trial DatasetDict folder (build_trial_dataset / tokenize_trials)."})
    labels: str | None = field(default=None, metadata={"help": "JSON of trial/neuron/session labels (see module doc)."})
    output_dir: str = field(default="analysis", metadata={"help": "Where report.md, report.json and figures go."})
    response_window: str | None = field(
        default=None, metadata={"help": "start:stop frames (model rate) averaged for d'; default the whole trial."}
    )
    dprime_threshold: float = field(default=0.5, metadata={"help": "|d'| above which a neuron counts as tuned."})
    split: str = field(default="test", metadata={"help": "Split whose trials are forecast."})
    context_frames: int = field(default=40, metadata={"help": "Forecast context (frames at the model rate)."})
    max_forecast_trials: int | None = field(default=None, metadata={"help": "Cap on forecast trials per session."})
    forecast_mode: str = field(default="greedy", metadata={"help": "CalmForecaster rollout: greedy, sample, mean, soft."})
    baselines: str = field(default="ridge_ar,per_neuron_ar,mean", metadata={"help": "Comma list; empty = none."})
    num_components: int = field(default=3, metadata={"help": "PCs scored in the PC-trajectory analysis."})
    num_shuffles: int = field(default=20, metadata={"help": "Permutations of every shuffle control."})
    seed: int = field(default=0, metadata={"help": "Seed of the untrained control, folds and permutations."})


# ----------------------------------------------------------------------------------------------------------------
# loading


def load_models(path: str | Path, seed: int = 0):
    """The checkpoint's model, an untrained model of the same config (seeded init), and the tokenizer (or None).

    Returns `(model, untrained, tokenizer, can_forecast)`."""
    import torch

    import calm_hf  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModel, AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path} has no config.json; point it at a CalM checkpoint folder.")
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    can_forecast = any(not name.endswith("Model") for name in architectures)
    loader = AutoModelForCausalLM if can_forecast else AutoModel
    model = loader.from_pretrained(path).eval()
    torch.manual_seed(seed)
    untrained = type(model)(model.config).eval()
    tokenizer = None
    if (path / "tokenizer" / "config.json").is_file():
        tokenizer = calm_hf.CalmTokenizer.from_pretrained(path / "tokenizer").eval()
    else:
        can_forecast = False
        logger.warning("%s has no tokenizer/ folder: forecast analyses skipped.", path)
    return model, untrained, tokenizer, can_forecast


def embedding_tables(model) -> tuple[np.ndarray, np.ndarray]:
    """`(neuron_table (num_neurons, hidden), session_table (num_sessions, hidden))` of any CalM model."""
    backbone = getattr(model, "model", model)
    if not hasattr(backbone, "neuron_embeddings"):
        raise TypeError(f"{type(model).__name__} has no neuron_embeddings table; pass a CalM checkpoint.")
    neurons = backbone.neuron_embeddings.weight.detach().float().cpu().numpy()
    sessions = backbone.session_embeddings.weight.detach().float().cpu().numpy()
    return neurons, sessions


def uses_data_identity(model) -> bool:
    """Whether `model` computes every neuron's identity from the recording (`config.neuron_identity == "data"`)."""
    return getattr(model.config, "neuron_identity", "table") == "data"


def data_identities(model, dataset, infos) -> dict[int, "torch.Tensor"]:
    """Data-identity models: every dataset session's identity features `(neurons, identity_size)`, computed from its
    training trials (the trials a user would give as `reference=`; the zero-shot identity without any)."""
    from ..forecasting import split_identities

    return split_identities(model.config, dataset["train"] if "train" in dataset else None,
                            {info.session_id: info.num_neurons for info in infos})


def identity_tables(model, identities: dict, infos) -> tuple[np.ndarray, np.ndarray, list[tuple[int, np.ndarray]]]:
    """Data-identity models: `(neuron_table, session_table, id_map)` in the shape `embedding_tables` and
    `session_ids_in_model` give for table models. A neuron's row is what the model adds to its tokens (the projected
    identity); a session's row is the mean over its neurons; `id_map` points each session at its rows."""
    import torch

    backbone = getattr(model, "model", model)
    rows, sessions, id_map, offset = [], [], [], 0
    with torch.no_grad():
        for index, info in enumerate(infos):
            features = identities[info.session_id].to(backbone.identity_proj.weight.device)
            features = features[..., : backbone.identity_proj.in_features].float()
            states = (backbone.identity_null + backbone.identity_proj(features)).float().cpu().numpy()
            rows.append(states)
            sessions.append(states.mean(axis=0))
            id_map.append((index, np.arange(offset, offset + len(states))))
            offset += len(states)
    return np.concatenate(rows), np.stack(sessions), id_map


def session_ids_in_model(config, infos) -> list[tuple[int, np.ndarray]]:
    """For each dataset session: `(model session id, model neuron ids (neurons,))`, matched by name when the model
    records session names, by position otherwise."""
    names = list(getattr(config, "session_names", None) or [])
    ranges = list(getattr(config, "session_neuron_ranges", None) or [])
    mapped = []
    for info in infos:
        if info.name in names:
            session_id = names.index(info.name)
            start, stop = ranges[session_id] if session_id < len(ranges) else info.neuron_range
        else:
            session_id, (start, stop) = info.session_id, info.neuron_range
        if stop - start != info.num_neurons:
            raise ValueError(
                f"session {info.name!r} has {info.num_neurons} neurons in the dataset but {stop - start} in the model "
                "(config.session_neuron_ranges): analyse the model with the dataset it was trained or adapted on."
            )
        if session_id >= config.num_sessions or stop > config.num_neurons:
            raise ValueError(
                f"session {info.name!r} (id {session_id}, neurons [{start}, {stop})) is outside the model's tables "
                f"(num_sessions={config.num_sessions}, num_neurons={config.num_neurons}); adapt the model to it first."
            )
        mapped.append((int(session_id), np.arange(start, stop)))
    return mapped


def load_labels(path: str | None, infos) -> dict[str, dict[str, Any]]:
    """Read and check the labels JSON against the dataset's sessions."""
    if path is None:
        return {"trial": {}, "neuron": {}, "session": {}}
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--labels {path} does not exist.")
    labels = json.loads(path.read_text())
    unknown = set(labels) - {"trial", "neuron", "session"}
    if unknown:
        raise ValueError(f"labels file {path}: unknown top-level keys {sorted(unknown)}; use trial, neuron, session.")
    by_name = {info.name: info for info in infos}
    for kind in ("trial", "neuron"):
        for attribute, per_session in labels.get(kind, {}).items():
            for session, values in per_session.items():
                if session not in by_name:
                    raise ValueError(f"labels {kind}.{attribute}: session {session!r} is not in the dataset "
                                     f"({sorted(by_name)}).")
                if kind == "neuron" and len(values) != by_name[session].num_neurons:
                    raise ValueError(f"labels neuron.{attribute}[{session!r}] has {len(values)} values for "
                                     f"{by_name[session].num_neurons} neurons.")
    return {kind: labels.get(kind, {}) for kind in ("trial", "neuron", "session")}


def _all_rows(dataset) -> dict[str, np.ndarray]:
    """Every trial of every split: `input_values` (trials, neurons, frames) per session, with trial indices."""
    rows: dict[int, dict[str, list]] = {}
    for split in dataset.values():
        table = split.with_format("numpy", columns=["input_values", "session_id", "trial_index"])
        for start in range(0, len(table), 256):
            batch = table[start : start + 256]
            for values, session, trial in zip(batch["input_values"], batch["session_id"], batch["trial_index"]):
                entry = rows.setdefault(int(session), {"values": [], "trial": []})
                entry["values"].append(np.asarray(values, dtype=np.float32))
                entry["trial"].append(int(trial))
    return {
        session: {"values": np.stack(entry["values"]), "trial": np.asarray(entry["trial"])}
        for session, entry in rows.items()
    }


# ----------------------------------------------------------------------------------------------------------------
# analyses


def _fmt(result: dict | None, key: str = "accuracy") -> str:
    if not result:
        return "n/a"
    return f"{result[key]:.3f} ± {result[key + '_std']:.3f}"


def _controls(name, features_trained, features_untrained, labels, args, kind="probe") -> dict[str, Any]:
    fn = probe_embeddings if kind == "probe" else embedding_lda
    trained = fn(features_trained, labels, num_shuffles=args.num_shuffles, seed=args.seed)
    untrained = fn(features_untrained, labels, num_shuffles=args.num_shuffles, seed=args.seed)
    return {"name": name, "trained": trained, "untrained": untrained}


def embedding_change(trained: np.ndarray, untrained: np.ndarray) -> dict[str, float]:
    """How far training moved the neuron embeddings from the untrained control's rows `(neurons, hidden)` each.

    The untrained control is built with the analysis seed; when that is the pretraining seed (0 for the repository's
    scripts) it IS the model's initialisation, and a cosine near 1 means training left the embeddings near their
    random start, so they cannot encode much."""
    cosine = (trained * untrained).sum(1) / (np.linalg.norm(trained, axis=1) * np.linalg.norm(untrained, axis=1))
    relative = np.linalg.norm(trained - untrained, axis=1) / np.linalg.norm(untrained, axis=1)
    return {"mean_cosine_to_untrained": float(np.mean(cosine)), "mean_relative_change": float(np.mean(relative))}


def _strip(result: dict) -> dict:
    """JSON copy without the big projection arrays."""
    return {k: v for k, v in result.items() if k not in ("projection",)}


def analyze_tuning(args, infos, id_map, tables, untrained_tables, rows, labels, out: Path) -> list[dict]:
    window = None
    if args.response_window:
        start, stop = (int(x) for x in args.response_window.split(":"))
        window = (start, stop)
    results = []
    for attribute, per_session in labels["trial"].items():
        dprimes, groups, neuron_ids = [], [], []
        for info, (_, model_neurons) in zip(infos, id_map):
            if info.name not in per_session:
                continue
            session_rows = rows[info.session_id]
            values = np.asarray(per_session[info.name], dtype=object)[session_rows["trial"]]
            keep = np.array([v is not None for v in values])
            responses = trial_responses(session_rows["values"][keep], window)
            trial_labels = np.asarray([str(v) for v in values[keep]])
            dprime, classes = tuning_dprime(responses, trial_labels)
            groups.append(tuned_groups(dprime, classes, args.dprime_threshold))
            dprimes.append(dprime if dprime.ndim == 1 else dprime.max(axis=0))
            neuron_ids.append(model_neurons)
        if not groups:
            continue
        groups, dprime, neuron_ids = np.concatenate(groups), np.concatenate(dprimes), np.concatenate(neuron_ids)
        tuned = np.array([g is not None for g in groups])
        item = {"attribute": attribute, "num_neurons": int(dprime.size), "num_tuned": int(tuned.sum()),
                "threshold": args.dprime_threshold, "window": window,
                "dprime_quantiles": np.quantile(dprime, [0.1, 0.5, 0.9]).tolist(),
                "group_sizes": {str(k): int(v) for k, v in zip(*np.unique(groups[tuned].astype(str), return_counts=True))}}
        figures.plot_dprime_histogram(dprime, args.dprime_threshold, out / f"dprime_{attribute}.png",
                                      f"tuning d' to {attribute} ({tuned.sum()}/{dprime.size} tuned)")
        tuned_labels = groups[tuned].astype(str)
        if len(item["group_sizes"]) < 2 or min(item["group_sizes"].values()) < 2:
            item["note"] = "fewer than two tuned groups with >= 2 neurons: PCA/LDA/probe not testable"
            results.append(item)
            continue
        trained_features, untrained_features = tables[neuron_ids[tuned]], untrained_tables[neuron_ids[tuned]]
        pcas = {"trained": embedding_pca(trained_features), "untrained": embedding_pca(untrained_features)}
        figures.plot_embedding_pca({k: v["projection"] for k, v in pcas.items()}, tuned_labels,
                                   out / f"pca_{attribute}.png", f"neuron embeddings of {attribute}-tuned neurons",
                                   {k: v["explained_variance_ratio"] for k, v in pcas.items()})
        item["pca_explained_variance"] = {k: v["explained_variance_ratio"].tolist() for k, v in pcas.items()}
        lda = _controls(attribute, trained_features, untrained_features, tuned_labels, args, kind="lda")
        figures.plot_embedding_lda(
            {k: lda[k]["projection"] for k in ("trained", "untrained")}, tuned_labels, out / f"lda_{attribute}.png",
            f"LDA of neuron embeddings by preferred {attribute}",
            {k: f"CV acc {_fmt(lda[k])} (shuffled {_fmt(lda[k], 'shuffled_accuracy')}, chance {lda[k]['chance']:.2f})"
             for k in ("trained", "untrained")},
        )
        item["lda"] = {k: _strip(lda[k]) for k in ("trained", "untrained")}
        probe = _controls(f"preferred {attribute}", trained_features, untrained_features, tuned_labels, args)
        item["probe"] = {k: probe[k] for k in ("trained", "untrained")}
        results.append(item)
    return results


def analyze_identity(args, infos, id_map, tables, untrained_tables, session_tables, untrained_session_tables,
                     labels) -> tuple[list[dict], list[dict]]:
    neuron_results = []
    attributes = dict(labels["neuron"])
    if len(infos) > 1:  # which session a neuron comes from: free ground truth whenever there are several sessions
        attributes.setdefault("session", {info.name: [info.name] * info.num_neurons for info in infos})
    for attribute, per_session in attributes.items():
        ids, values = [], []
        for info, (_, model_neurons) in zip(infos, id_map):
            for neuron, value in zip(model_neurons, per_session.get(info.name, [])):
                if value is not None:
                    ids.append(neuron)
                    values.append(str(value))
        ids, values = np.asarray(ids, dtype=np.int64), np.asarray(values)
        classes, counts = np.unique(values, return_counts=True)
        keep = np.isin(values, classes[counts >= 2])
        item = {"attribute": attribute, "num_neurons": int(keep.sum()), "num_classes": int((counts >= 2).sum())}
        if item["num_classes"] < 2:
            item["note"] = "fewer than two classes with >= 2 neurons: not testable"
            neuron_results.append(item)
            continue
        for kind in ("probe", "lda"):
            result = _controls(attribute, tables[ids[keep]], untrained_tables[ids[keep]], values[keep], args, kind)
            item[kind] = {k: _strip(result[k]) for k in ("trained", "untrained")}
        neuron_results.append(item)
    session_results = []
    for attribute, per_session in labels["session"].items():
        session_ids = [sid for info, (sid, _) in zip(infos, id_map) if info.name in per_session]
        values = np.asarray([str(per_session[info.name]) for info in infos if info.name in per_session])
        classes, counts = np.unique(values, return_counts=True)
        item = {"attribute": attribute, "num_sessions": int(values.size), "num_classes": int(classes.size)}
        if classes.size < 2 or counts.min() < 2:
            item["note"] = (f"not testable: {values.size} sessions in {classes.size} classes (a CV probe needs >= 2 "
                            "classes with >= 2 sessions each)")
        else:
            result = _controls(attribute, session_tables[session_ids], untrained_session_tables[session_ids], values,
                               args)
            item["probe"] = {k: result[k] for k in ("trained", "untrained")}
        session_results.append(item)
    return neuron_results, session_results


def _baseline(name: str, context: int):
    from ..baselines.forecasting import MeanForecaster, PerNeuronARForecaster, RidgeARForecaster

    if name == "ridge_ar":
        return RidgeARForecaster(context=context, lags_grid=tuple(lag for lag in (1, 2, 4, 8) if lag <= context))
    if name == "per_neuron_ar":
        return PerNeuronARForecaster(context=context, lags_grid=tuple(lag for lag in (1, 2, 4, 8, 16) if lag <= context))
    if name == "mean":
        return MeanForecaster(context=context, variant="per_frame")
    raise ValueError(f"unknown baseline {name!r}; choose from ridge_ar, per_neuron_ar, mean.")


def _calm_forecast(model, tokenizer, values, session_id, neuron_ids, args, identity=None) -> np.ndarray:
    """Forecasts of `values`' last frames; table models read `session_id` / `neuron_ids`, data-identity models the
    session's `identity` features."""
    import torch

    from ..forecasting import CalmForecaster

    forecaster = CalmForecaster(model, tokenizer)
    horizon = values.shape[-1] - args.context_frames
    predictions = []
    for start in range(0, len(values), 8):
        chunk = values[start : start + 8]
        who = ({"neuron_identity": identity} if uses_data_identity(model) else {
            "neuron_ids": torch.as_tensor(np.broadcast_to(neuron_ids, (len(chunk), neuron_ids.size)).copy()),
            "session_ids": torch.full((len(chunk),), session_id, dtype=torch.long)})
        result = forecaster.forecast(
            chunk[..., : args.context_frames], horizon=horizon, **who,
            mode=args.forecast_mode, num_samples=4 if args.forecast_mode in ("sample", "mean") else 1,
        )
        predictions.append(result.forecast)
    return np.concatenate(predictions)


def _forecast_sessions(args, dataset, infos, id_map, model, untrained, tokenizer, forecasters: list[str],
                       identities: dict | None = None):
    """Per session: (truths `(trials, neurons, horizon)` list, {forecaster: predictions list}) on `args.split`."""
    splits = {}
    for name in ("train", "validation", args.split):
        table = dataset[name].with_format("numpy", columns=["input_values", "session_id"])
        splits[name] = (np.asarray(table["session_id"]), table["input_values"])
    predictions = {name: [] for name in forecasters}
    truths = []
    for info, (model_session, model_neurons) in zip(infos, id_map):
        def trials(split):
            ids, values = splits[split]
            return np.stack([np.asarray(v, dtype=np.float32) for v, s in zip(values, ids) if s == info.session_id])

        test = trials(args.split)[: args.max_forecast_trials]
        if test.shape[-1] <= args.context_frames + 1:
            raise ValueError(f"trials of {test.shape[-1]} frames leave no horizon after --context_frames "
                             f"{args.context_frames}.")
        truths.append(test[..., args.context_frames :].astype(np.float64))
        identity = None if identities is None else identities[info.session_id]
        predictions["CalM"].append(_calm_forecast(model, tokenizer, test, model_session, model_neurons, args,
                                                  identity))
        predictions["CalM untrained"].append(
            _calm_forecast(untrained, tokenizer, test, model_session, model_neurons, args, identity))
        train, validation = trials("train"), trials("validation")
        for name in forecasters[2:]:
            baseline = _baseline(name, args.context_frames).fit(train, validation)
            predictions[name].append(baseline.predict(test[..., : args.context_frames], truths[-1].shape[-1]))
    return truths, predictions


def _score_forecaster(args, infos, truths, predictions, trajectories: dict, variance: dict, name: str) -> dict:
    """Per-neuron r and PC-trajectory r of one forecaster, each beside its trial-shuffle control, per session and
    averaged over sessions (sessions can differ in neuron count: the paper's neurons -> trials -> sessions mean)."""
    from ..metrics.functional import forecast_pearson_r

    def per_neuron(p, t, s):
        return forecast_pearson_r(p, t)["pearson_r"]

    def pc(p, t, s):
        return pc_trajectory_correlation(p, t, num_components=args.num_components)["pc_r"]

    scores = []
    for index, (truth, prediction) in enumerate(zip(truths, predictions)):
        prediction = prediction.astype(np.float64)
        pcs = pc_trajectory_correlation(prediction, truth, None, args.num_components, return_trajectories=True)
        if index == 0:
            trajectories[name] = pcs["trajectories"]["0"]
        variance[infos[index].name] = pcs["explained_variance_ratio"]["0"]
        scores.append({
            "pearson_r": per_neuron(prediction, truth, None),
            "pearson_r_shuffled": shuffle_control(per_neuron, prediction, truth, None, args.num_shuffles,
                                                  args.seed)["mean"],
            "pc_r": pcs["pc_r"],
            "pc_r_per_pc": pcs["per_pc"],
            "pc_r_shuffled": shuffle_control(pc, prediction, truth, None, args.num_shuffles, args.seed)["mean"],
        })
    result = {key: float(np.nanmean([item[key] for item in scores])) for key in scores[0] if key != "pc_r_per_pc"}
    width = max(len(item["pc_r_per_pc"]) for item in scores)
    per_pc = np.array([item["pc_r_per_pc"] + [np.nan] * (width - len(item["pc_r_per_pc"])) for item in scores])
    result["pc_r_per_pc"] = np.nanmean(per_pc, axis=0).tolist()
    result["per_session"] = {info.name: item for info, item in zip(infos, scores)}
    return result


def analyze_forecasts(args, dataset, infos, id_map, model, untrained, tokenizer, out: Path,
                      identities: dict | None = None) -> dict[str, Any]:
    if args.split not in dataset:
        raise ValueError(f"--split {args.split!r} is not in the dataset (splits: {sorted(dataset)}).")
    window = model.config.window_size
    if args.context_frames % window:
        raise ValueError(f"--context_frames {args.context_frames} must be a multiple of the token window {window}.")
    forecasters = ["CalM", "CalM untrained", *[b for b in args.baselines.split(",") if b]]
    truths, predictions = _forecast_sessions(args, dataset, infos, id_map, model, untrained, tokenizer, forecasters,
                                             identities)
    trajectories, variance = {}, {}
    results = {name: _score_forecaster(args, infos, truths, predictions[name], trajectories, variance, name)
               for name in forecasters}
    figures.plot_pc_correlations(results, out / "pc_trajectory_correlation.png",
                                 "forecasts: per-neuron r and PC-trajectory r vs trial-shuffle controls")
    truth_pcs = trajectories["CalM"]["truth"]
    trial = int(np.argmax(truth_pcs[:, 0].std(axis=-1)))  # the trial with the most PC1 movement: a readable example
    shown = [n for n in forecasters if n in ("CalM", "ridge_ar", "mean", "CalM untrained")]
    figures.plot_pc_trajectories(truth_pcs[trial], {n: trajectories[n]["prediction"][trial] for n in shown},
                                 out / "pc_trajectories.png", f"session {infos[0].name}, trial {trial}: true-trace PCs",
                                 frame_rate=infos[0].fs)
    return {"num_trials": int(sum(len(t) for t in truths)), "horizon": int(truths[0].shape[-1]),
            "context_frames": args.context_frames, "mode": args.forecast_mode, "forecasters": results,
            "explained_variance_ratio": variance}


# ----------------------------------------------------------------------------------------------------------------
# report


def headline(report: dict) -> dict:
    """Rows `analysis | trained | untrained | shuffled | chance` of every number in the report."""
    rows = []

    def add(analysis, item):
        rows.append({"analysis": analysis, "trained": _fmt(item["trained"]), "untrained": _fmt(item["untrained"]),
                     "shuffled": _fmt(item["trained"], "shuffled_accuracy"), "chance": f"{item['trained']['chance']:.2f}"})

    for item in report["tuning"]:
        if "lda" in item:
            add(f"LDA CV acc, preferred {item['attribute']} ({item['num_tuned']} tuned neurons)", item["lda"])
            add(f"probe acc, preferred {item['attribute']}", item["probe"])
    for item in report["neuron_probes"]:
        if "probe" in item:
            add(f"neuron-embedding probe: {item['attribute']} ({item['num_neurons']} neurons)", item["probe"])
            add(f"neuron-embedding LDA: {item['attribute']}", item["lda"])
    for item in report["session_probes"]:
        if "probe" in item:
            add(f"session-embedding probe: {item['attribute']}", item["probe"])
    forecasts = report.get("forecasts")
    if forecasts:
        calm, untrained = forecasts["forecasters"]["CalM"], forecasts["forecasters"]["CalM untrained"]
        for key, label in (("pc_r", "PC-trajectory r"), ("pearson_r", "per-neuron forecast r")):
            rows.append({"analysis": f"{label} (CalM; trial-shuffle as control)", "trained": f"{calm[key]:.3f}",
                         "untrained": f"{untrained[key]:.3f}", "shuffled": f"{calm[key + '_shuffled']:.3f}"})
        for name, item in forecasts["forecasters"].items():
            if not name.startswith("CalM"):
                rows.append({"analysis": f"PC-trajectory r ({name} baseline; trial-shuffle)", "trained": f"{item['pc_r']:.3f}",
                             "untrained": "", "shuffled": f"{item['pc_r_shuffled']:.3f}"})
    return {"rows": rows}


def write_markdown(report: dict, out: Path) -> Path:
    lines = [f"# CalM interpretability report", "",
             f"Model `{report['model']}`, dataset `{report['dataset']}` ({report['num_sessions']} session(s), "
             f"{report['num_neurons']} neurons). Every accuracy is 5-fold cross-validated (mean ± std over folds); "
             "**untrained** = a freshly initialised model of the same config (seed "
             f"{report['seed']}); **shuffled** = the trained model's embeddings with permuted labels "
             f"({report['num_shuffles']} permutations, mean ± std); chance = majority-class fraction.", "",
             "| analysis | trained | untrained | shuffled labels / trials | chance |", "|---|---|---|---|---|"]
    for row in report["headline"]["rows"]:
        lines.append(f"| {row['analysis']} | {row['trained']} | {row['untrained']} | {row['shuffled']} | "
                     f"{row.get('chance', '')} |")
    change = report["embedding_change"]
    lines += ["", f"Neuron embeddings vs the untrained control's rows: mean cosine {change['mean_cosine_to_untrained']:.3f}, "
              f"mean relative change {change['mean_relative_change']:.3f} (with the pretraining seed the untrained "
              "control is the model's own initialisation: cosine near 1 = training barely moved the embeddings)."]
    lines += ["", "## Tuning (d') and neuron embeddings", ""]
    if not report["tuning"]:
        lines.append("No per-trial labels given (`trial` in --labels): tuning analyses not run.")
    for item in report["tuning"]:
        lines.append(f"- **{item['attribute']}**: {item['num_tuned']}/{item['num_neurons']} neurons with |d'| > "
                     f"{item['threshold']} (window {item['window']}; d' 10/50/90%: "
                     f"{', '.join(f'{q:.2f}' for q in item['dprime_quantiles'])}); groups {item['group_sizes']}. "
                     + (item.get("note", "") or f"Figures: `pca_{item['attribute']}.png`, `lda_{item['attribute']}.png`, "
                        f"`dprime_{item['attribute']}.png`."))
    lines += ["", "## Identity probes", ""]
    for item in report["neuron_probes"] + report["session_probes"]:
        table = "neuron" if "num_neurons" in item else "session"
        lines.append(f"- {table} embeddings, **{item['attribute']}**: " + (item.get("note") or "see table"))
    if report.get("forecasts"):
        f = report["forecasts"]
        lines += ["", "## Forecast dynamics", "",
                  f"{f['num_trials']} `{report['split']}` trials, context {f['context_frames']} frames, horizon "
                  f"{f['horizon']} frames, CalM rollout `{f['mode']}`. PCA on the true horizon traces per session "
                  f"({report['num_components']} PCs).", "",
                  "| forecaster | per-neuron r | shuffled trials | PC-trajectory r | shuffled trials | r per PC |",
                  "|---|---|---|---|---|---|"]
        for name, item in f["forecasters"].items():
            lines.append(f"| {name} | {item['pearson_r']:.3f} | {item['pearson_r_shuffled']:.3f} | {item['pc_r']:.3f} | "
                         f"{item['pc_r_shuffled']:.3f} | {', '.join(f'{v:.2f}' for v in item['pc_r_per_pc'])} |")
        lines += ["", "![PC-trajectory correlation](pc_trajectory_correlation.png)", "",
                  "![PC trajectories](pc_trajectories.png)"]
    if report.get("probe_figure"):
        lines += ["", "![probes](probes.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def run_analysis(args: AnalyzeArguments) -> dict:
    """Run every analysis for `args` and write the report; returns the report dict (also in report.json)."""
    import datasets

    from ..data import load_session_metadata

    start = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not Path(args.dataset).is_dir():
        raise FileNotFoundError(f"--dataset {args.dataset} is not a folder; give a saved trial DatasetDict.")
    dataset = datasets.load_from_disk(args.dataset)
    infos = load_session_metadata(args.dataset)
    model, untrained, tokenizer, can_forecast = load_models(args.model, args.seed)
    labels = load_labels(args.labels, infos)
    identities = None
    if uses_data_identity(model):  # who a neuron is comes from its activity: analyse the identity the model adds
        identities = data_identities(model, dataset, infos)
        tables, session_tables, id_map = identity_tables(model, identities, infos)
        untrained_tables, untrained_session_tables, _ = identity_tables(untrained, identities, infos)
    else:
        id_map = session_ids_in_model(model.config, infos)
        tables, session_tables = embedding_tables(model)
        untrained_tables, untrained_session_tables = embedding_tables(untrained)
    rows = _all_rows(dataset)
    used = np.concatenate([neurons for _, neurons in id_map])
    report: dict[str, Any] = {
        "model": str(args.model), "dataset": str(args.dataset), "split": args.split, "seed": args.seed,
        "num_shuffles": args.num_shuffles, "num_components": args.num_components, "num_sessions": len(infos),
        "num_neurons": int(sum(info.num_neurons for info in infos)),
    }
    report["embedding_change"] = embedding_change(tables[used], untrained_tables[used])
    report["tuning"] = analyze_tuning(args, infos, id_map, tables, untrained_tables, rows, labels, out)
    report["neuron_probes"], report["session_probes"] = analyze_identity(
        args, infos, id_map, tables, untrained_tables, session_tables, untrained_session_tables, labels)
    probe_rows = [
        {"name": f"{item['attribute']}" if "probe" in item else item["attribute"], **item["probe"]}
        for item in report["neuron_probes"] + report["session_probes"] if "probe" in item
    ] + [{"name": f"preferred {item['attribute']}", **item["probe"]} for item in report["tuning"] if "probe" in item]
    if probe_rows:
        figures.plot_probe_accuracies(probe_rows, out / "probes.png", "linear probes of embeddings")
        report["probe_figure"] = "probes.png"
    if can_forecast and args.context_frames > 0:
        report["forecasts"] = analyze_forecasts(args, dataset, infos, id_map, model, untrained, tokenizer, out,
                                               identities)
    report["headline"] = headline(report)
    report["seconds"] = time.perf_counter() - start
    report = _json_safe(report)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, out)
    logger.info("wrote %s (%.1f s)", out / "report.md", report["seconds"])
    return report
