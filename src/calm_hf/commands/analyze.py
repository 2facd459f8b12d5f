"""`calm analyze`: linear analyses of a checkpoint's neuron/session embeddings and of its forecasts' dynamics.

    calm analyze --model calm-base --dataset calm-base-dataset --labels labels.json --output_dir analysis

The analyses themselves are `calm_hf.analysis.report.run_analysis`; see that module for the labels file.
"""

from __future__ import annotations

from ..analysis.report import AnalyzeArguments, run_analysis
from ..atomic import claim_output_folder
from . import OutputArguments, parse_command_args, run_command


def run(argv: list[str] | None = None) -> dict:
    """Parse `argv` (see `AnalyzeArguments`), write report.md, report.json and the figures, return the report."""
    args, output = parse_command_args((AnalyzeArguments, OutputArguments), argv, prog="calm analyze")
    claim_output_folder(args.output_dir, "analyze", [args.model, args.dataset, args.labels], output.overwrite,
                        in_place=True)
    return run_analysis(args)


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-analyze` (and `calm analyze`): returns the exit code."""
    return run_command("analyze", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
