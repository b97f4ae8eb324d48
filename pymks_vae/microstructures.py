"""Synthetic two-phase microstructures in classes, for PyMKS-style classification examples and tests.

PyMKS 0.4.1's ``generate_multiphase`` no longer runs on numpy >= 1.26, so this module provides a
small, deterministic replacement: periodic Gaussian-filtered white noise, thresholded at the
quantile that gives each sample its volume fraction. Classes differ by their correlation lengths
along each axis (anisotropy) and by their volume fraction.

Example:
    >>> from pymks_vae.microstructures import generate_classes
    >>> x, y = generate_classes(n_per_class=3, shape=(16, 16), seed=1)
    >>> x.shape, y.shape, sorted(set(y.tolist()))
    ((12, 16, 16), (12,), [0, 1, 2, 3])
    >>> set(x.ravel().tolist()) <= {0.0, 1.0}
    True
"""
import numbers

import numpy as np
from scipy import ndimage

__all__ = ["DEFAULT_CLASSES", "generate_classes", "generate_two_phase"]

# Each class: Gaussian filter widths in pixels per axis (correlation lengths) and the mean volume
# fraction of phase 1. Chosen so that no single simple feature separates all classes.
DEFAULT_CLASSES = (
    {"name": "fine", "sigma": (1.5, 1.5), "volume_fraction": 0.5},
    {"name": "x-elongated", "sigma": (1.0, 4.0), "volume_fraction": 0.5},
    {"name": "y-elongated", "sigma": (4.0, 1.0), "volume_fraction": 0.5},
    {"name": "coarse", "sigma": (3.0, 3.0), "volume_fraction": 0.35},
)


def _check_shape(shape):
    if isinstance(shape, numbers.Integral):
        shape = (int(shape), int(shape))
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a tuple of ints, got {shape!r}") from None
    if len(shape) not in (1, 2, 3) or any(s < 2 for s in shape):
        raise ValueError(f"shape must have 1-3 axes, each >= 2, got {shape!r}")
    return shape


def generate_two_phase(n_samples, shape=(32, 32), sigma=(2.0, 2.0), volume_fraction=0.5,
                       volume_fraction_jitter=0.0, seed=0):
    """Random two-phase microstructures with given correlation lengths and volume fraction.

    Args:
        n_samples: number of microstructures (>= 1).
        shape: spatial shape (1-3 axes), or one int for a square.
        sigma: Gaussian filter width per axis in pixels (a float applies to every axis); larger
            values along an axis give grains elongated along it. Filtering is periodic.
        volume_fraction: mean fraction of pixels in phase 1, in (0, 1).
        volume_fraction_jitter: each sample's fraction is drawn uniformly within +/- this value.
        seed: seed of the numpy generator (same seed, same output).

    Returns:
        float64 array ``(n_samples, *shape)`` with values 0.0 and 1.0.

    Example:
        >>> from pymks_vae.microstructures import generate_two_phase
        >>> x = generate_two_phase(2, (20, 20), sigma=(1, 5), volume_fraction=0.3, seed=0)
        >>> x.shape, bool(abs(x.mean() - 0.3) < 0.01)
        ((2, 20, 20), True)
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    shape = _check_shape(shape)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), (len(shape),))
    if np.any(sigma < 0) or not np.all(np.isfinite(sigma)):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma.tolist()}")
    if not 0.0 < float(volume_fraction) < 1.0:
        raise ValueError(f"volume_fraction must lie in (0, 1), got {volume_fraction!r}")
    jitter = float(volume_fraction_jitter)
    if not 0.0 <= jitter or not 0.0 < volume_fraction - jitter or not volume_fraction + jitter < 1.0:
        raise ValueError(
            f"volume_fraction_jitter must be >= 0 and keep volume_fraction +/- jitter inside (0, 1); "
            f"got volume_fraction={volume_fraction!r}, jitter={volume_fraction_jitter!r}"
        )
    rng = np.random.default_rng(seed)
    out = np.empty((n_samples,) + shape, dtype=np.float64)
    for k in range(n_samples):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=tuple(sigma), mode="wrap")
        fraction = volume_fraction + (rng.uniform(-jitter, jitter) if jitter else 0.0)
        # Thresholding at a quantile fixes the fraction per sample, independent of sigma.
        level = np.quantile(field, 1.0 - fraction)
        out[k] = field > level
    return out


def generate_classes(n_per_class=50, shape=(32, 32), classes=DEFAULT_CLASSES, volume_fraction_jitter=0.05,
                     seed=0):
    """A labelled set of two-phase microstructures, ``n_per_class`` from each class.

    Args:
        n_per_class: samples per class (>= 1).
        shape: spatial shape, or one int for a square (2D for the VAE).
        classes: sequence of dicts with ``sigma`` (per-axis filter widths) and ``volume_fraction``.
        volume_fraction_jitter: per-sample spread of the volume fraction around the class mean.
        seed: seed; each class draws from its own generator derived from it.

    Returns:
        ``(x, y)``: float64 ``(n_classes * n_per_class, *shape)`` with values in {0, 1}, and int64
        labels ``(n_classes * n_per_class,)``, ordered by class.

    Example:
        >>> from pymks_vae.microstructures import generate_classes
        >>> x, y = generate_classes(2, (8, 8), seed=3)
        >>> x.shape, y.tolist()
        ((8, 8, 8), [0, 0, 1, 1, 2, 2, 3, 3])
    """
    if len(classes) == 0:
        raise ValueError("classes must name at least one class")
    seeds = np.random.SeedSequence(seed).spawn(len(classes))
    xs, ys = [], []
    for label, (spec, class_seed) in enumerate(zip(classes, seeds)):
        vf = float(spec["volume_fraction"])
        xs.append(generate_two_phase(
            n_per_class, shape, sigma=spec["sigma"], volume_fraction=vf,
            volume_fraction_jitter=min(volume_fraction_jitter, 0.99 * min(vf, 1 - vf)),
            seed=np.random.default_rng(class_seed),
        ))
        ys.append(np.full(n_per_class, label, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)
