"""The embeddable runtime. Imports without torch: backends load their libraries lazily."""
from mirage.core.config import PipelineOptions
from mirage.runtime.pipeline import Pipeline, PipelineError

__all__ = ["Pipeline", "PipelineError", "PipelineOptions"]
