"""The embeddable runtime. Imports without torch: backends load their libraries lazily."""
from .pipeline import Pipeline, PipelineError

__all__ = ["Pipeline", "PipelineError"]
