"""The manifest: one row per image, no tensors. Every indexer returns one of these tables."""
from __future__ import annotations

import pandas as pd

#: Columns every manifest has, in order. ``mask_path`` is "" when an image has no mask.
MANIFEST_COLUMNS = ("dataset", "category", "split", "image_path", "mask_path", "label", "defect_type")
SPLITS = ("train", "test", "calibration")


class DataError(ValueError):
    """Bad or missing input data; the message names the file and what to do."""
