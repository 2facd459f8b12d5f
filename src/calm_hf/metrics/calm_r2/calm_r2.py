"""Per-channel R^2 as an `evaluate` metric module (loaded by path: `calm_hf.metrics.load_metric("calm_r2")`).

Rows are samples: either one `(channels,)` vector per frame, or one `(frames, channels)` array per trial (every axis
but the last is pooled as samples). R^2 is `1 - SS_res / SS_tot` per channel over all samples.
"""

import evaluate
import numpy as np

# Absolute imports: evaluate copies this file into its modules cache, so relative imports would break.
from calm_hf.metrics.evaluate_info import metric_info
from calm_hf.metrics.functional import r2_score

_DESCRIPTION = """\
Coefficient of determination per behaviour channel, 1 - SS_res / SS_tot over all samples (CalM behaviour decoding).
A channel whose target is constant has an undefined R^2 (NaN), ignored by the uniform average.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`(channels,)` per frame or `(frames, channels)` per trial): predicted behaviour.
    references (same structure as `predictions`): true behaviour.
    multioutput (`str`, *optional*, defaults to `"uniform_average"`): `"raw_values"` also returns one R^2 per channel.
Returns:
    r2 (`float`): mean R^2 over channels; with `"raw_values"`, `r2_per_channel` (`list[float]`) as well.
Examples:
    >>> metric = calm_hf.metrics.load_metric("calm_r2")
    >>> metric.compute(predictions=[[1.0], [2.0], [3.0]], references=[[1.0], [2.0], [3.0]])
    {'r2': 1.0}
"""

@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CalmR2(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, row_ranks=(1, 2))

    def _compute(self, predictions, references, multioutput="uniform_average"):
        pred = np.asarray(predictions, dtype=np.float64)
        truth = np.asarray(references, dtype=np.float64)
        per_channel = r2_score(pred, truth, multioutput="raw_values")
        finite = per_channel[~np.isnan(per_channel)]
        result = {"r2": float(finite.mean()) if finite.size else float("nan")}
        if multioutput == "raw_values":
            result["r2_per_channel"] = [float(value) for value in per_channel]
        elif multioutput != "uniform_average":
            raise ValueError(f"`multioutput` must be 'raw_values' or 'uniform_average', got {multioutput!r}.")
        return result
