"""Datasets: one sample/batch type, benchmark layouts, a generic folder format, demo data."""
from .sample import DEFECT, GOOD, UNKNOWN, Batch, ImageRecord, Sample

__all__ = ["Batch", "ImageRecord", "Sample", "GOOD", "DEFECT", "UNKNOWN"]
