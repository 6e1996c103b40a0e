"""Analysis of causal LMs: attention sinks, outlier activations, perplexity and quantisation robustness."""
from ds_orthoadam.analysis.errors import AnalysisInputError
from ds_orthoadam.analysis.metrics import OutlierStatistics, outlier_metrics

__all__ = ["AnalysisInputError", "OutlierStatistics", "outlier_metrics"]
