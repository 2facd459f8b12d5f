"""Is calm-base a foundation model? Forecasting recordings it never saw, from k training trials of each.

Every held-out set of `calm_hf.heldout` (`sim_in`, `sim_out` drawn outside the corpus' ranges, `sim_paper`,
`zebrafish`, `park`), every k in {0, 4, 16, 64, all}: the models see the first k trials of one seeded permutation of each
session's training split (nested), the session's validation split for hyperparameters and early stopping only, and
are scored on its test split.

- `calm`: calm-base as it is: zero-shot at k = 0, else its neurons' identity computed from the k trials, as much of it
  read as forecasts best on a split of them (`CalmForecaster.reference_identity`; no training);
- `calm_adapted` (k > 0): calm-base fine-tuned on the k trials (`calm_hf.adaptation.adapt`, stopped on validation);
- `calm_readout` (k > 0): the adapted model with its population readout (`calm_hf.population_readout`: a ridge AR
  across the recording's neurons and a per-neuron AR fitted on the k trials, mixed with the network by weights chosen
  on validation) --
  what `calm adapt` saves;
- `calm_scratch` (k = all): the same architecture trained from scratch on the recording for the same budget as the
  adaptation (`train_from_scratch`) -- what pretraining buys;
- baselines fitted on the same k trials: population ridge AR, per-neuron AR (orders and ridge on validation), a
  causal TCN, the training-trial mean; context-only at every k: the last-second mean and a per-trial context AR.

Scores: Pearson r (per neuron over the horizon, then neurons -> trials -> sessions), MSE, 5-95% coverage and CRPS from
quantiles (CalM: its quantile head; point baselines: Gaussian bands of their validation residuals); the trial-swap
probe of `calm` at each k.

    python benchmarks/foundation.py --calm_dir calm-base               # the whole benchmark (about 2 h on 2 cores)
    python benchmarks/foundation.py --calm_dir calm-base --size smoke  # minutes: small sets, short budgets
    python benchmarks/foundation.py --calm_dir calm-base --size quick --sets sim_out --output a.json  # one set
    python benchmarks/foundation.py --merge a.json b.json --output benchmarks/results/foundation.json

Writes `benchmarks/results/foundation.json` (`{"sets": {set: {k: {model: {"pearson_r", "mse", "coverage_90",
"crps"}}}}, "probe": ..., "adaptation": ..., "meta": ...}`), `foundation.md` and the k-curve figure `foundation.png`.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

SIZES = {
    # the whole benchmark: every set and k; the TCN, the adaptation and training from scratch are capped by epochs and
    # steps (not seconds), so a busy machine changes how long it takes, not what it measures; adapt_steps None: the
    # step cap of `calm adapt`'s recipe (AdaptationSettings.max_steps), so the benchmark measures what users run
    "full": dict(sessions=2, trials=48, paper_trials=120, test_trials=60, tcn_seconds=3600.0, adapt_seconds=3600.0,
                 adapt_steps=None, max_neurons=None, ks=("0", "4", "16", "64", "all"),
                 sets=("sim_in", "sim_out", "sim_paper", "zebrafish", "park")),
    # an exploratory run: two sessions per simulated set, fewer test trials and k values, a shorter TCN budget; the
    # adaptation and training from scratch are capped by steps like the whole benchmark's (the recipe's cap), so a
    # busy machine changes how long it takes, not what it measures
    "quick": dict(sessions=2, trials=48, paper_trials=120, test_trials=40, tcn_seconds=30.0, adapt_seconds=3600.0,
                  adapt_steps=None, max_neurons=None, ks=("0", "4", "16", "all"),
                  sets=("sim_in", "sim_out", "sim_paper", "zebrafish", "park")),
    # a smoke run of the script itself (the tests run it)
    "smoke": dict(sessions=1, trials=12, paper_trials=12, test_trials=4, tcn_seconds=1.0, adapt_seconds=3.0,
                  adapt_steps=4, max_neurons=10, ks=("0", "4", "all"), sets=("sim_in", "sim_paper")),
}


def log(message: str) -> None:
    print(f"[foundation {time.strftime('%H:%M:%S')}] {message}", flush=True)


def adaptation_steps(size: dict) -> int:
    """The step cap of the size's adaptation and training from scratch: its own, or `calm adapt`'s recipe's."""
    from calm_hf.adaptation import AdaptationSettings

    return size["adapt_steps"] or AdaptationSettings.max_steps


