"""Synthetic microstructure datasets.

Example:
    >>> from pymks_vae.datasets import LinesDataset
    >>> len(LinesDataset(5, size=64))
    5
"""
from pymks_vae.datasets.lines import (
    BACKGROUND,
    HORIZONTAL,
    LINE,
    VERTICAL,
    LinesConfig,
    LinesDataset,
    generate_lines,
    line_layouts,
    lines_dataarray,
    lines_labels,
    train_val_split,
)

__all__ = [
    "BACKGROUND",
    "HORIZONTAL",
    "LINE",
    "VERTICAL",
    "LinesConfig",
    "LinesDataset",
    "generate_lines",
    "line_layouts",
    "lines_dataarray",
    "lines_labels",
    "train_val_split",
]
