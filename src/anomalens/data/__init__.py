"""Datasets: one sample/batch type, benchmark layouts, a generic folder format, demo data."""
from .dataset import AnomalyDataset, DataWarning, image_to_tensor, mask_to_tensor
from .demo import DEMO_CATEGORIES, default_demo_root, ensure_demo, make_demo_dataset
from .formats import Split, Splits, btech_records, build_splits, folder_records, mvtec_records, visa_records
from .io import IMAGE_EXTENSIONS, read_image, read_mask
from .sample import DEFECT, GOOD, UNKNOWN, Batch, ImageRecord, Sample

__all__ = [
    "Batch", "ImageRecord", "Sample", "GOOD", "DEFECT", "UNKNOWN",
    "AnomalyDataset", "DataWarning", "image_to_tensor", "mask_to_tensor",
    "DEMO_CATEGORIES", "default_demo_root", "ensure_demo", "make_demo_dataset",
    "Split", "Splits", "btech_records", "build_splits", "folder_records", "mvtec_records", "visa_records",
    "IMAGE_EXTENSIONS", "read_image", "read_mask",
]