def adaptation_rows(forecaster, size: dict, seed: int, record: dict):
    """The `extra` rows of `evaluate_heldout`: calm_adapted at k > 0, calm_scratch at k = all; the training logs go
    into `record`."""
    from calm_hf.adaptation import (SCRATCH_LEARNING_RATE, AdaptationSettings, adapt, fit_population_readout,
                                    train_from_scratch)
    from calm_hf.heldout import calm_scores, context_frames, swap_probe_scores

    steps = adaptation_steps(size)

    def rows(session, index, k) -> dict[str, dict]:
        out = {}
        context = context_frames(session)
        identity, choice = (forecaster.reference_identity(session.traces[index], context, session.num_frames - context)
                            if len(index) else (None, None))
        probe = swap_probe_scores(forecaster, session, index, size["test_trials"], seed, identity=identity)
        record.setdefault("probe", {}).setdefault(k, []).append(probe)
        if k == "0" or len(index) < 2:
            return out
        record.setdefault("reference_identity", {}).setdefault(k, []).append({"session": session.name, **choice})
        train, val = session.traces[index], session.split("validation")
        settings = AdaptationSettings(max_seconds=size["adapt_seconds"], max_steps=steps, seed=seed)
        adapted, info = adapt(forecaster, train, val, context, settings)
        out["calm_adapted"] = calm_scores(adapted, session, index, size["test_trials"])
        record.setdefault("adaptation", {}).setdefault(k, []).append({"session": session.name, **info})
        adapted.population_readout = fit_population_readout(adapted, train, val, context)
        out["calm_readout"] = calm_scores(adapted, session, index, size["test_trials"])
        record.setdefault("readout", {}).setdefault(k, []).append({"session": session.name,
                                                                   **adapted.population_readout.info})
        if k == "all":
            scratch_settings = AdaptationSettings(max_seconds=size["adapt_seconds"], max_steps=steps,
                                                  learning_rate=SCRATCH_LEARNING_RATE, seed=seed)
            scratch, info = train_from_scratch(forecaster, train, val, context, scratch_settings)
            out["calm_scratch"] = calm_scores(scratch, session, index, size["test_trials"])
            record.setdefault("scratch", []).append({"session": session.name, **info})
        return out

    return rows


