"""Synthetic microstructures in classes, for PyMKS-style classification examples and tests.

PyMKS 0.4.1's ``generate_multiphase`` no longer runs on numpy >= 1.26, so this module provides a
small, deterministic replacement: periodic Gaussian-filtered white noise, thresholded at the
quantile that gives each sample its volume fraction (:func:`generate_two_phase`, 1-3D), or at
several quantiles into three or more phases (:func:`generate_multiphase`, 1-3D). Classes differ by
their correlation lengths along each axis (anisotropy) and by their volume fraction.

Three labelled families with a continuous descriptor per sample (for classification and for
regression, e.g. ``benchmarks/bench_latent.py``) return ``(x, labels, descriptor)``:

* :func:`generate_grf_family`: thresholded Gaussian random fields of equal volume fraction whose
  classes differ in correlation length and anisotropy, 2D (:data:`GRF_CLASSES`) or 3D
  (:data:`GRF_CLASSES_3D`: grains, fibres, plates); descriptor: the geometric mean of the
  per-axis filter widths.
* :func:`generate_inclusions` (2D): disks of a class-dependent radius at random (periodic) places, of
  similar volume fraction in every class; descriptor: the radius.
* :func:`generate_lamellae` (2D): wavy, noisy stripes of a class-dependent spacing at a jittered
  orientation; descriptor: the spacing.

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

__all__ = ["DEFAULT_CLASSES", "GRF_CLASSES", "GRF_CLASSES_3D", "INCLUSION_CLASSES", "LAMELLA_CLASSES",
           "generate_classes", "generate_grf_family", "generate_inclusions", "generate_lamellae", "generate_multiphase",
           "generate_two_phase"]

# Each class: Gaussian filter widths in pixels per axis (correlation lengths) and the mean volume
# fraction of phase 1. Chosen so that no single simple feature separates all classes.
DEFAULT_CLASSES = (
    {"name": "fine", "sigma": (1.5, 1.5), "volume_fraction": 0.5},
    {"name": "x-elongated", "sigma": (1.0, 4.0), "volume_fraction": 0.5},
    {"name": "y-elongated", "sigma": (4.0, 1.0), "volume_fraction": 0.5},
    {"name": "coarse", "sigma": (3.0, 3.0), "volume_fraction": 0.35},
)

# Thresholded Gaussian random fields, all of volume fraction 0.5. ``sigma_mean`` is the range of the
# geometric mean of the two filter widths (pixels), drawn uniformly per sample; ``aspect`` is
# sigma along axis 1 over sigma along axis 0 (> 1: grains elongated along axis 1, x in a plot).
# Three classes share a size range and differ only in anisotropy, three share the isotropic shape
# and differ only in size: neither feature alone separates all five.
GRF_CLASSES = (
    {"name": "fine", "sigma_mean": (1.0, 1.6), "aspect": 1.0},
    {"name": "medium", "sigma_mean": (1.6, 2.4), "aspect": 1.0},
    {"name": "coarse", "sigma_mean": (2.4, 3.6), "aspect": 1.0},
    {"name": "x-elongated", "sigma_mean": (1.6, 2.4), "aspect": 3.0},
    {"name": "y-elongated", "sigma_mean": (1.6, 2.4), "aspect": 1.0 / 3.0},
)

# The 3D family, 32^3 or larger: ``aspect`` is a scalar (filter width along the last axis, z, over
# the others) or one relative width per axis; either is rescaled to geometric mean 1, so that
# ``sigma_mean`` stays the geometric mean of the widths (the descriptor). Three isotropic sizes,
# and two shapes at the medium size: fibres along z and plates normal to z. As in 2D, neither size
# nor shape alone separates all five.
GRF_CLASSES_3D = (
    {"name": "fine", "sigma_mean": (1.0, 1.6), "aspect": 1.0},
    {"name": "medium", "sigma_mean": (1.6, 2.4), "aspect": 1.0},
    {"name": "coarse", "sigma_mean": (2.4, 3.6), "aspect": 1.0},
    {"name": "z-fibres", "sigma_mean": (1.6, 2.4), "aspect": 4.0},
    {"name": "xy-plates", "sigma_mean": (1.6, 2.4), "aspect": (2.0, 2.0, 0.5)},
)

# Disk inclusions: ``radius`` is the range (pixels) of each sample's disk radius, drawn uniformly.
# Adjacent ranges: the descriptor is continuous across classes.
INCLUSION_CLASSES = (
    {"name": "r1.5-2.5", "radius": (1.5, 2.5)},
    {"name": "r2.5-3.5", "radius": (2.5, 3.5)},
    {"name": "r3.5-5", "radius": (3.5, 5.0)},
    {"name": "r5-7", "radius": (5.0, 7.0)},
)

# Lamellae: ``spacing`` is the range (pixels) of each sample's period (one layer of each phase),
# drawn uniformly; optional ``angle`` is the class's mean orientation in degrees (default 0).
LAMELLA_CLASSES = (
    {"name": "s4-5.5", "spacing": (4.0, 5.5)},
    {"name": "s5.5-7.5", "spacing": (5.5, 7.5)},
    {"name": "s7.5-10", "spacing": (7.5, 10.0)},
    {"name": "s10-14", "spacing": (10.0, 14.0)},
)


def _check_n(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_shape_2d(shape):
    shape = _check_shape(shape)
    if len(shape) != 2:
        raise ValueError(f"shape must be 2D, got {shape!r}")
    return shape


def _check_shape_2d_3d(shape):
    shape = _check_shape(shape)
    if len(shape) not in (2, 3):
        raise ValueError(f"shape must be 2D or 3D, got {shape!r}")
    return shape


def _check_range(name, value, low, high=np.inf):
    """A ``(lo, hi)`` pair with ``low <= lo <= hi < high`` (finite floats)."""
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a (low, high) pair of numbers, got {value!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and low <= lo <= hi < high):
        raise ValueError(f"{name} must satisfy {low} <= low <= high < {high}, got {value!r}")
    return lo, hi


def _check_fraction(volume_fraction, jitter):
    vf, jitter = float(volume_fraction), float(jitter)
    if not 0.0 < vf < 1.0:
        raise ValueError(f"volume_fraction must lie in (0, 1), got {volume_fraction!r}")
    if not (0.0 <= jitter and 0.0 < vf - jitter and vf + jitter < 1.0):
        raise ValueError(
            f"volume_fraction_jitter must be >= 0 and keep volume_fraction +/- jitter inside (0, 1); "
            f"got volume_fraction={volume_fraction!r}, jitter={jitter!r}"
        )
    return vf, jitter


def _check_classes(classes, key):
    if len(classes) == 0:
        raise ValueError("classes must name at least one class")
    for k, spec in enumerate(classes):
        if key not in spec:
            raise ValueError(f"classes[{k}] needs a {key!r} entry, got {spec!r}")


def _labelled(classes, n_per_class, seed, one_class):
    """Concatenate ``one_class(spec, n, rng) -> (x, descriptor)`` over classes, one generator each."""
    seeds = np.random.SeedSequence(seed).spawn(len(classes))
    xs, ys, ds = [], [], []
    for label, (spec, class_seed) in enumerate(zip(classes, seeds)):
        x, d = one_class(spec, n_per_class, np.random.default_rng(class_seed))
        xs.append(x)
        ds.append(np.asarray(d, dtype=np.float64))
        ys.append(np.full(n_per_class, label, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ds)


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


def generate_multiphase(n_samples, shape=(32, 32), sigma=2.0, volume_fractions=(1 / 3, 1 / 3, 1 / 3), seed=0):
    """Random microstructures of two or more phases: one smoothed noise field cut into bands.

    Each sample filters white noise with a periodic Gaussian of widths ``sigma`` and assigns phase
    ``k`` to the band of values between the quantiles ``sum(volume_fractions[:k])`` and
    ``sum(volume_fractions[:k+1])``: every sample holds exactly these fractions, and phase ``k``
    borders phases ``k - 1`` and ``k + 1`` (a grain of phase 0 is wrapped in phase 1 before phase
    2), so the cross-correlations carry structure that the auto-correlations alone do not.

    Args:
        n_samples: number of microstructures (>= 1).
        shape: spatial shape (1-3 axes), or one int for a square.
        sigma: Gaussian filter width per axis in pixels (a float applies to every axis).
        volume_fractions: fraction of each phase, each > 0, summing to 1 (2 or more phases).
        seed: seed of the numpy generator, or a numpy Generator.

    Returns:
        int64 array ``(n_samples, *shape)`` of phase labels ``0..len(volume_fractions)-1``, as
        PyMKS's ``generate_multiphase`` (one-hot: ``pymks.PrimitiveTransformer(n_state=n_phase,
        min_=0, max_=n_phase - 1)``, or ``np.eye(n_phase)[x]``).

    Example:
        >>> from pymks_vae.microstructures import generate_multiphase
        >>> x = generate_multiphase(2, (12, 10, 8), sigma=1.5, volume_fractions=(0.5, 0.3, 0.2), seed=0)
        >>> x.shape, x.dtype.name, [round(float((x == k).mean()), 2) for k in range(3)]
        ((2, 12, 10, 8), 'int64', [0.5, 0.3, 0.2])
    """
    n_samples = _check_n("n_samples", n_samples)
    shape = _check_shape(shape)
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), (len(shape),))
    if np.any(sigma < 0) or not np.all(np.isfinite(sigma)):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma.tolist()}")
    try:
        fractions = np.asarray(volume_fractions, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        raise ValueError(f"volume_fractions must be a sequence of numbers, got {volume_fractions!r}") from None
    if len(fractions) < 2 or not np.all(np.isfinite(fractions)) or np.any(fractions <= 0) \
            or abs(fractions.sum() - 1.0) > 1e-6:
        raise ValueError(f"volume_fractions must hold 2 or more fractions > 0 summing to 1, got {volume_fractions!r}")
    rng = np.random.default_rng(seed)
    levels = np.cumsum(fractions)[:-1]
    out = np.empty((n_samples,) + shape, dtype=np.int64)
    for k in range(n_samples):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=tuple(sigma), mode="wrap")
        out[k] = np.searchsorted(np.quantile(field, levels), field, side="right")
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


def _grf_sigma(s, aspect, ndim):
    """Per-axis filter widths of geometric mean ``s`` in the proportions ``aspect`` (see :data:`GRF_CLASSES_3D`)."""
    if np.ndim(aspect) == 0 and ndim == 2:
        # the 2D formula of the first release, kept as written so that 2D samples stay the same to the bit
        return (s / np.sqrt(aspect), s * np.sqrt(aspect))
    if np.ndim(aspect) == 0:
        rel = np.ones(ndim)
        rel[-1] = aspect
    else:
        rel = np.asarray(aspect, dtype=float)
    return tuple(float(v) for v in s * rel / np.exp(np.log(rel).mean()))


def _check_aspect(value, ndim, name):
    """A scalar > 0, or ``ndim`` relative widths > 0."""
    arr = np.asarray(value, dtype=float) if not isinstance(value, (str, bytes)) else np.asarray(np.nan)
    ok = arr.ndim == 0 or (arr.ndim == 1 and len(arr) == ndim)
    if not ok or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name} must be a number > 0 or {ndim} numbers > 0 (one per axis), got {value!r}")
    return float(arr) if arr.ndim == 0 else tuple(float(v) for v in arr)


def generate_grf_family(n_per_class=60, shape=(64, 64), classes=None, volume_fraction=0.5,
                        volume_fraction_jitter=0.0, seed=0):
    """Labelled thresholded Gaussian random fields of one volume fraction, with a size descriptor; 2D or 3D.

    Each sample draws the geometric mean ``s`` of its filter widths uniformly from its class's
    ``sigma_mean`` range and uses per-axis widths of geometric mean ``s`` in the proportions of
    the class's ``aspect`` (2D, a scalar ``a``: ``sigma = (s / sqrt(a), s * sqrt(a))``; 3D, a
    scalar ``a``: ``a`` times wider along z than along x and y; or one relative width per axis) in
    :func:`generate_two_phase` (periodic filtering). All classes share the volume fraction, so it
    carries no class information.

    Args:
        n_per_class: samples per class (>= 1).
        shape: 2D or 3D spatial shape, or one int for a square.
        classes: sequence of dicts with ``sigma_mean`` (a ``(low, high)`` range of the geometric
            mean filter width, pixels, > 0) and ``aspect`` (see above; > 0). None (default):
            :data:`GRF_CLASSES` (5 classes) for 2D shapes, :data:`GRF_CLASSES_3D` (5) for 3D.
        volume_fraction: fraction of phase 1 in every sample, in (0, 1).
        volume_fraction_jitter: per-sample spread of the volume fraction (default 0: equal).
        seed: seed; each class draws from its own generator derived from it.

    Returns:
        ``(x, labels, descriptor)``: float64 ``(n_classes * n_per_class, *shape)`` with values in
        {0, 1}, int64 labels ordered by class, and float64 per-sample geometric mean filter width
        (the mean correlation length, pixels).

    Example:
        >>> from pymks_vae.microstructures import generate_grf_family
        >>> x, y, d = generate_grf_family(2, (16, 16), seed=0)
        >>> x.shape, y.tolist(), d.shape
        ((10, 16, 16), [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], (10,))
        >>> bool(abs(x.mean() - 0.5) < 0.01), bool(1.0 <= d.min() and d.max() <= 3.6)
        (True, True)
        >>> generate_grf_family(1, (16, 16, 16), seed=0)[0].shape       # GRF_CLASSES_3D
        (5, 16, 16, 16)
    """
    n_per_class = _check_n("n_per_class", n_per_class)
    shape = _check_shape_2d_3d(shape)
    vf, jitter = _check_fraction(volume_fraction, volume_fraction_jitter)
    if classes is None:
        classes = GRF_CLASSES if len(shape) == 2 else GRF_CLASSES_3D
    _check_classes(classes, "sigma_mean")
    specs = []
    for k, spec in enumerate(classes):
        lo, hi = _check_range(f"classes[{k}]['sigma_mean']", spec["sigma_mean"], 1e-12)
        aspect = _check_aspect(spec.get("aspect", 1.0), len(shape), f"classes[{k}]['aspect']")
        specs.append((lo, hi, aspect))

    def one_class(spec, n, rng):
        lo, hi, aspect = spec
        s = rng.uniform(lo, hi, size=n)
        x = np.stack([
            generate_two_phase(1, shape, sigma=_grf_sigma(sk, aspect, len(shape)), volume_fraction=vf,
                               volume_fraction_jitter=jitter, seed=rng)[0]
            for sk in s
        ])
        return x, s

    return _labelled(specs, n_per_class, seed, one_class)


def _disks(shape, radius, fraction, overlap, rng, max_rejections=10000):
    """One periodic field of disks of ``radius`` at uniform random centres, up to ``fraction``.

    Disks are added until the covered fraction reaches ``fraction``; the last disk is kept only if
    that brings the fraction closer to the target. Without ``overlap``, centres closer than
    ``2 * radius`` (periodic distance) to an earlier one are redrawn.
    """
    size = np.array(shape, dtype=float)
    out = np.zeros(shape, dtype=bool)
    reach = int(np.ceil(radius)) + 1
    goal = fraction * out.size
    filled = 0
    centres = []
    rejections = 0
    while filled < goal:
        c = rng.uniform(0.0, 1.0, size=2) * size
        if not overlap and centres:
            d = np.abs(np.asarray(centres) - c)
            d = np.minimum(d, size - d)
            if ((d ** 2).sum(axis=1) < (2 * radius) ** 2).any():
                rejections += 1
                if rejections > max_rejections:
                    raise ValueError(
                        f"could not place non-overlapping disks of radius {radius:.3g} up to volume fraction "
                        f"{fraction:.3g} in {shape}; lower the volume fraction or the radii, or allow overlap"
                    )
                continue
        idx = []
        for axis in range(2):
            n = shape[axis]
            if 2 * reach + 1 >= n:
                pix = np.arange(n)
            else:
                pix = (int(np.floor(c[axis])) + np.arange(-reach, reach + 1)) % n
            # periodic distance from the pixel centres to the disk centre
            dist = np.abs(pix + 0.5 - c[axis]) % n
            idx.append((pix, np.minimum(dist, n - dist)))
        (rows, dy), (cols, dx) = idx
        patch = dy[:, None] ** 2 + dx[None, :] ** 2 <= radius ** 2
        old = out[np.ix_(rows, cols)]
        new = old | patch
        gain = int(new.sum() - old.sum())
        if filled + gain > goal and filled + gain - goal > goal - filled:
            break
        out[np.ix_(rows, cols)] = new
        filled += gain
        centres.append(c)
    return out


def generate_inclusions(n_per_class=60, shape=(64, 64), classes=INCLUSION_CLASSES, volume_fraction=0.3,
                        volume_fraction_jitter=0.05, overlap=True, seed=0):
    """Labelled fields of disk inclusions (phase 1) of a class-dependent radius, with the radius.

    Each sample draws one radius uniformly from its class's range and a target volume fraction
    uniformly within ``volume_fraction +/- volume_fraction_jitter``, then places disks of that
    radius at uniform random centres (periodic wrap) until the target is reached (within half a
    disk's area). The volume fraction is thus the same in distribution for every class, so it alone
    does not classify - except where one disk covers more than the jitter (large radii in small
    images).

    Args:
        n_per_class: samples per class (>= 1).
        shape: 2D spatial shape, or one int for a square.
        classes: sequence of dicts with ``radius``, a ``(low, high)`` range in pixels,
            ``0.5 <= low <= high < min(shape) / 2``. Default :data:`INCLUSION_CLASSES` (4 classes).
        volume_fraction: mean target fraction of phase 1 (the disks), in (0, 1).
        volume_fraction_jitter: per-sample spread of the target fraction.
        overlap: allow disks to overlap (True) or redraw centres closer than a diameter (False;
            raises ValueError when the disks cannot be packed to the target).
        seed: seed; each class draws from its own generator derived from it.

    Returns:
        ``(x, labels, descriptor)``: float64 ``(n_classes * n_per_class, *shape)`` with values in
        {0, 1}, int64 labels ordered by class, and float64 per-sample disk radius (pixels).

    Example:
        >>> from pymks_vae.microstructures import generate_inclusions
        >>> x, y, r = generate_inclusions(2, (32, 32), seed=0)
        >>> x.shape, y.tolist(), bool(1.5 <= r.min() and r.max() <= 7.0)
        ((8, 32, 32), [0, 0, 1, 1, 2, 2, 3, 3], True)
        >>> set(x.ravel().tolist()) == {0.0, 1.0}
        True
    """
    n_per_class = _check_n("n_per_class", n_per_class)
    shape = _check_shape_2d(shape)
    vf, jitter = _check_fraction(volume_fraction, volume_fraction_jitter)
    if not isinstance(overlap, (bool, np.bool_)):
        raise TypeError(f"overlap must be a bool, got {overlap!r}")
    _check_classes(classes, "radius")
    specs = [_check_range(f"classes[{k}]['radius']", spec["radius"], 0.5, min(shape) / 2)
             for k, spec in enumerate(classes)]

    def one_class(spec, n, rng):
        r = rng.uniform(spec[0], spec[1], size=n)
        x = np.empty((n,) + shape, dtype=np.float64)
        for k in range(n):
            fraction = vf + (rng.uniform(-jitter, jitter) if jitter else 0.0)
            x[k] = _disks(shape, r[k], fraction, bool(overlap), rng)
        return x, r

    return _labelled(specs, n_per_class, seed, one_class)


def generate_lamellae(n_per_class=60, shape=(64, 64), classes=LAMELLA_CLASSES, angle_jitter=15.0, waviness=0.2,
                      noise=0.5, volume_fraction=0.5, volume_fraction_jitter=0.0, seed=0):
    """Labelled lamellar (striped) two-phase fields of a class-dependent spacing, with the spacing.

    Each sample draws a spacing ``s`` (the period: one layer of each phase) uniformly from its
    class's range, an orientation uniformly within ``angle +/- angle_jitter`` degrees and a random
    phase, and thresholds, at the quantile that sets its volume fraction, the field
    ``cos(2 pi (t + w) / s + phase) + noise * n`` where ``t`` is the position along the stripes'
    normal, ``w = waviness * s * sin(2 pi u / L + psi)`` bends the stripes (``u`` along them, ``L``
    drawn in [3 s, 6 s]) and ``n`` is unit-variance Gaussian-smoothed (1 pixel) periodic noise. The
    stripes are not periodic across the image border unless the orientation and spacing fit it.

    Args:
        n_per_class: samples per class (>= 1).
        shape: 2D spatial shape, or one int for a square.
        classes: sequence of dicts with ``spacing``, a ``(low, high)`` range in pixels (>= 2), and an
            optional ``angle`` in degrees (orientation of the stripes' normal from axis 0; default 0:
            stripes along axis 1). Default :data:`LAMELLA_CLASSES` (4 classes).
        angle_jitter: half-width in degrees of the per-sample orientation spread, in [0, 90].
        waviness: amplitude of the stripes' bending as a fraction of the spacing (>= 0).
        noise: standard deviation of the noise added before thresholding (>= 0; the stripes'
            cosine has amplitude 1).
        volume_fraction: mean fraction of phase 1, in (0, 1).
        volume_fraction_jitter: per-sample spread of the volume fraction.
        seed: seed; each class draws from its own generator derived from it.

    Returns:
        ``(x, labels, descriptor)``: float64 ``(n_classes * n_per_class, *shape)`` with values in
        {0, 1}, int64 labels ordered by class, and float64 per-sample spacing (pixels).

    Example:
        >>> from pymks_vae.microstructures import generate_lamellae
        >>> x, y, s = generate_lamellae(2, (32, 32), seed=0)
        >>> x.shape, y.tolist(), bool(4.0 <= s.min() and s.max() <= 14.0)
        ((8, 32, 32), [0, 0, 1, 1, 2, 2, 3, 3], True)
        >>> bool(abs(x.mean() - 0.5) < 0.01)
        True
    """
    n_per_class = _check_n("n_per_class", n_per_class)
    shape = _check_shape_2d(shape)
    vf, jitter = _check_fraction(volume_fraction, volume_fraction_jitter)
    for name, value, high in (("angle_jitter", angle_jitter, 90.0), ("waviness", waviness, np.inf),
                              ("noise", noise, np.inf)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= high \
                or not np.isfinite(value):
            raise ValueError(f"{name} must be a finite number in [0, {high}], got {value!r}")
    _check_classes(classes, "spacing")
    specs = []
    for k, spec in enumerate(classes):
        lo, hi = _check_range(f"classes[{k}]['spacing']", spec["spacing"], 2.0)
        angle = float(spec.get("angle", 0.0))
        if not np.isfinite(angle):
            raise ValueError(f"classes[{k}]['angle'] must be finite, got {spec.get('angle')!r}")
        specs.append((lo, hi, angle))
    ii, jj = np.meshgrid(np.arange(shape[0]) + 0.5, np.arange(shape[1]) + 0.5, indexing="ij")

    def one_class(spec, n, rng):
        lo, hi, angle = spec
        s = rng.uniform(lo, hi, size=n)
        x = np.empty((n,) + shape, dtype=np.float64)
        for k in range(n):
            theta = np.deg2rad(angle + rng.uniform(-angle_jitter, angle_jitter))
            t = ii * np.cos(theta) + jj * np.sin(theta)
            u = -ii * np.sin(theta) + jj * np.cos(theta)
            bend = waviness * s[k] * np.sin(2 * np.pi * u / (s[k] * rng.uniform(3.0, 6.0)) + rng.uniform(0, 2 * np.pi))
            field = np.cos(2 * np.pi * (t + bend) / s[k] + rng.uniform(0, 2 * np.pi))
            if noise:
                n_field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=1.0, mode="wrap")
                field += noise * n_field / n_field.std()
            fraction = vf + (rng.uniform(-jitter, jitter) if jitter else 0.0)
            x[k] = field > np.quantile(field, 1.0 - fraction)
        return x, s

    return _labelled(specs, n_per_class, seed, one_class)
