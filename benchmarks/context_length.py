"""How many token steps of context a forecast should read: forecast accuracy against context length.

A forecast reads the last `c` token steps before its first frame. `max_token_steps` bounds `c`, but a model is only
trained on examples as long as its pretraining trials; past that, its time attention meets distances it never saw.
This runs a checkpoint, unchanged, on long held-out trials (`--trial_seconds`, default 56 s) of the sets of
`calm_hf.heldout` (simulated sets redrawn with long trials; zebrafish cut into long windows; Park's trials are 3 s, too
short, so it is left out) and forecasts the same `--horizon` frames after every context length in `--steps`, with the
neuron identity from 16 training trials (k = 16) and zero-shot (k = 0). Scored on each session's **validation**
split (where the default is chosen) and its **test** split (reported).

Choice rule (fixed before the run): the context length with the highest validation r averaged over sets and k; among
lengths within `TIE_R` of it, the shortest (cheaper in time and memory).

    python benchmarks/context_length.py --calm_dir calm-base                     # about 20 min on 2 cores
    python benchmarks/context_length.py --calm_dir calm-base --sets sim_paper --steps 6,10 --trials 4   # smoke run

Writes `benchmarks/results/context_length.{json,md}`: `{"rows": [{"set", "session", "neurons", "k", "split",
"steps", "pearson_r", "mse", "coverage_90", "crps", "seconds"}], "choice": {...}, "meta": {...}}`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
TIE_R = 0.003  # validation r within this of the best counts as a tie; the shortest tied length is chosen
SETS = ("sim_in", "sim_out", "sim_paper", "zebrafish")


def log(message: str) -> None:
    print(f"[context_length {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calm_dir", type=Path, help="a calm-base checkpoint (with tokenizer/)")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--steps", default="6,10,16,20,25,32,40,51", help="context lengths in token steps")
    parser.add_argument("--horizon", type=int, default=50, help="forecast frames at the model rate (10 s at 5 Hz)")
    parser.add_argument("--trial_seconds", type=float, default=56.0, help="length of the long held-out trials")
    parser.add_argument("--sessions", type=int, default=2, help="sessions per simulated set")
    parser.add_argument("--trials", type=int, default=20, help="validation and test trials scored per session")
    parser.add_argument("--max_neurons", type=int, default=512, help="neurons kept per simulated session")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data_dir", default=None, help="the shared data folder (default: CALM_DATA_DIR)")
    parser.add_argument("--rechoose", type=Path, help="only re-apply the choice rule to a results JSON")
    parser.add_argument("--output", type=Path, default=RESULTS / "context_length.json")
    return parser.parse_args(argv)


def long_sessions(name: str, args: argparse.Namespace) -> list:
    """Held-out set `name` with `--trial_seconds` trials: the same draws as `calm_hf.heldout.heldout_set`."""
    from calm_hf.data import SimulationConfig, prepare_session, simulate_session
    from calm_hf.data.corpus import draw_simulation_config, real_sessions
    from calm_hf.heldout import HELDOUT_SEED, REAL_SETS

    if name in REAL_SETS:
        return [prepare_session(session, split_seed=args.seed)
                for session in real_sessions(REAL_SETS[name], args.data_dir, trial_seconds=args.trial_seconds)]
    if name in ("sim_in", "sim_out"):
        configs = [draw_simulation_config(np.random.default_rng([HELDOUT_SEED + args.seed, index, name == "sim_out"]),
                                          name=f"{name}-{index}", seed=HELDOUT_SEED + 97 * index + args.seed,
                                          num_trials=48, trial_seconds=args.trial_seconds,
                                          out_of_range=name == "sim_out")
                   for index in range(args.sessions)]
    else:
        configs = [SimulationConfig(num_trials=60, num_steps=int(round(args.trial_seconds * 5)), num_behavior_channels=0,
                                    name=f"paper-{index}", seed=HELDOUT_SEED + index + args.seed)
                   for index in range(args.sessions)]
    for config in configs:
        config.num_neurons = min(config.num_neurons, args.max_neurons)
    return [prepare_session(simulate_session(config), split_seed=args.seed) for config in configs]


def session_rows(forecaster, session, set_name: str, steps: list[int], args: argparse.Namespace) -> list[dict]:
    from calm_hf.heldout import k_subsets, scores

    window = forecaster.window_size
    start = session.num_frames - args.horizon  # every context length forecasts the same frames
    usable = [c for c in steps if c * window <= start]
    if len(usable) < len(steps):
        log(f"{session.name}: {session.num_frames} frames hold at most {start // window} context steps")
    references = {"0": None, "16": session.traces[k_subsets(session, args.seed, ks=("16",))["16"]]}
    rows = []
    for split in ("validation", "test"):
        data = session.split(split)[: args.trials]
        truth = data[:, :, start : start + args.horizon]
        for k, reference in references.items():
            identity = forecaster.neuron_identity(reference, num_neurons=session.num_neurons)
            for c in usable:
                begin = time.perf_counter()
                result = forecaster.forecast(data[:, :, start - c * window : start], horizon=args.horizon,
                                             neuron_identity=identity)
                seconds = time.perf_counter() - begin
                row = scores(result.forecast, truth, np.moveaxis(result.quantiles, -1, 0))
                rows.append({"set": set_name, "session": session.name, "neurons": session.num_neurons, "k": k,
                             "split": split, "steps": c, **row, "seconds": round(seconds, 3)})
    return rows


def mean_r(rows: list[dict], steps: int, split: str) -> float:
    """Validation (or test) r at `steps`, averaged over sessions within a set, then over sets and k."""
    per_set: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if row["steps"] == steps and row["split"] == split:
            per_set.setdefault((row["set"], row["k"]), []).append(row["pearson_r"])
    return float(np.mean([np.mean(values) for values in per_set.values()])) if per_set else float("nan")


def choose_steps(rows: list[dict]) -> dict:
    """The shortest context within `TIE_R` of the best mean validation r (over sets and k)."""
    lengths = sorted({row["steps"] for row in rows})
    validation = {c: mean_r(rows, c, "validation") for c in lengths}
    best = max(validation.values())
    chosen = min(c for c, r in validation.items() if r >= best - TIE_R)
    return {"steps": chosen, "rule": f"shortest context with mean validation r within {TIE_R} of the best",
            "validation_r": {str(c): r for c, r in validation.items()},
            "test_r": {str(c): mean_r(rows, c, "test") for c in lengths}}


def markdown(result: dict) -> str:
    meta = result["meta"]
    lengths = sorted({row["steps"] for row in result["rows"]})
    lines = ["# Forecast accuracy against context length", "",
             f"`{meta['command']}` at `{meta['commit']}`, {meta['date']}, {meta['seconds'] / 60:.0f} min. "
             f"The checkpoint unchanged; {meta['trial_seconds']:g}-s held-out trials, the same {meta['horizon']} "
             "frames forecast after each context length (token steps); r / MSE / 5-95% coverage, mean over the "
             "sessions of each set; k = 0 zero-shot identity, k = 16 identity from 16 training trials.", ""]
    for split in ("validation", "test"):
        lines += [f"## {split.capitalize()} split", "",
                  "| set | neurons | k | " + " | ".join(f"{c} steps" for c in lengths) + " |",
                  "|---|---:|---|" + "---|" * len(lengths)]
        keys = sorted({(row["set"], row["k"]) for row in result["rows"]}, key=lambda key: (key[0], int(key[1])))
        for set_name, k in keys:
            selected = [r for r in result["rows"] if r["set"] == set_name and r["k"] == k and r["split"] == split]
            cells = []
            for c in lengths:
                chosen = [r for r in selected if r["steps"] == c]
                if not chosen:
                    cells.append("")
                    continue
                mean = {key: np.mean([r[key] for r in chosen]) for key in ("pearson_r", "mse", "coverage_90")}
                cells.append(f"{mean['pearson_r']:.3f} / {mean['mse']:.3f} / {mean['coverage_90']:.2f}")
            neurons = ", ".join(str(n) for n in sorted({r["neurons"] for r in selected}))
            lines.append(f"| {set_name} | {neurons} | {k} | " + " | ".join(cells) + " |")
        lines.append("")
    choice = result["choice"]
    lines += ["## Choice (validation split)", "", f"Rule: {choice['rule']}. Chosen: **{choice['steps']} steps**.", "",
              "| steps | mean validation r | mean test r |", "|---:|---:|---:|"]
    for c in lengths:
        lines.append(f"| {c} | {choice['validation_r'][str(c)]:.4f} | {choice['test_r'][str(c)]:.4f} |")
    return "\n".join(lines) + "\n"


def write(result: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    output.with_suffix(".md").write_text(markdown(result))
    log(f"wrote {output} and {output.with_suffix('.md')}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.rechoose:
        result = json.loads(args.rechoose.read_text())
        result["choice"] = choose_steps(result["rows"])
        write(result, args.output)
        return result
    if args.calm_dir is None:
        raise SystemExit("--calm_dir is required (a calm-base checkpoint folder).")
    import torch

    from calm_hf import CalmForCausalNeuralModeling, CalmTokenizer
    from calm_hf.forecasting import CalmForecaster

    torch.manual_seed(args.seed)
    model = CalmForCausalNeuralModeling.from_pretrained(args.calm_dir).eval()
    forecaster = CalmForecaster(model, CalmTokenizer.from_pretrained(args.calm_dir / "tokenizer").eval())
    steps = [int(c) for c in args.steps.split(",")]
    longest = model.config.max_token_steps - (-(-args.horizon // forecaster.window_size))  # context + new steps
    steps = [c for c in steps if c <= longest] or [longest]
    began = time.perf_counter()
    rows = []
    for set_name in args.sets.split(","):
        try:
            sessions = long_sessions(set_name, args)
        except FileNotFoundError as error:
            log(f"{set_name} skipped: {error}")
            continue
        for session in sessions:
            log(f"{set_name}/{session.name}: {session.num_neurons} neurons, {session.num_frames} frames")
            rows += session_rows(forecaster, session, set_name, steps, args)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"rows": rows, "choice": choose_steps(rows),
              "meta": {"command": "python benchmarks/context_length.py " + " ".join(sys.argv[1:] if argv is None
                                                                                    else argv),
                       "commit": commit, "date": time.strftime("%Y-%m-%d"), "seconds": time.perf_counter() - began,
                       "horizon": args.horizon, "trial_seconds": args.trial_seconds,
                       "max_token_steps": model.config.max_token_steps}}
    write(result, args.output)
    return result


if __name__ == "__main__":
    main()
