"""Write the README's results table from `benchmarks/results/foundation.json`, so no number in it is typed by hand.

    python benchmarks/readme_table.py            # rewrite the block between the README's results markers
    python benchmarks/readme_table.py --check    # exit 1 when the README's block differs from the results file

The block lists, for every held-out set at k = 0 (zero-shot), 16 and all training trials, CalM (as it is, adapted,
and adapted with its population readout) against the best baseline fitted on the same trials, with the run's date, commit and machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calm_hf.heldout import best_baseline

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- results:start -->", "<!-- results:end -->"
SHOWN_K = ("0", "16", "all")
NAMES = {"sim_in": "simulated, in the corpus' ranges", "sim_out": "simulated, outside the ranges",
         "sim_paper": "simulated, the paper's protocol", "zebrafish": "zebrafish tectum (real)",
         "park": "mouse V1, 2 held-out mice (real)"}


def table(results: dict) -> str:
    meta = results["meta"]
    lines = [f"*{meta['date']}, commit `{meta['commit']}`, {meta['machine']}; `{meta['command']}` "
             f"({meta['seconds'] / 60:.0f} min). r / MSE in z-scored units; k = training trials of the recording "
             "(0: the forecast context only).*", "",
             "| held-out recording | k | CalM | CalM adapted | CalM adapted + population readout | "
             "best baseline by r | lowest baseline MSE | 5-95% coverage: CalM / + readout |",
             "|---|---|---|---|---|---|---|---|"]

    def coverage(row):
        return "–" if row is None else format(row["coverage_90"], ".0%")

    def pair(row):
        return "–" if row is None else f"{row['pearson_r']:.3f} / {row['mse']:.3f}"

    for name, cells in results["sets"].items():
        for k in SHOWN_K:
            if k not in cells:
                continue
            models = cells[k]
            by_r, by_mse = best_baseline(models, "pearson_r"), best_baseline(models, "mse")
            calm = models.get("calm")
            lines.append(
                f"| {NAMES.get(name, name)} | {k} | {pair(calm)} | {pair(models.get('calm_adapted'))} | "
                f"{pair(models.get('calm_readout'))} | "
                f"{'–' if by_r is None else by_r[0].replace('_', ' ') + ' ' + pair(by_r[1])} | "
                f"{'–' if by_mse is None else by_mse[0].replace('_', ' ') + ' ' + format(by_mse[1]['mse'], '.3f')} | "
                f"{coverage(calm)} / {coverage(models.get('calm_readout'))} |")
    return "\n".join(lines)


def render(readme: str, block: str) -> str:
    if START not in readme or END not in readme:
        raise SystemExit(f"README.md has no {START} ... {END} block to fill.")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "foundation.json")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--check", action="store_true", help="Exit 1 when the README's table is stale.")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    current = args.readme.read_text()
    updated = render(current, table(results))
    if args.check:
        if updated != current:
            print(f"{args.readme}'s results table differs from {args.results}: run python benchmarks/readme_table.py",
                  file=sys.stderr)
            return 1
        return 0
    args.readme.write_text(updated)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
