"""Which parts of the data identity help a pretrained calm-base forecast a held-out recording? Validation trials only.

For every held-out set (`calm_hf.heldout`: zebrafish, Park, sim_in, sim_paper) and k in {16, all} reference trials,
calm-base forecasts the validation trials with its identity computed from the k trials, then with parts of it zeroed:
the per-neuron highway statistics (the shared highway then forecasts), the coupling and single-neuron statistics
together, the coupling factors alone, the single-neuron statistics alone, or (a model with
`identity_coupling_skill`) the coupling's cross-validated skill.
k = 0 (no reference) is the zero-shot line.

    python benchmarks/identity_probe.py --calm_dir calm-base --out benchmarks/results/identity_probe.json

Writes `{set: {"<variant>@<k>": [pearson_r, mse]}}`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calm_dir", required=True)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "identity_probe.json"))
    parser.add_argument("--val_trials", type=int, default=40)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from calm_hf import CalmForecaster, CalmTokenizer
    from calm_hf.heldout import context_frames, heldout_set, k_subsets
    from calm_hf.identity_calm import STATISTIC_FEATURES, base_identity_size, config_base_identity_size
    from calm_hf.metrics.functional import forecast_pearson_r, mse

    model = AutoModelForCausalLM.from_pretrained(args.calm_dir).eval()
    forecaster = CalmForecaster(model, CalmTokenizer.from_pretrained(Path(args.calm_dir) / "tokenizer"))
    base = config_base_identity_size(model.config)
    skill = slice(base_identity_size(model.config.identity_rank), base)  # empty without the coupling skill
    sets = {"zebrafish": {}, "park": {}, "sim_in": dict(sessions=2, trials=48),
            "sim_paper": dict(sessions=2, paper_trials=120)}
    out = {}
    for name, kwargs in sets.items():
        rows: dict[str, list] = {}
        for session in heldout_set(name, **kwargs):
            context = context_frames(session)
            validation = session.split("validation")[: args.val_trials]
            truth = validation[:, :, context:]
            for k, index in k_subsets(session, 0, ("16", "all")).items():
                full = forecaster.neuron_identity(session.traces[index], num_neurons=session.num_neurons)
                variants = {"k0": forecaster.neuron_identity(None, num_neurons=session.num_neurons), "full": full}
                if full.shape[1] > base:
                    variants["no_highway_stats"] = full.clone()
                    variants["no_highway_stats"][:, base:] = 0
                variants["highway_only"] = full.clone()
                variants["highway_only"][:, :base] = 0
                rank = model.config.identity_rank
                variants["no_coupling"] = full.clone()  # statistics and reliability only
                variants["no_coupling"][:, : 2 * rank] = 0
                variants["no_statistics"] = full.clone()  # coupling and reliability only
                variants["no_statistics"][:, 2 * rank : 2 * rank + STATISTIC_FEATURES] = 0
                if skill.stop > skill.start:  # the coupling's cross-validated skill
                    variants["no_skill"] = full.clone()
                    variants["no_skill"][:, skill] = 0
                for label, identity in variants.items():
                    pred = forecaster.forecast(validation[:, :, :context], truth.shape[-1],
                                               neuron_identity=identity).forecast
                    rows.setdefault(f"{label}@{k}", []).append(
                        (float(forecast_pearson_r(pred, truth)["pearson_r"]), float(mse(pred, truth))))
        out[name] = {key: np.mean(values, axis=0).round(4).tolist() for key, values in rows.items()}
        print(name, json.dumps(out[name]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
