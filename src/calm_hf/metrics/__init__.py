"""CalM metrics: plain numpy functions and `evaluate` metric modules shipped inside the package.

`evaluate.load("mse")` fetches its script from the hub and fails offline; the modules here are loaded by path, so
they work with `HF_HUB_OFFLINE=1` / `HF_EVALUATE_OFFLINE=1`:

```python
>>> from calm_hf.metrics import load_metric
>>> metric = load_metric("forecast_pearson")
>>> metric.compute(predictions=forecasts, references=truths, session_ids=sessions)["pearson_r"]
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .functional import forecast_metrics, forecast_pearson_r, mse, pearson_r_per_neuron, r2_score, stack_trials

METRICS_DIR = Path(__file__).resolve().parent
METRIC_NAMES = ("forecast_pearson", "calm_mse", "calm_r2")

__all__ = [
    "METRIC_NAMES",
    "forecast_metrics",
    "forecast_pearson_r",
    "load_metric",
    "metric_path",
    "mse",
    "pearson_r_per_neuron",
    "r2_score",
    "stack_trials",
]


def metric_path(name: str) -> str:
    """Path of the metric script `calm_hf/metrics/<name>/<name>.py` shipped with the package."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown CalM metric {name!r}; choose one of {', '.join(METRIC_NAMES)}.")
    return str(METRICS_DIR / name / f"{name}.py")


def load_metric(name: str, **kwargs: Any):
    """Load one of the package's `evaluate` metric modules by path (works offline).

    Args:
        name (`str`): `"forecast_pearson"`, `"calm_mse"` or `"calm_r2"`.
        kwargs: forwarded to `evaluate.load` (e.g. `experiment_id`, `keep_in_memory`, `num_process`, `process_id`).

    Returns:
        `evaluate.EvaluationModule`.
    """
    import evaluate

    path = metric_path(name)
    kwargs.setdefault("keep_in_memory", True)
    try:
        return evaluate.load(path, **kwargs)
    except ImportError as error:  # evaluate checks that the script's imports resolve
        raise ImportError(
            f"Could not load the metric script {path}: {error}. Install calm_hf (`pip install -e .`) in this "
            "environment so that the script's `from calm_hf.metrics.functional import ...` resolves."
        ) from error
