"""What the package's `evaluate` metric modules (`calm_hf/metrics/<name>/<name>.py`) share: the citation and the
`MetricInfo` built from a metric's descriptions and the shapes of its rows. The modules import it absolutely
(`evaluate` copies a module's file into its cache, where relative imports break)."""

from __future__ import annotations

CITATION = """\
@article{calm2026,
  title   = {Self-Supervised Foundation Model for Calcium-imaging Population Dynamics},
  journal = {arXiv preprint arXiv:2604.04958},
  year    = {2026}
}
"""


def float_rows(rank: int):
    """The `datasets` feature of one row: a float32 scalar (rank 0) or nested float32 sequences of that rank."""
    import datasets

    feature = datasets.Value("float32")
    for _ in range(rank):
        feature = datasets.Sequence(feature)
    return feature


def metric_info(description: str, inputs_description: str, row_ranks: tuple[int, ...]):
    """`evaluate.MetricInfo` with `predictions` and `references` rows of the given ranks: with several, the first
    format that encodes the first row wins."""
    import datasets
    import evaluate

    features = [datasets.Features({"predictions": float_rows(rank), "references": float_rows(rank)}) for rank in row_ranks]
    return evaluate.MetricInfo(
        description=description,
        citation=CITATION,
        inputs_description=inputs_description,
        features=features[0] if len(features) == 1 else features,
        reference_urls=["https://arxiv.org/abs/2604.04958"],
    )
