#!/usr/bin/env python
"""Why the dual-axis transformer forecast like a per-neuron model, and what fixed it: ablations + learning curves.

    python benchmarks/dat_ablations.py                       # the ablation rows, 8 minutes of training each (~55 min)
    python benchmarks/dat_ablations.py --rows head_mixer_long --minutes 4 --out benchmarks/results/long  # 16 min curve
    python benchmarks/dat_ablations.py --rows ce_only,head,head_mixer --minutes 5
    python benchmarks/dat_ablations.py --quick --out /tmp/abl   # seconds-long smoke version
    # learning curves at two sizes (run on two cores at once, then merged into one table and figure):
    python benchmarks/dat_ablations.py --rows curve_cpu --minutes 55 --eval_every_seconds 300 --tcn_minutes 6 --out /tmp/c1
    python benchmarks/dat_ablations.py --rows curve_small --minutes 40 --eval_every_seconds 300 --out /tmp/c2
    python benchmarks/dat_ablations.py --merge /tmp/c1,/tmp/c2 --out benchmarks/results/learning_curves

Every row trains a CalmForCausalNeuralModeling from scratch for the same wall-clock budget on the same data and
tokens, and is scored on the VALIDATION trials only (the test split belongs to `forecasting.py`):

- data: the paper's simulated benchmark (3 sessions x 400 trials x 200 neurons x 100 frames at 5 Hz), z-scored with
  training statistics, 70/15/15 split (`calm_hf.data.prepare_session`);
- tokens: one k-means codebook (128 codes on 4-frame windows of the training trials) for every row, so only the
  DAT changes (k-means reconstructs these windows at r ~0.99; tokenization does not limit forecasting here);
- forecast: 40-frame context -> the remaining 60 frames; Pearson r per neuron over the horizon, neurons -> trials
  -> sessions, and MSE in z units. Rows with the continuous head forecast with it ("direct"); the CE-only row with
  the expected trace of a soft rollout (sum_c p(c) * centroid_c at every step: the conditional-mean decoder of
  the token path) and with greedy rollouts;
- learning curves: validation r / MSE / next-token CE logged every `--eval_every_seconds`;
- trial-swap probe (`calm_hf.forecasting.trial_swap_probe` logic): the same validation trials with every other
  neuron's tokens taken from another trial of the session; a drop in r shows the model uses the population;
- reference lines: population ridge AR (rolled out) and per-neuron AR fitted on the same training trials.

Writes `<out>/dat_ablations.{json,md,png}` (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CONTEXT = 40
WINDOW = 4

# row -> (description, CalmConfig overrides, training overrides)
ROWS: dict[str, tuple[str, dict, dict]] = {
    "ce_only": ("paper objective: next-token CE only (no head, no mixer)",
                {"value_head_steps": 0, "neuron_mixer_rank": 0}, {}),
    "head": ("+ continuous forecast head (MSE on the next 15 windows)",
             {"value_head_steps": 15, "neuron_mixer_rank": 0}, {}),
    "head_mixer": ("+ linear neuron mixer (rank 64), whole populations (200 neurons per example)",
                   {"value_head_steps": 15, "neuron_mixer_rank": 64}, {}),
    "head_mixer_subset64": ("+ 64 random neurons of 200 per example: the main job's default",
                            {"value_head_steps": 15, "neuron_mixer_rank": 64}, {"neurons": 64}),
    "head_mixer_augment": ("head_mixer + the paper's scheduled sampling (0.6) and neighbour replacement (0.1)",
                           {"value_head_steps": 15, "neuron_mixer_rank": 64, "scheduled_sampling_prob": 0.6,
                            "neighbor_replacement_prob": 0.1}, {}),
    "head_mixer_small": ("head_mixer at a smaller size (hidden 64, 2 layers)",
                         {"value_head_steps": 15, "neuron_mixer_rank": 64, "hidden_size": 64, "num_hidden_layers": 2,
                          "intermediate_size": 256}, {}),
    "head_mixer_long": ("head_mixer trained 4x longer (learning curve)",
                        {"value_head_steps": 15, "neuron_mixer_rank": 64}, {"minutes_factor": 4.0}),
    "head_mixer_subset64_coupling": ("+ neuron embeddings initialised at each session's measured coupling "
                                     "(calm_hf.identity_init; calm pretrain's default)",
                                     {"value_head_steps": 15, "neuron_mixer_rank": 64},
                                     {"neurons": 64, "identity_init": True}),
    "head_mixer_subset64_coupling_skip": ("+ linear highway from each neuron's own last 4 windows of raw trace into "
                                          "the head (config.value_skip_windows=4)",
                                          {"value_head_steps": 15, "neuron_mixer_rank": 64, "value_skip_windows": 4},
                                          {"neurons": 64, "identity_init": True}),
    "head_mixer_subset64_coupling_skip_ridge": ("+ the highway started at the training trials' ridge forecast from a "
                                                "neuron's own last 16 frames, head output at zero "
                                                "(calm_hf.identity_init.init_value_skip_from_dataset)",
                                                {"value_head_steps": 15, "neuron_mixer_rank": 64,
                                                 "value_skip_windows": 4},
                                                {"neurons": 64, "identity_init": True, "value_skip_init": True}),
    # learning curves of the shipped recipe at two sizes (run with a long --minutes, e.g. 40-60)
    "curve_cpu": ("learning curve: the cpu preset (hidden 96, 3 layers), 64 neurons per example",
                  {"value_head_steps": 15, "neuron_mixer_rank": 64}, {"neurons": 64}),
    "curve_small": ("learning curve: hidden 64, 2 layers, 64 neurons per example",
                    {"value_head_steps": 15, "neuron_mixer_rank": 64, "hidden_size": 64, "num_hidden_layers": 2,
                     "intermediate_size": 256}, {"neurons": 64}),
}
DEFAULT_ROWS = "ce_only,head,head_mixer,head_mixer_subset64,head_mixer_augment,head_mixer_small"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_data(num_trials: int, seed: int) -> dict:
    from calm_hf.data.preprocessing import prepare_session
    from calm_hf.data.simulation import simulate_benchmark

    out: dict[str, list] = {}
    for session_id, session in enumerate(simulate_benchmark(3, seed=seed, num_trials=num_trials)):
        prepared = prepare_session(session, target_fs=5.0, split_seed=seed)
        for split in ("train", "validation"):
            index = prepared.splits[split]
            out.setdefault(split, []).append(prepared.traces[index])
            out.setdefault(split + "_session", []).append(np.full(len(index), session_id))
    return {key: np.concatenate(value) for key, value in out.items()}


class KMeansTokens:
    """k-means codebook on 4-frame windows: encode (trials, neurons, frames) -> codes, decode codes -> templates."""

    def __init__(self, train: np.ndarray, codes: int, seed: int):
        from sklearn.cluster import KMeans

        windows = train.reshape(-1, WINDOW)
        rng = np.random.default_rng(seed)
        sample = windows[rng.choice(len(windows), min(len(windows), 60_000), replace=False)]
        self.centroids = torch.tensor(
            KMeans(codes, n_init=1, random_state=seed, max_iter=50).fit(sample).cluster_centers_, dtype=torch.float32
        )

    def encode(self, traces) -> torch.Tensor:
        windows = torch.as_tensor(np.asarray(traces, dtype=np.float32)).reshape(*traces.shape[:2], -1, WINDOW)
        return torch.cdist(windows.reshape(-1, WINDOW), self.centroids).argmin(-1).reshape(windows.shape[:3])


def fit_reference_lines(data: dict, tcn_minutes: float = 0.0) -> dict:
    """Closed-form population ridge AR and per-neuron AR; with `tcn_minutes` > 0 also the TCN baseline, trained
    per session for that many minutes in total (early-stopped on the validation trials, like forecasting.py)."""
    from functools import partial

    from calm_hf.baselines.forecasting import PerNeuronARForecaster, RidgeARForecaster, TCNForecaster
    from calm_hf.metrics.functional import forecast_pearson_r, mse

    val, val_s, train, train_s = data["validation"], data["validation_session"], data["train"], data["train_session"]
    truth, lines = val[:, :, CONTEXT:], {}
    factories = [("ridge_ar", RidgeARForecaster), ("per_neuron_ar", PerNeuronARForecaster)]
    if tcn_minutes > 0:
        seconds = tcn_minutes * 60.0 / len(np.unique(train_s))
        factories.append(("tcn", partial(TCNForecaster, max_seconds=seconds, learning_rates=(1e-3,))))
    for name, factory in factories:
        pred = np.zeros_like(truth)
        start = time.perf_counter()
        for session in np.unique(train_s):
            model = factory(context=CONTEXT).fit(train[train_s == session], val[val_s == session])
            pred[val_s == session] = model.predict(val[val_s == session][:, :, :CONTEXT], truth.shape[-1])
        lines[name] = {"pearson_r": forecast_pearson_r(pred, truth, val_s)["pearson_r"], "mse": mse(pred, truth),
                       "fit_seconds": time.perf_counter() - start}
        log(f"{name}: val r {lines[name]['pearson_r']:.3f}  MSE {lines[name]['mse']:.3f}")
    return lines


class Row:
    def __init__(self, name: str, data: dict, tokens: KMeansTokens, args):
        from calm_hf import CalmConfig, CalmForCausalNeuralModeling

        self.name, self.data, self.tokens, self.args = name, data, tokens, args
        description, overrides, training = ROWS[name]
        self.description = description
        self.neurons_per_example = training.get("neurons", data["train"].shape[1])
        self.minutes = args.minutes * training.get("minutes_factor", 1.0)
        self.num_neurons = data["train"].shape[1]
        config = dict(vocab_size=args.codes, num_neurons=3 * self.num_neurons, num_sessions=3, window_size=WINDOW,
                      hidden_dropout=0.0, scheduled_sampling_prob=0.0, neighbor_replacement_prob=0.0)
        if args.quick:
            config.update(hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2)
        config.update(overrides)
        if args.quick and "hidden_size" in overrides:
            config.update(hidden_size=32, num_hidden_layers=1, intermediate_size=64)
        if args.quick and config.get("neuron_mixer_rank"):
            config["neuron_mixer_rank"] = 8
        self.config = CalmConfig.from_preset("cpu", **config)
        torch.manual_seed(args.seed)
        self.model = CalmForCausalNeuralModeling(self.config)
        self.model.set_codebook_neighbors(tokens.centroids)
        if training.get("identity_init"):  # calm pretrain's default since this row: the coupling init
            from calm_hf.identity_init import init_identity_embeddings

            train, train_s = data["train"], data["train_session"]
            init_identity_embeddings(self.model, [(train[train_s == s], s * self.num_neurons + np.arange(self.num_neurons))
                                                  for s in np.unique(train_s)])
        if training.get("value_skip_init"):  # calm pretrain's --value_skip_init ridge
            from calm_hf.identity_init import init_value_skip

            init_value_skip(self.model, data["train"])  # (trials, neurons, frames): one trial at a time

    def identity(self, sessions: np.ndarray, neuron_index: torch.Tensor | None = None):
        session_ids = torch.as_tensor(sessions, dtype=torch.long)
        local = neuron_index if neuron_index is not None else torch.arange(self.num_neurons).expand(len(sessions), -1)
        return session_ids[:, None] * self.num_neurons + local, session_ids

    @torch.no_grad()
    def forecast(self, traces: np.ndarray, sessions: np.ndarray, mode: str, batch: int = 30) -> np.ndarray:
        """(trials, neurons, frames) -> forecast of frames CONTEXT: (z units)."""
        model, horizon = self.model.eval(), traces.shape[-1] - CONTEXT
        out = []
        for start in range(0, len(traces), batch):
            part = traces[start : start + batch]
            ids = self.tokens.encode(part[:, :, :CONTEXT])
            neuron_ids, session_ids = self.identity(sessions[start : start + batch])
            identity = {"neuron_ids": neuron_ids, "session_ids": session_ids}
            if mode == "direct":
                if self.config.value_skip_windows > 0:  # the head's highway reads the raw context too
                    identity["context_values"] = torch.as_tensor(part[:, :, :CONTEXT], dtype=torch.float32)
                out.append(model.forecast_values(ids, **identity)[..., :horizon])
                continue
            steps = -(-horizon // WINDOW)
            rolled = model.rollout(ids, steps, mode="soft" if mode == "expected" else "greedy", **identity)
            if mode == "expected":  # conditional mean of every step's window under the predicted code distribution
                windows = rolled.probabilities @ self.tokens.centroids  # (batch, neurons, steps, L)
            else:
                windows = self.tokens.centroids[rolled.codes[..., ids.shape[-1] :]]
            out.append(windows.reshape(*windows.shape[:2], -1)[..., :horizon])
        model.train()
        return torch.cat(out).numpy()

    @torch.no_grad()
    def validation_ce(self, traces: np.ndarray, sessions: np.ndarray, batch: int = 30) -> float:
        model, total, count = self.model.eval(), 0.0, 0
        for start in range(0, len(traces), batch):
            ids = self.tokens.encode(traces[start : start + batch])
            neuron_ids, session_ids = self.identity(sessions[start : start + batch])
            out = model(input_ids=ids, labels=ids, neuron_ids=neuron_ids, session_ids=session_ids, use_cache=False)
            total += float(out.next_token_loss) * ids[:, :, 1:].numel()
            count += ids[:, :, 1:].numel()
        model.train()
        return total / count

    def evaluate(self, modes: list[str]) -> dict:
        from calm_hf.metrics.functional import forecast_pearson_r, mse

        val, val_s = self.data["validation"], self.data["validation_session"]
        if self.args.quick:
            val, val_s = val[:12], val_s[:12]
        truth, result = val[:, :, CONTEXT:], {"next_token_ce": self.validation_ce(val, val_s)}
        for mode in modes:
            pred = self.forecast(val, val_s, mode)
            result[mode] = {"pearson_r": forecast_pearson_r(pred, truth, val_s)["pearson_r"], "mse": mse(pred, truth)}
        return result

    @torch.no_grad()
    def swap_probe(self, trials: int = 60, block: int = 50) -> dict:
        """Own tokens kept, every other neuron's tokens from another trial of the same session."""
        from calm_hf.metrics.functional import forecast_pearson_r, mse

        model = self.model.eval()
        val, val_s = self.data["validation"][:trials], self.data["validation_session"][:trials]
        ids = self.tokens.encode(val)
        neuron_ids, session_ids = self.identity(val_s)
        rng = np.random.default_rng(1)
        partner = np.array([rng.choice(np.flatnonzero((val_s == val_s[i]) & (np.arange(len(val_s)) != i)))
                            for i in range(len(val_s))])
        has_head = self.config.value_head_steps > 0
        horizon = min(val.shape[-1] - CONTEXT, self.config.value_head_steps * WINDOW)
        result = {}
        for label, swapped in (("", False), ("_swapped", True)):
            ce, pred = 0.0, np.zeros((len(val), val.shape[1], horizon), dtype=np.float32)
            for start in range(0, val.shape[1], block):
                keep = slice(start, start + block)
                grid = ids
                if swapped:
                    grid = ids[partner].clone()
                    grid[:, keep] = ids[:, keep]
                out = model(input_ids=grid, neuron_ids=neuron_ids, session_ids=session_ids, use_cache=False,
                            value_inputs=torch.as_tensor(val[..., : ids.shape[-1] * WINDOW], dtype=torch.float32))
                logits = out.logits[:, keep, :-1]
                ce += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, keep, 1:].reshape(-1),
                                            reduction="sum"))
                if has_head:
                    pred[:, keep] = out.value_predictions[:, keep, CONTEXT // WINDOW - 1, :horizon].numpy()
            result["next_token_ce" + label] = ce / ids[:, :, 1:].numel()
            if has_head:
                truth = val[:, :, CONTEXT : CONTEXT + horizon]
                result["pearson_r" + label] = forecast_pearson_r(pred, truth, val_s)["pearson_r"]
                result["mse" + label] = mse(pred, truth)
        model.train()
        return result

    def train(self) -> dict:
        from calm_hf.trainer import augment_training_batch

        args, model = self.args, self.model
        train, train_s = torch.as_tensor(self.data["train"]), self.data["train_session"]
        modes = ["direct"] if self.config.value_head_steps > 0 else ["expected", "greedy"]
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        rng = np.random.default_rng(args.seed)
        budget, curve, step = self.minutes * 60.0, [], 0
        start = last_eval = time.perf_counter()
        eval_seconds = 0.0  # evaluation time is not training time: it is excluded from the budget and the curve
        model.train()
        while (elapsed := time.perf_counter() - start - eval_seconds) < budget:
            index = rng.integers(0, len(train), args.batch)
            chosen = torch.stack([torch.as_tensor(np.sort(rng.permutation(self.num_neurons)[: self.neurons_per_example]))
                                  for _ in index])
            traces = torch.gather(train[index], 1, chosen[:, :, None].expand(-1, -1, train.shape[-1]))
            ids = self.tokens.encode(traces.numpy())
            neuron_ids, session_ids = self.identity(train_s[index], chosen)
            for group in optimizer.param_groups:  # warm-up then cosine to zero at the end of the budget
                group["lr"] = args.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
            values = traces if self.config.value_head_steps > 0 else None
            batch = {"input_ids": ids, "labels": ids, "value_labels": values, "neuron_ids": neuron_ids,
                     "session_ids": session_ids}
            out = model(**augment_training_batch(model, batch)[0])  # scheduled sampling etc. as CalmTrainer does
            optimizer.zero_grad()
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if time.perf_counter() - last_eval >= args.eval_every_seconds:
                eval_start = time.perf_counter()
                point = {"seconds": round(eval_start - start - eval_seconds, 1), "step": step,
                         **self.evaluate(modes[:1])}
                curve.append(point)
                log(f"  {self.name} {point}")
                last_eval = time.perf_counter()
                eval_seconds += last_eval - eval_start
        seconds = time.perf_counter() - start - eval_seconds
        final = self.evaluate(modes)
        log(f"{self.name}: {step} steps in {seconds:.0f} s -> {final}")
        probe = self.swap_probe(12 if args.quick else 60)
        log(f"{self.name}: trial-swap probe {probe}")
        return {"description": self.description, "steps": step, "train_seconds": seconds,
                "tokens_per_second": step * args.batch * self.neurons_per_example * 25 / seconds,
                "parameters": int(model.num_parameters()), "config_overrides": ROWS[self.name][1],
                "neurons_per_example": self.neurons_per_example, "final": final, "curve": curve, "swap_probe": probe}


def headline(row: dict) -> tuple[str, dict]:
    final = row["final"]
    mode = "direct" if "direct" in final else "expected"
    return mode, final[mode]


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# DAT ablations and learning curves (validation split, simulated benchmark)",
        "",
        (f"Same data, same k-means tokens, {results['settings']['minutes']} min of 1-thread fp32 training per row "
         "(the `_long` row: 4x) " if "merged_from" not in results else
         f"Same data, same k-means tokens; rows merged from {len(results['merged_from'])} runs, training minutes of "
         "each row in the last column (1 thread, fp32) ")
        +
        f"(batch {results['settings']['batch']} trials). Forecast: 40 frames of context -> 60 frames. "
        "`python benchmarks/dat_ablations.py` (see its docstring).",
        "",
        "| row | what changed | forecast | val r | val MSE | next-token CE | swap probe: r own -> swapped | steps (train min) |",
        "|---|---|---|---:|---:|---:|---|---:|",
    ]
    for name, line in results["reference_lines"].items():
        kind, forecast = ("trained baseline", "rolled out") if name == "tcn" else ("closed-form baseline", "rolled out")
        lines.append(f"| {name} | {kind}, same training trials | {forecast} | {line['pearson_r']:.3f} | "
                     f"{line['mse']:.3f} | | | |")
    for name, row in results["rows"].items():
        mode, score = headline(row)
        probe = row["swap_probe"]
        swap = (f"{probe['pearson_r']:.3f} -> {probe['pearson_r_swapped']:.3f}" if "pearson_r" in probe else
                f"CE {probe['next_token_ce']:.3f} -> {probe['next_token_ce_swapped']:.3f}")
        extra = ""
        if "greedy" in row["final"]:
            extra = f" (greedy {row['final']['greedy']['pearson_r']:.3f})"
        lines.append(f"| {name} | {row['description']} | {mode}{extra} | {score['pearson_r']:.3f} | {score['mse']:.3f} "
                     f"| {row['final']['next_token_ce']:.3f} | {swap} | {row['steps']} ({row['train_seconds'] / 60:.0f}) |")
    lines += ["", "Learning curves (validation r of the row's headline forecast vs training seconds) are in the JSON "
              "and `dat_ablations.png`."]
    path.write_text("\n".join(lines) + "\n")


