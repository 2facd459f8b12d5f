"""Mean squared error as an `evaluate` metric module (loaded by path: `calm_hf.metrics.load_metric("calm_mse")`).

Rows may be scalars, `(frames,)` traces or `(neurons, frames)` / `(frames, channels)` arrays. Pass `mask` (same
nesting as the rows, or one boolean per row's leading axis) to `compute` to exclude padding.
"""

import evaluate
import numpy as np

# Absolute imports: evaluate copies this file into its modules cache, so relative imports would break.
from calm_hf.metrics.evaluate_info import metric_info
from calm_hf.metrics.functional import mse

_DESCRIPTION = """\
Mean squared error over all (unmasked) entries, the loss-scale metric CalM reports for forecasts and behaviour decoding.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (scalars, or nested float lists of one shape per row): predictions.
    references (same structure as `predictions`): targets.
    mask (bool array broadcastable from the left to the stacked rows, *optional*): True = scored.
Returns:
    mse (`float`): the mean squared error.
Examples:
    >>> metric = calm_hf.metrics.load_metric("calm_mse")
    >>> metric.compute(predictions=[1.0, 2.0], references=[1.0, 4.0])
    {'mse': 2.0}
"""

@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CalmMse(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, row_ranks=(0, 1, 2))

    def _compute(self, predictions, references, mask=None):
        pred = np.asarray(predictions, dtype=np.float64)
        truth = np.asarray(references, dtype=np.float64)
        return {"mse": mse(pred, truth, mask=mask)}
