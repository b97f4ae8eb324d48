"""pymks-vae: latent representations of microstructures learned in spatial-statistics space.

The public names are resolved lazily so that ``import pymks_vae`` stays cheap (no torchvision,
dask or scikit-learn import until a name that needs them is used).

Example:
    >>> import torch, pymks_vae
    >>> x = torch.rand(2, 2, 16, 16, dtype=torch.float64)
    >>> pymks_vae.two_point_stats(x, [(0, 0), (0, 1)]).shape
    torch.Size([2, 2, 16, 16])
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "build_info": "pymks_vae._extension",
    "two_point_stats": "pymks_vae.ops",
    "spatial_stats_loss": "pymks_vae.ops",
    "soft_indicator": "pymks_vae.ops",
    "correlations_multiple": "pymks_vae.correlations",
    "TwoPointCorrelation": "pymks_vae.two_point_transformer",
    "VAETransformer": "pymks_vae.vae_transformer",
    "VAE": "pymks_vae.models",
    "LinesDataset": "pymks_vae.datasets",
    "LinesConfig": "pymks_vae.datasets",
    "generate_lines": "pymks_vae.datasets",
    "lines_dataarray": "pymks_vae.datasets",
    "train_val_split": "pymks_vae.datasets",
    "SpatialStatsLoss": "pymks_vae.losses",
    "DataSpaceLoss": "pymks_vae.losses",
    "kl_divergence": "pymks_vae.losses",
    "stats_scale_from_data": "pymks_vae.losses",
    "TrainConfig": "pymks_vae.training",
    "train_vae": "pymks_vae.training",
    "load_model": "pymks_vae.training",
    "generate_classes": "pymks_vae.microstructures",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name):
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'pymks_vae' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