def write_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # against wall time and against optimizer steps (steps are immune to a shared, busy core)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, label in zip(axes, ("seconds", "step"), ("training seconds (1 thread, fp32)", "optimizer steps")):
        for name, row in results["rows"].items():
            mode, _ = headline(row)
            points = [(p[key], p[mode]["pearson_r"]) for p in row["curve"] if mode in p]
            points.append((row["train_seconds"] if key == "seconds" else row["steps"], row["final"][mode]["pearson_r"]))
            ax.plot(*zip(*points), marker="o", ms=3, label=name)
        for (name, line), style in zip(results["reference_lines"].items(), ("--", ":", "-.")):
            ax.axhline(line["pearson_r"], color="black", ls=style, lw=1, label=name)
        ax.set_xlabel(label)
    axes[0].set_ylabel("validation forecast Pearson r")
    axes[0].legend(fontsize=7, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help=f"comma list of {list(ROWS)}")
    parser.add_argument("--minutes", type=float, default=8.0, help="training budget per row (wall clock)")
    parser.add_argument("--batch", type=int, default=4, help="trials per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--codes", type=int, default=128)
    parser.add_argument("--eval_every_seconds", type=float, default=120.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="tiny data and models: a seconds-long smoke run")
    parser.add_argument("--tcn_minutes", type=float, default=0.0,
                        help="also train the TCN baseline for this many minutes (a reference line; 0 = skip)")
    parser.add_argument("--merge", default=None,
                        help="comma list of result folders of earlier runs: write one table and figure of all their "
                             "rows to --out (no training)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    unknown = [row for row in args.rows.split(",") if row not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if args.minutes <= 0:
        parser.error(f"--minutes must be positive, got {args.minutes}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.merge:
        return merge_results(args.merge.split(","), Path(args.out))
    torch.set_num_threads(args.threads)
    if args.quick:
        args.minutes, args.eval_every_seconds = min(args.minutes, 0.05), 1.0
    data = load_data(40 if args.quick else 400, args.seed)
    if args.quick:
        data = {k: (v[:, :24] if v.ndim == 3 else v) for k, v in data.items()}
    tokens = KMeansTokens(data["train"], args.codes, args.seed)
    results = {"settings": vars(args), "reference_lines": fit_reference_lines(data, args.tcn_minutes),
               "rows": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.rows.split(","):
        log(f"row {name}: {ROWS[name][0]}")
        results["rows"][name] = Row(name, data, tokens, args).train()
        (out / "dat_ablations.json").write_text(json.dumps(results, indent=1, default=float))  # partial results too
    write_markdown(results, out / "dat_ablations.md")
    write_figure(results, out / "dat_ablations.png")
    log(f"wrote {out}/dat_ablations.{{json,md,png}}")
    return results


def merge_results(folders: list[str], out: Path) -> dict:
    """One table and figure from several runs (e.g. two sizes trained at the same time on different cores); the
    reference lines are the union (the same data and seed give the same closed-form lines)."""
    merged: dict = {"settings": None, "reference_lines": {}, "rows": {}, "merged_from": folders}
    for folder in folders:
        part = json.loads((Path(folder) / "dat_ablations.json").read_text())
        merged["settings"] = merged["settings"] or part["settings"]
        merged["reference_lines"].update(part["reference_lines"])
        for name, row in part["rows"].items():
            merged["rows"][name] = {**row, "minutes": part["settings"]["minutes"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "dat_ablations.json").write_text(json.dumps(merged, indent=1, default=float))
    write_markdown(merged, out / "dat_ablations.md")
    write_figure(merged, out / "dat_ablations.png")
    log(f"merged {folders} -> {out}/dat_ablations.{{json,md,png}}")
    return merged


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