def write_markdown(results: dict, path: Path) -> None:
    from calm_hf.heldout import best_baseline

    meta = results["meta"]
    lines = ["# Foundation benchmark: forecasting recordings calm-base never saw", "",
             f"{meta['date']}, commit {meta['commit']}, {meta['machine']}, {meta['seconds'] / 60:.0f} min; "
             f"`{meta['command']}`", "",
             "k training trials of each held-out recording (k = 0: the context only). CalM: zero-shot / identity from "
             "the k trials; adapted: fine-tuned on them (validation early stopping). Baselines fitted on the same "
             "trials, hyperparameters on validation. r / MSE in z units; coverage of the 5-95% band; CRPS.", "",
             "| set | k | CalM r / MSE | CalM adapted r / MSE | CalM adapted + readout r / MSE | "
             "best baseline by r (r / MSE) | lowest baseline MSE | CalM coverage | CalM CRPS | best baseline CRPS |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def pair(row):
        return "–" if row is None else f"{row['pearson_r']:.3f} / {row['mse']:.3f}"

    for name, cells in results["sets"].items():
        for k, models in cells.items():
            best, lowest, crps = best_baseline(models), best_baseline(models, "mse"), best_baseline(models, "crps")
            calm = models.get("calm")
            lines.append(
                f"| {name} | {k} | {pair(calm)} | {pair(models.get('calm_adapted'))} | "
                f"{pair(models.get('calm_readout'))} | "
                f"{'–' if best is None else best[0] + ' ' + pair(best[1])} | "
                f"{'–' if lowest is None else lowest[0] + ' ' + format(lowest[1]['mse'], '.3f')} | "
                f"{'–' if calm is None else format(calm['coverage_90'], '.2f')} | "
                f"{'–' if calm is None else format(calm['crps'], '.3f')} | "
                f"{'–' if crps is None else crps[0] + ' ' + format(crps[1]['crps'], '.3f')} |")
    scratch = {name: cells["all"] for name, cells in results["sets"].items() if "calm_scratch" in cells.get("all", {})}
    if scratch:
        lines += ["", "Transfer at k = all (same budget): calm-base adapted vs the same model trained from scratch:", ""]
        lines += [f"- {name}: adapted {pair(models.get('calm_adapted'))}, scratch {pair(models['calm_scratch'])}"
                  for name, models in scratch.items()]
    for key, title in (("reference_identity", "Identity calm-base read from the k trials, chosen on a split of them "
                        "(per session; `CalmForecaster.reference_identity`):"),
                       ("adaptation", "Identity read after adaptation's choice on validation trials (per session; "
                        "`calm_hf.adaptation.choose_identity`):")):
        choices = {name: {k: [str((row.get("identity", {}) if key == "adaptation" else row).get("chosen"))
                              for row in rows] for k, rows in cells.items()}
                   for name, cells in results.get(key, {}).items()}
        if any(chosen for cells in choices.values() for chosen in cells.values()):
            lines += ["", title, ""]
            lines += [f"- {name}: " + ", ".join(f"k={k} {' / '.join(chosen)}" for k, chosen in cells.items() if chosen)
                      for name, cells in choices.items() if any(cells.values())]
    lines += ["", "Trial-swap probe (CalM r with the true population -> with the other neurons from another trial):", ""]
    for name, cells in results.get("probe", {}).items():
        lines.append(f"- {name}: " + ", ".join(f"k={k} {row['pearson_r']:.3f} -> {row['pearson_r_swapped']:.3f}"
                                                for k, row in cells.items() if row))
    path.write_text("\n".join(lines) + "\n")


def write_figure(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["sets"])
    fig, axes = plt.subplots(2, len(sets), figsize=(3.2 * len(sets), 5.6), squeeze=False)
    styles = {"calm": ("C0", "-", "CalM (identity from k trials)"), "calm_adapted": ("C0", "--", "CalM adapted"),
              "calm_readout": ("C4", "-", "CalM adapted + readout"),
              "ridge_ar": ("C1", "-", "ridge AR"), "per_neuron_ar": ("C2", "-", "per-neuron AR"),
              "tcn": ("C3", "-", "TCN"), "last_second_mean": ("C7", ":", "last-second mean"),
              "context_ar": ("C8", ":", "context AR"), "train_mean": ("C5", "-", "training-trial mean")}
    for column, name in enumerate(sets):
        cells = results["sets"][name]
        ks = list(cells)
        for row, metric in enumerate(("pearson_r", "mse")):
            axis = axes[row, column]
            for model, (color, style, label) in styles.items():
                xs = [i for i, k in enumerate(ks) if model in cells[k]]
                ys = [cells[ks[i]][model][metric] for i in xs]
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
    parser.add_argument("--ks", default=None, help="Comma-separated subset of the size's k values (e.g. 0,4,16).")
    parser.add_argument("--sessions", type=int, default=None, help="Simulated sessions per set (default: the size's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS / "foundation.json")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="Instead of running: merge result files of runs over different sets (same size) into "
                             "--output, with its table and figure.")
    return parser.parse_args(argv)


def merge_results(paths: list[Path]) -> dict:
    """One result file from runs over disjoint sets (e.g. a long set run in its own process): every set's cells and
    records, and a meta that names every run (commits, commands, the longest wall-clock time, the summed one)."""
    from calm_hf.heldout import SETS

    runs = [json.loads(path.read_text()) for path in paths]
    seen: dict[str, Path] = {}
    for path, run in zip(paths, runs):
        for name in run["sets"]:
            if name in seen:
                raise SystemExit(f"set {name} is in both {seen[name]} and {path}: merge runs over different sets.")
            seen[name] = path
    if len({run["meta"]["size"] for run in runs}) > 1:
        raise SystemExit(f"the runs have different sizes {[run['meta']['size'] for run in runs]}: merge runs of one size.")
    order = sorted(seen, key=lambda name: SETS.index(name) if name in SETS else len(SETS))
    owner = {name: runs[[str(p) for p in paths].index(str(seen[name]))] for name in order}
    merged: dict[str, Any] = {key: {name: owner[name].get(key, {}).get(name, {}) for name in order}
                              for key in ("sets", "probe", "reference_identity", "adaptation", "readout", "scratch")}
    metas = [run["meta"] for run in runs]
    commits = sorted({meta["commit"] for meta in metas})
    merged["meta"] = {"date": max(meta["date"] for meta in metas), "commit": "+".join(commits),
                      "command": " ; ".join(meta["command"] for meta in metas),
                      "machine": metas[0]["machine"] + f", {len(runs)} runs merged (run side by side)", "size": metas[0]["size"],
                      "seconds": max(meta["seconds"] for meta in metas),
                      "summed_seconds": round(sum(meta["seconds"] for meta in metas), 1),
                      "sessions": {name: owner[name]["meta"]["sessions"][name] for name in order},
                      "runs": metas}
    return merged


def write_results(results: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1, default=float))
    write_markdown(results, output.with_suffix(".md"))
    write_figure(results, output.with_suffix(".png"))


