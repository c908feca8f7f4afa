"""Prompt -> image: the pipeline and its folders on disk."""
from t2i.pipeline.pipeline import Text2ImagePipeline

__all__ = ["Text2ImagePipeline"]
