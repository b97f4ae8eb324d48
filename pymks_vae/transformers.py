"""scikit-learn transformers for PyMKS pipelines: two-point statistics and a VAE latent space.

Both classes take PyMKS's layout, ``(n_samples, *spatial, n_state)``, as numpy arrays, dask arrays
(kept lazy, chunked along samples) or xarray ``DataArray`` (the sample dim and its coordinates
carry through). They slot into a ``sklearn.pipeline.Pipeline`` after ``pymks.PrimitiveTransformer``
and before any classifier or regressor.

- :class:`TwoPointCorrelation`: a drop-in for ``pymks.TwoPointCorrelation`` (same parameters, same
  numbers, stateless like it), computed by the pymks-vae operator.
- :class:`VAETransformer`: learns a low-dimensional latent space of 2D or 3D microstructures of
  any size and number of phases with a VAE trained in spatial-statistics space; ``transform``
  gives the latent means.

This module gathers them; the code lives along its seams, and data goes one way, from the
adapters through the functional core (:mod:`pymks_vae.correlations`, :mod:`pymks_vae.ops`,
:mod:`pymks_vae.losses`, :mod:`pymks_vae.training`) to the transformers:

- :mod:`pymks_vae.adapters`: numpy / dask / xarray input into PyMKS's layout, shared by both
  (xarray dims are read by name: ``"sample"``, ``"state"``, the rest spatial);
- :mod:`pymks_vae.two_point_transformer`: :class:`TwoPointCorrelation`;
- :mod:`pymks_vae.vae_transformer`: :class:`VAETransformer` (validation, training orchestration,
  block-wise encoding and decoding);
- :mod:`pymks_vae.persistence`: model snapshots for pickles and dask workers, and the checkpoint
  file of ``VAETransformer.save`` / ``load``.

The names that lived here before the split are re-exported, so ``from pymks_vae.transformers
import ...`` and pickles written before it keep working.

Example:
    >>> import numpy as np
    >>> from pymks_vae.transformers import TwoPointCorrelation
    >>> x = np.random.default_rng(0).random((4, 9, 9, 2))
    >>> TwoPointCorrelation(cutoff=2).fit_transform(x).shape
    (4, 5, 5, 2)
"""
from pymks_vae.adapters import (  # noqa: F401
    _STATE_MODES, SAMPLE_DIM, STATE_DIM, _as_array, _as_pymks_array, _check_finite_numpy, _is_dask, _is_xarray,
    _sample_coords, _spatial_dims, _unnamed)
from pymks_vae.persistence import (  # noqa: F401
    _FORMAT, _FORMAT_VERSION, _MODEL_CACHE, _build_model, _jsonable, _model_from_bytes, _ModelSnapshot,
    _read_checkpoint, _state_bytes, _write_checkpoint)
from pymks_vae.two_point_transformer import TwoPointCorrelation
from pymks_vae.vae_transformer import (  # noqa: F401
    AUTO_MIN_EPOCHS, AUTO_MIN_STEPS, VAETransformer, _check_int, _decode_block, _encode_block, _from_tensor,
    _is_auto, _seed_from, _stats_loss, _to_tensor)

__all__ = ["TwoPointCorrelation", "VAETransformer"]