def main(argv: list[str] | None = None) -> dict:
    import torch

    from calm_hf import CalmForCausalNeuralModeling, CalmTokenizer
    from calm_hf.forecasting import CalmForecaster
    from calm_hf.heldout import evaluate_heldout, heldout_set, pooled

    warnings.filterwarnings("ignore", message="Mean of empty slice")  # a constant forecast's r is NaN, by design
    args = parse_args(argv)
    if args.merge:
        results = merge_results(args.merge)
        write_results(results, args.output)
        log(f"wrote {args.output} from {len(args.merge)} runs")
        return results
    size = dict(SIZES[args.size])
    if args.ks:
        unknown = [k for k in args.ks.split(",") if k not in size["ks"]]
        if unknown:
            raise SystemExit(f"--ks {args.ks}: {unknown} not among the {args.size} size's k values {size['ks']}.")
        size["ks"] = tuple(args.ks.split(","))
    if args.sessions is not None:
        size["sessions"] = args.sessions
    sets = args.sets.split(",") if args.sets else list(size["sets"])
    torch.manual_seed(args.seed)
    forecaster = None
    if args.calm_dir is not None:
        model = CalmForCausalNeuralModeling.from_pretrained(args.calm_dir).eval()
        forecaster = CalmForecaster(model, CalmTokenizer.from_pretrained(args.calm_dir / "tokenizer").eval())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    record: dict[str, Any] = {}
    start = time.perf_counter()
    found = {name: heldout_set(name, sessions=size["sessions"], trials=size["trials"],
                               paper_trials=size["paper_trials"], seed=args.seed, max_neurons=size["max_neurons"])
             for name in sets}
    extra = adaptation_rows(forecaster, size, args.seed, record) if forecaster is not None else None
    results: dict[str, Any] = {"sets": {}, "probe": {}, "reference_identity": {}, "adaptation": {}, "readout": {},
                               "scratch": {}}
    for name, sessions in found.items():
        record.clear()
        log(f"{name}: {len(sessions)} session(s), " + ", ".join(
            f"{s.name} ({s.num_neurons} neurons, {s.num_trials} trials of {s.num_frames} frames)" for s in sessions))
        results["sets"].update(evaluate_heldout(forecaster, {name: sessions}, ks=size["ks"],
                                                test_trials=size["test_trials"], tcn_seconds=size["tcn_seconds"],
                                                seed=args.seed, extra=extra, log=log))
        results["probe"][name] = {k: pooled(rows) for k, rows in record.get("probe", {}).items() if rows and rows[0]}
        results["reference_identity"][name] = record.get("reference_identity", {})
        results["adaptation"][name] = record.get("adaptation", {})
        results["readout"][name] = record.get("readout", {})
        results["scratch"][name] = record.get("scratch", [])
    results["meta"] = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "command": " ".join(["python", *sys.argv]),
                       "machine": f"{torch.get_num_threads()} threads", "size": args.size,
                       "ks": list(size["ks"]), "sessions_per_set": size["sessions"],
                       "calm_dir": None if args.calm_dir is None else str(args.calm_dir),
                       "seconds": round(time.perf_counter() - start, 1),
                       "sessions": {name: [s.name for s in sessions] for name, sessions in found.items()}}
    write_results(results, args.output)
    log(f"wrote {args.output} ({results['meta']['seconds'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
