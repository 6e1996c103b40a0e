"""Analysis of causal LMs: attention sinks, outlier activations, perplexity and quantisation robustness.

Modules: ``hooks`` (find blocks/attention, eager switch, streaming hooks), ``metrics`` (outlier statistics),
``perplexity``, ``quantize`` (RTN / W8A8), ``runner`` (one model's full analysis), ``report`` and ``plots`` (outputs),
``loading`` (model directories), ``cli`` (``ds-orthoadam-analyze``).
"""
from ds_orthoadam.analysis.errors import AnalysisInputError
from ds_orthoadam.analysis.metrics import OutlierStatistics, outlier_metrics
from ds_orthoadam.analysis.perplexity import perplexity
from ds_orthoadam.analysis.quantize import QuantScheme, WeightQuantizer, default_schemes, quantized
from ds_orthoadam.analysis.runner import ModelAnalysis, analyze_model

__all__ = [
    "AnalysisInputError",
    "ModelAnalysis",
    "OutlierStatistics",
    "QuantScheme",
    "WeightQuantizer",
    "analyze_model",
    "default_schemes",
    "outlier_metrics",
    "perplexity",
    "quantized",
]
