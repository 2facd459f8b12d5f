"""Forecast Pearson r as an `evaluate` metric module (loaded by path: `calm_hf.metrics.load_metric("forecast_pearson")`).

Rows are trials: `predictions` and `references` are `(neurons, horizon)` traces of one trial each. Trials may have
different neuron counts (they are zero-padded and masked). Pass `session_ids` (one per trial) and optionally
`neuron_mask` (one `(neurons,)` boolean list per trial) to `compute`.
"""

import evaluate
import numpy as np

# Absolute imports: evaluate copies this file into its modules cache, so relative imports would break.
from calm_hf.metrics.evaluate_info import metric_info
from calm_hf.metrics.functional import forecast_pearson_r, stack_trials

_DESCRIPTION = """\
Pearson correlation between forecast and true calcium traces, computed per neuron over the forecast horizon, then
averaged over neurons, then over trials, then over sessions (CalM, arXiv 2604.04958). Neurons whose trace is constant
over the horizon have an undefined r; they are excluded from the means and counted in `num_nan`.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `(neurons, horizon)` float arrays): forecast traces, one entry per trial.
    references (`list` of `(neurons, horizon)` float arrays): true traces, one entry per trial.
    session_ids (`list[int]`, *optional*): session of every trial (all one session when omitted).
    neuron_mask (`list` of `(neurons,)` bool arrays, *optional*): False marks padded neurons, which are not scored.
Returns:
    pearson_r (`float`): the hierarchical mean correlation.
    per_session (`dict`): mean correlation per session id.
    num_nan (`int`): neuron-trials excluded because a trace was constant.
    num_scored (`int`): neuron-trials that entered the means.
Examples:
    >>> metric = calm_hf.metrics.load_metric("forecast_pearson")
    >>> metric.compute(predictions=[[[0.0, 1.0, 2.0]]], references=[[[0.0, 1.0, 3.0]]])["pearson_r"]
    0.98...
"""

@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class ForecastPearson(evaluate.Metric):
    def _info(self):
        return metric_info(_DESCRIPTION, _KWARGS_DESCRIPTION, row_ranks=(2,))

    def _compute(self, predictions, references, session_ids=None, neuron_mask=None):
        pred, pad_mask = stack_trials(predictions)
        truth, truth_mask = stack_trials(references)
        if pred.shape != truth.shape or not np.array_equal(pad_mask, truth_mask):
            raise ValueError(
                f"predictions {pred.shape} and references {truth.shape} differ in shape; give every trial the same "
                "(neurons, horizon) in both."
            )
        if neuron_mask is not None:
            user_mask, _ = stack_trials([np.asarray(row, dtype=np.float64)[:, None] for row in neuron_mask])
            pad_mask = pad_mask & user_mask[..., 0].astype(bool)
        return forecast_pearson_r(pred, truth, session_ids=session_ids, neuron_mask=pad_mask)
