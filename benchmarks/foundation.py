"""Is calm-base a foundation model? Forecasting recordings it never saw, from k training trials of each.

Held-out sets (none of them in calm-base's pretraining corpus):
- `sim_in`: simulated sessions drawn from the corpus' ranges (`calm_hf.data.corpus.SIMULATION_RANGES`) with seeds
  the corpus never used;
- `sim_out`: simulated sessions drawn OUTSIDE those ranges (`OUT_OF_RANGE`: stronger gain, slower time constants,
  rates of 1.5 and 45 Hz, a slower indicator, more neurons);
- `sim_paper`: the paper's simulation protocol (rate RNN, g = 1.6, 200 neurons);
- `zebrafish`: the Triplett et al. tectum recording (20-s trials);
- `park`: the two Park et al. mice held out of the corpus (`mrcuts27`, `mrcuts28`; 3-s trials).

For every set and every k in {0, 4, 16, 64, all}, the models see the first k trials of a seeded permutation of
each session's training split (nested: the 4 are among the 16), the same validation split (for hyperparameters and
early stopping only), and are scored on the test split:
- CalM: `calm` (zero-shot at k = 0, otherwise the data identity computed from the k trials, no training),
  `calm_adapted` (k > 0: fine-tuned on the k trials, stopped on validation), and at k = all `calm_scratch` (the
  same architecture trained from scratch on the recording for the same time budget as the adaptation);
- baselines fitted on the same k trials: population ridge AR and per-neuron AR (orders and ridge chosen on
  validation), a causal TCN, the training-trial mean; and context-only ones at every k: the last-second mean and a
  per-neuron AR fitted on each trial's own context.

Scores: Pearson r (per neuron over the horizon, then neurons -> trials -> sessions), MSE, 5-95% coverage and CRPS
from quantiles (CalM: its quantile head; point baselines: Gaussian bands of their validation residuals). The
trial-swap probe (other neurons taken from another trial) runs at each k.

    python benchmarks/foundation.py --calm_dir calm-base               # the whole benchmark (hours on 2 cores)
    python benchmarks/foundation.py --calm_dir calm-base --size smoke  # minutes: tiny sets, short budgets

Writes `benchmarks/results/foundation.json` (`{"sets": {set: {k: {model: {"pearson_r", "mse", "coverage_90",
"crps"}}}}, ...}`), `foundation.md` and the k-curve figure `foundation.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
HELDOUT_SEED = 9_000  # seed namespace of the held-out simulated sessions (the corpus draws from its own seed)
K_VALUES = ("0", "4", "16", "64", "all")
LEVELS_90 = (0.05, 0.95)

SIZES = {
    # the full benchmark: every set, every k, TCN fits of 60 s, CalM adaptation of up to 3 minutes
    "full": dict(sim_in=4, sim_out=3, sim_paper=3, sim_trials=48, paper_trials=120, test_trials=60,
                 tcn_seconds=60.0, adapt_seconds=180.0, adapt_max_steps=600, scratch_seconds=180.0,
                 sets=("sim_in", "sim_out", "sim_paper", "zebrafish", "park")),
    # a smoke run of the script itself (tests use it)
    "smoke": dict(sim_in=1, sim_out=1, sim_paper=1, sim_trials=12, paper_trials=12, test_trials=4,
                  tcn_seconds=2.0, adapt_seconds=4.0, adapt_max_steps=4, scratch_seconds=4.0,
                  sets=("sim_in", "sim_paper"), max_neurons=12),
}


def log(message: str) -> None:
    print(f"[foundation {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Held-out sets: each a list of prepared sessions with their context length
# ----------------------------------------------------------------------------------------------------------------------


def simulated_set(name: str, size: dict, seed: int) -> list:
    from calm_hf.data import SimulationConfig, prepare_session, simulate_session
    from calm_hf.data.corpus import draw_simulation_config

    configs = []
    if name in ("sim_in", "sim_out"):
        for index in range(size[name]):
            rng = np.random.default_rng([HELDOUT_SEED + seed, index, name == "sim_out"])
            configs.append(draw_simulation_config(rng, name=f"{name}-{index}", seed=HELDOUT_SEED + 97 * index + seed,
                                                  num_trials=size["sim_trials"], out_of_range=name == "sim_out"))
    else:
        configs = [SimulationConfig(num_trials=size["paper_trials"], num_behavior_channels=0, name=f"paper-{i}",
                                    seed=HELDOUT_SEED + i + seed) for i in range(size["sim_paper"])]
    sessions = []
    for config in configs:
        if size.get("max_neurons"):
            config.num_neurons = min(config.num_neurons, size["max_neurons"])
        sessions.append(prepare_session(simulate_session(config), split_seed=seed))
    return sessions


def real_set(name: str, seed: int) -> list:
    from calm_hf.data import prepare_session
    from calm_hf.data.corpus import real_sessions

    names = ["zebrafish/zf_20151104-f1"] if name == "zebrafish" else ["park/mrcuts27", "park/mrcuts28"]
    return [prepare_session(session, split_seed=seed) for session in real_sessions(names)]


def context_frames(session) -> int:
    """40 frames (8 s) where trials are long enough, else two thirds of the trial in whole token windows."""
    frames = session.num_frames
    if frames >= 60:
        return 40
    return max(session.window_size, (2 * frames // 3) // session.window_size * session.window_size)


def k_subsets(session, seed: int) -> dict[str, np.ndarray]:
    """Nested subsets of the training split: the first k trials of one seeded permutation."""
    order = np.random.default_rng([seed, 17]).permutation(session.splits["train"])
    subsets = {"0": order[:0]}
    for k in K_VALUES[1:-1]:
        if int(k) < len(order):
            subsets[k] = order[: int(k)]
    subsets["all"] = order
    return subsets


# ----------------------------------------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------------------------------------


def scores(pred: np.ndarray, truth: np.ndarray, quantiles: np.ndarray, levels: tuple) -> dict[str, float]:
    from calm_hf.metrics.functional import forecast_pearson_r, mse
    from calm_hf.metrics.probabilistic import interval_coverage, quantile_crps

    lower, upper = levels.index(LEVELS_90[0]), levels.index(LEVELS_90[1])
    return {"pearson_r": float(forecast_pearson_r(pred, truth)["pearson_r"]), "mse": float(mse(pred, truth)),
            "coverage_90": interval_coverage(quantiles[lower], quantiles[upper], truth),
            "crps": quantile_crps(quantiles, levels, truth)}


def pooled(per_session: list[dict]) -> dict[str, float]:
    """Mean over sessions (Pearson r: the session level of the neurons -> trials -> sessions hierarchy)."""
    keys = per_session[0].keys()
    return {key: float(np.nanmean([row[key] for row in per_session])) for key in keys}


# ----------------------------------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------------------------------


def baseline_forecasters(k: str, context: int, size: dict, seed: int) -> dict[str, Any]:
    from calm_hf.baselines import MeanForecaster, PerNeuronARForecaster, RidgeARForecaster, TCNForecaster
    from calm_hf.baselines.context import ContextARForecaster, LastSecondMeanForecaster

    lags = tuple(lag for lag in (1, 2, 4, 8, 16) if lag <= context)
    models: dict[str, Any] = {"last_second_mean": LastSecondMeanForecaster(context=context),
                              "context_ar": ContextARForecaster(context=context)}
    if k != "0":
        models.update({
            "ridge_ar": RidgeARForecaster(context=context, lags_grid=lags),
            "per_neuron_ar": PerNeuronARForecaster(context=context, lags_grid=lags),
            "train_mean": MeanForecaster(context=context),
            "tcn": TCNForecaster(context=context, max_seconds=size["tcn_seconds"], seed=seed, hidden_size=64,
                                 max_val_trials=32),
        })
    return models


def run_baselines(session, train_index: np.ndarray, k: str, size: dict, seed: int, levels: tuple) -> dict:
    from calm_hf.metrics.probabilistic import residual_quantiles, residual_scale

    context = context_frames(session)
    train = session.traces[train_index]
    val = session.split("validation")
    test = session.split("test")[: size["test_trials"]]
    truth = test[:, :, context:]
    out = {}
    for name, model in baseline_forecasters(k, context, size, seed).items():
        try:
            model.fit(train if len(train) else None, val)
        except ValueError as error:  # e.g. a TCN on too few trials: reported, not hidden
            out[name] = {"status": f"not fitted: {error}"}
            continue
        horizon = truth.shape[-1]
        pred = np.asarray(model.predict(test[:, :, :context], horizon), dtype=np.float64)
        val_pred = np.asarray(model.predict(val[:, :, :context], horizon), dtype=np.float64)
        quantiles = residual_quantiles(pred, residual_scale(val_pred, val[:, :, context:]), levels)
        out[name] = scores(pred, truth, quantiles, levels)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# CalM
# ----------------------------------------------------------------------------------------------------------------------


def load_calm(calm_dir: Path):
    from calm_hf import CalmForCausalNeuralModeling, CalmTokenizer
    from calm_hf.forecasting import CalmForecaster

    model = CalmForCausalNeuralModeling.from_pretrained(calm_dir).eval()
    tokenizer = CalmTokenizer.from_pretrained(calm_dir / "tokenizer").eval()
    return CalmForecaster(model, tokenizer)


def calm_scores(forecaster, session, reference: np.ndarray, test: np.ndarray, context: int, levels: tuple) -> dict:
    result = forecaster.forecast(test[:, :, :context], horizon=test.shape[-1] - context,
                                 reference=reference if len(reference) else None, quantile_levels=levels)
    return scores(result.forecast, test[:, :, context:], np.moveaxis(result.quantiles, -1, 0), levels)


def run_calm(forecaster, session, train_index: np.ndarray, k: str, size: dict, seed: int, levels: tuple,
             work: Path) -> tuple[dict, dict]:
    from calm_hf.adaptation import adapt_forecaster, train_from_scratch
    from calm_hf.forecasting import trial_swap_scores

    context = context_frames(session)
    reference = session.traces[train_index]
    test = session.split("test")[: size["test_trials"]]
    val = session.split("validation")
    out = {"calm": calm_scores(forecaster, session, reference, test, context, levels)}
    probe = trial_swap_scores(forecaster, test, context, reference=reference if len(reference) else None)
    if k != "0":
        adapted, info = adapt_forecaster(forecaster, reference, val, context_frames=context,
                                         max_seconds=size["adapt_seconds"], max_steps=size["adapt_max_steps"],
                                         seed=seed)
        out["calm_adapted"] = calm_scores(adapted, session, reference, test, context, levels)
        out["calm_adapted"]["adaptation"] = info
    if k == "all":
        scratch, info = train_from_scratch(forecaster, reference, val, context_frames=context,
                                           max_seconds=size["scratch_seconds"], seed=seed)
        out["calm_scratch"] = calm_scores(scratch, session, reference, test, context, levels)
        out["calm_scratch"]["training"] = info
    return out, probe


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


def run_set(name: str, forecaster, size: dict, seed: int, levels: tuple, work: Path) -> tuple[dict, dict]:
    sessions = real_set(name, seed) if name in ("zebrafish", "park") else simulated_set(name, size, seed)
    per_k: dict[str, dict[str, list]] = {}
    probes: dict[str, list] = {}
    for session in sessions:
        log(f"{name}: session {session.name} ({session.num_neurons} neurons, {session.num_trials} trials of "
            f"{session.num_frames} frames, context {context_frames(session)})")
        for k, index in k_subsets(session, seed).items():
            start = time.perf_counter()
            rows = run_baselines(session, index, k, size, seed, levels)
            if forecaster is not None:
                calm, probe = run_calm(forecaster, session, index, k, size, seed, levels, work)
                rows.update(calm)
                probes.setdefault(k, []).append(probe)
            for model, row in rows.items():
                per_k.setdefault(k, {}).setdefault(model, []).append(row)
            summary = ", ".join(f"{m} {r['pearson_r']:.3f}/{r['mse']:.3f}" for m, r in rows.items() if "mse" in r)
            log(f"  k={k} ({time.perf_counter() - start:.0f} s): {summary}")
    result = {k: {model: pooled([{key: v for key, v in row.items() if isinstance(v, float)} for row in rows])
                  for model, rows in models.items() if all("mse" in row for row in rows)}
              for k, models in per_k.items()}
    probe_result = {k: pooled(rows) for k, rows in probes.items()}
    return result, probe_result


def best_baseline(models: dict, metric: str = "pearson_r") -> tuple[str, dict] | None:
    candidates = {name: row for name, row in models.items() if not name.startswith("calm")
                  and math.isfinite(row.get(metric, float("nan")))}
    if not candidates:
        return None
    name = max(candidates, key=lambda n: candidates[n][metric])
    return name, candidates[name]


def write_markdown(results: dict, path: Path) -> None:
    lines = ["# Foundation benchmark: forecasting recordings calm-base never saw", "",
             f"{results['meta']['date']}, commit {results['meta']['commit']}, {results['meta']['machine']}; "
             f"`{results['meta']['command']}`", "",
             "| set | k | CalM r / MSE | CalM adapted r / MSE | best baseline (by r) r / MSE | best context-only MSE | "
             "CalM 5-95% coverage | CalM CRPS | best baseline CRPS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, per_k in results["sets"].items():
        for k, models in per_k.items():
            calm, adapted = models.get("calm"), models.get("calm_adapted")
            best = best_baseline({m: r for m, r in models.items() if m not in ("last_second_mean", "context_ar")}
                                 or models) if k != "0" else best_baseline(models)
            context_mse = min(models[m]["mse"] for m in ("last_second_mean", "context_ar") if m in models)
            crps = min(r["crps"] for m, r in models.items() if not m.startswith("calm"))

            def pair(row):
                return "–" if row is None else f"{row['pearson_r']:.3f} / {row['mse']:.3f}"

            lines.append(f"| {name} | {k} | {pair(calm)} | {pair(adapted)} | "
                         f"{'–' if best is None else best[0] + ' ' + pair(best[1])} | {context_mse:.3f} | "
                         f"{'–' if calm is None else format(calm['coverage_90'], '.2f')} | "
                         f"{'–' if calm is None else format(calm['crps'], '.3f')} | {crps:.3f} |")
    lines += ["", "Trial-swap probe (CalM r with the true population -> with the other neurons from another trial):", ""]
    for name, per_k in results.get("probe", {}).items():
        lines.append(f"- {name}: " + ", ".join(f"k={k} {row['pearson_r']:.3f} -> {row['pearson_r_swapped']:.3f}"
                                                for k, row in per_k.items()))
    path.write_text("\n".join(lines) + "\n")


def write_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["sets"])
    fig, axes = plt.subplots(2, len(sets), figsize=(3.2 * len(sets), 5.6), squeeze=False)
    styles = {"calm": ("C0", "-", "CalM (in context)"), "calm_adapted": ("C0", "--", "CalM adapted"),
              "ridge_ar": ("C1", "-", "ridge AR"), "per_neuron_ar": ("C2", "-", "per-neuron AR"),
              "tcn": ("C3", "-", "TCN"), "last_second_mean": ("C7", ":", "last-second mean"),
              "context_ar": ("C8", ":", "context AR"), "train_mean": ("C5", "-", "training-trial mean")}
    for column, name in enumerate(sets):
        per_k = results["sets"][name]
        ks = list(per_k)
        for row, metric in enumerate(("pearson_r", "mse")):
            axis = axes[row, column]
            for model, (color, style, label) in styles.items():
                xs = [i for i, k in enumerate(ks) if model in per_k[k]]
                ys = [per_k[ks[i]][model][metric] for i in xs]
                if any(math.isfinite(y) for y in ys):
                    axis.plot(xs, ys, color=color, linestyle=style, marker="o", markersize=3, label=label)
            axis.set_xticks(range(len(ks)), ks)
            axis.set_title(name if row == 0 else "")
            axis.set_xlabel("training trials k" if row == 1 else "")
            axis.set_ylabel({"pearson_r": "forecast r", "mse": "MSE (z units)"}[metric] if column == 0 else "")
    axes[0, -1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calm_dir", type=Path, default=None, help="calm-base folder (without it: baselines only).")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--sets", default=None, help="Comma-separated subset of the size's sets.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "foundation.json")
    parser.add_argument("--work", type=Path, default=Path(".foundation-work"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    import subprocess

    import torch

    from calm_hf.metrics.probabilistic import CRPS_LEVELS

    args = parse_args(argv)
    size = SIZES[args.size]
    sets = args.sets.split(",") if args.sets else list(size["sets"])
    torch.manual_seed(args.seed)
    forecaster = load_calm(args.calm_dir) if args.calm_dir else None
    levels = CRPS_LEVELS
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    results: dict[str, Any] = {"sets": {}, "probe": {}, "meta": {
        "date": time.strftime("%Y-%m-%d"), "commit": commit, "command": " ".join(["python", *sys.argv]),
        "machine": f"{torch.get_num_threads()} threads", "size": args.size, "quantile_levels": list(levels),
        "calm_dir": str(args.calm_dir) if args.calm_dir else None}}
    start = time.perf_counter()
    for name in sets:
        results["sets"][name], results["probe"][name] = run_set(name, forecaster, size, args.seed, levels, args.work)
    results["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=1))
    write_markdown(results, args.output.with_suffix(".md"))
    write_figure(results, args.output.with_suffix(".png"))
    log(f"wrote {args.output} ({results['meta']['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
