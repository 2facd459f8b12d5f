"""Linear analyses of a trained CalM (paper §5.4, Fig. 5, Appendix E): tuning d', PCA/LDA of neuron embeddings,
logistic-regression probes, PC-trajectory correlation of forecasts with trial-shuffle controls, their figures
(`calm_hf.analysis.figures`) and the `calm analyze` report (`calm_hf.analysis.report`).

Needs scikit-learn: `pip install calm_hf[analysis]`.
"""

from .linear import (
    embedding_lda,
    embedding_pca,
    pc_trajectory_correlation,
    probe_embeddings,
    shuffle_control,
    trial_responses,
    tuned_groups,
    tuning_dprime,
)

__all__ = [
    "embedding_lda",
    "embedding_pca",
    "pc_trajectory_correlation",
    "probe_embeddings",
    "shuffle_control",
    "trial_responses",
    "tuned_groups",
    "tuning_dprime",
]
