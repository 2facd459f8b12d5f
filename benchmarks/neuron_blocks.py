"""Neuron-axis attention within blocks: what it costs in forecast accuracy, against attention over all neurons.

`config.neuron_attention_block = b` makes every neuron attend only to its contiguous group of at most `b` neurons
(cost linear in neurons); the linear mixers still read the whole population. This runs calm-base, unchanged
otherwise, on the held-out sets of `calm_hf.heldout` with b in `--blocks` and with full attention, k = 0 (zero-shot)
and k = 16 (identity from 16 training trials, no training), scored on each session's **validation** split (where the
default block is chosen: the largest with no measurable cost that is not wider than a pretraining example) and on its
**test** split (reported). A block at or above a session's neuron count is
full attention there (tested), so it is not run again. sim_out's sessions hold 1,024-1,500 neurons, sim_in's 16-1,024.

    python benchmarks/neuron_blocks.py --calm_dir calm-base                        # about 40 min on 2 cores
    python benchmarks/neuron_blocks.py --calm_dir calm-base --sets sim_paper --blocks 64 --trials 4   # a smoke run

Writes `benchmarks/results/neuron_blocks.{json,md}`: `{"rows": [{"set", "session", "neurons", "k", "split", "block",
"pearson_r", "mse", "coverage_90", "crps", "seconds"}], "choice": {...}, "meta": {...}}`.
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
# a block is acceptable when its validation r is within this of full attention's on every set (the bar) and
# within half of it pooled; the largest acceptable block up to a pretraining example's width is chosen over sets
MAX_R_DROP = 0.01


def log(message: str) -> None:
    print(f"[neuron_blocks {time.strftime('%H:%M:%S')}] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calm_dir", type=Path, required=True, help="a calm-base checkpoint (with tokenizer/)")
    parser.add_argument("--sets", default="sim_in,sim_out,sim_paper,zebrafish,park")
    parser.add_argument("--blocks", default="512,256,128,64", help="block sizes to compare with full attention")
    parser.add_argument("--sessions", type=int, default=2, help="sessions per simulated set")
    parser.add_argument("--trials", type=int, default=20, help="validation and test trials scored per session")
    parser.add_argument("--trained_neurons", type=int, default=64,
                        help="neurons per pretraining example of the checkpoint (the main job's --max_neurons)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rechoose", type=Path, help="only re-apply the choice rule to a results JSON")
    parser.add_argument("--output", type=Path, default=RESULTS / "neuron_blocks.json")
    return parser.parse_args(argv)


def session_rows(forecaster, session, set_name: str, blocks: list[int], trials: int, seed: int) -> list[dict]:
    from calm_hf.heldout import context_frames, k_subsets, scores

    context = context_frames(session)
    references = {"0": None, "16": session.traces[k_subsets(session, seed, ks=("16",))["16"]]}
    rows = []
    for split in ("validation", "test"):
        data = session.split(split)[:trials]
        for k, reference in references.items():
            for block in [None, *[b for b in blocks if b < session.num_neurons]]:
                forecaster.model.config.neuron_attention_block = block
                start = time.perf_counter()
                result = forecaster.forecast(data[:, :, :context], horizon=data.shape[-1] - context,
                                             reference=reference)
                seconds = time.perf_counter() - start
                row = scores(result.forecast, data[:, :, context:], np.moveaxis(result.quantiles, -1, 0))
                rows.append({"set": set_name, "session": session.name, "neurons": session.num_neurons, "k": k,
                             "split": split, "block": block, **row, "seconds": round(seconds, 3)})
    forecaster.model.config.neuron_attention_block = None
    return rows


def pooled_drop(rows: list[dict], block: int, split: str) -> dict[str, float]:
    """Per set (sessions and k pooled), full attention's r minus the block's, over the sessions the block splits."""
    drops: dict[str, list[float]] = {}
    for row in rows:
        if row["block"] != block or row["split"] != split:
            continue
        full = next(r for r in rows if r["block"] is None and r["split"] == split and r["session"] == row["session"]
                    and r["k"] == row["k"] and r["set"] == row["set"])
        drops.setdefault(row["set"], []).append(full["pearson_r"] - row["pearson_r"])
    return {name: float(np.mean(values)) for name, values in drops.items()}


def choose_block(rows: list[dict], blocks: list[int], trained_neurons: int) -> dict:
    """Acceptable blocks: validation r within MAX_R_DROP of full attention on every set and within half of it pooled.
    Chosen: the largest acceptable block not above `trained_neurons`, the neurons per pretraining example (neuron
    attention never saw larger groups in training); None (full attention) when none qualifies."""
    report = {}
    acceptable = []
    for block in sorted(blocks, reverse=True):
        drops = pooled_drop(rows, block, "validation")
        if not drops:
            continue
        worst, mean = max(drops.values()), float(np.mean(list(drops.values())))
        ok = worst <= MAX_R_DROP and mean <= MAX_R_DROP / 2
        report[str(block)] = {"validation_r_drop": drops, "worst": worst, "mean": mean, "acceptable": ok,
                              "test_r_drop": pooled_drop(rows, block, "test")}
        if ok:
            acceptable.append(block)
    chosen = max((block for block in acceptable if block <= trained_neurons), default=None)
    return {"block": chosen, "rule": f"largest block not above the {trained_neurons} neurons of a pretraining example "
            f"with validation r drop <= {MAX_R_DROP} on every set and <= {MAX_R_DROP / 2} pooled", "blocks": report}


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = ["# Neuron-axis attention in blocks against attention over all neurons", "",
             f"`{meta['command']}` at `{meta['commit']}`, {meta['date']}, {meta['seconds'] / 60:.0f} min. "
             "calm-base unchanged but for `config.neuron_attention_block`; r / MSE / 5-95% coverage, mean over "
             "the sessions of each set; k = 0 zero-shot, k = 16 identity from 16 training trials (no training).", ""]
    blocks = sorted({row["block"] for row in result["rows"] if row["block"] is not None}, reverse=True)
    for split in ("validation", "test"):
        lines += [f"## {split.capitalize()} split", "",
                  "| set | neurons | k | full | " + " | ".join(f"block {b}" for b in blocks) + " |",
                  "|---|---:|---|---|" + "---|" * len(blocks)]
        keys = sorted({(row["set"], row["k"]) for row in result["rows"]}, key=lambda key: (key[0], int(key[1])))
        for set_name, k in keys:
            cells = []
            selected = [r for r in result["rows"] if r["set"] == set_name and r["k"] == k and r["split"] == split]
            neurons = sorted({r["neurons"] for r in selected})
            for block in [None, *blocks]:
                chosen = [r for r in selected if r["block"] == block]
                if not chosen:
                    cells.append("= full")
                    continue
                mean = {key: np.mean([r[key] for r in chosen]) for key in ("pearson_r", "mse", "coverage_90")}
                note = "" if block is None or len(chosen) == len([r for r in selected if r["block"] is None]) \
                    else f" ({len(chosen)} session)"
                cells.append(f"{mean['pearson_r']:.3f} / {mean['mse']:.3f} / {mean['coverage_90']:.2f}{note}")
            lines.append(f"| {set_name} | {', '.join(map(str, neurons))} | {k} | " + " | ".join(cells) + " |")
        lines.append("")
    choice = result["choice"]
    lines += ["## Choice (validation split)", "", f"Rule: {choice['rule']}. Chosen: **{choice['block']}**.", "",
              "| block | worst set drop | pooled drop | test drops by set |", "|---:|---:|---:|---|"]
    for block, info in choice["blocks"].items():
        test = ", ".join(f"{name} {value:+.4f}" for name, value in info["test_r_drop"].items())
        lines.append(f"| {block} | {info['worst']:+.4f} | {info['mean']:+.4f} | {test} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    import torch

    from calm_hf import CalmForCausalNeuralModeling, CalmTokenizer
    from calm_hf.forecasting import CalmForecaster
    from calm_hf.heldout import heldout_set

    args = parse_args(argv)
    blocks = [int(b) for b in args.blocks.split(",")]
    if args.rechoose:
        result = json.loads(args.rechoose.read_text())
        run_blocks = sorted({row["block"] for row in result["rows"] if row["block"] is not None})
        result["choice"] = choose_block(result["rows"], run_blocks, args.trained_neurons)
        args.output.write_text(json.dumps(result, indent=1) + "\n")
        args.output.with_suffix(".md").write_text(markdown(result))
        log(f"wrote {args.output}; chosen block {result['choice']['block']}")
        return result
    torch.manual_seed(args.seed)
    model = CalmForCausalNeuralModeling.from_pretrained(args.calm_dir).eval()
    forecaster = CalmForecaster(model, CalmTokenizer.from_pretrained(args.calm_dir / "tokenizer").eval())
    start = time.perf_counter()
    rows: list[dict] = []
    for name in args.sets.split(","):
        for session in heldout_set(name, sessions=args.sessions, seed=args.seed):
            log(f"{name}: {session.name} ({session.num_neurons} neurons)")
            rows += session_rows(forecaster, session, name, blocks, args.trials, args.seed)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent).stdout.strip()
    result = {"rows": rows, "choice": choose_block(rows, blocks, args.trained_neurons),
              "meta": {"date": time.strftime("%Y-%m-%d"), "commit": commit, "command": " ".join(["python", *sys.argv]),
                       "calm_dir": str(args.calm_dir), "seconds": round(time.perf_counter() - start, 1),
                       "threads": torch.get_num_threads()}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    args.output.with_suffix(".md").write_text(markdown(result))
    log(f"wrote {args.output}; chosen block {result['choice']['block']}")
    return result


if __name__ == "__main__":
    main()
