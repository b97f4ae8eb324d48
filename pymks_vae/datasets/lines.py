"""The paper's synthetic "lines" microstructures.

Each image is a square grey field holding 1 to 4 straight lines of ONE orientation (all
horizontal or all vertical, drawn at random). Pixel convention, as in the paper:

* line pixels = :data:`LINE` = 0.0 (black: the phase whose autocorrelation is matched),
* background  = :data:`BACKGROUND` = 1.0 (white).

Orientation labels are :data:`HORIZONTAL` = 0 and :data:`VERTICAL` = 1.

Geometry (at the reference size 224): widths uniform in 5..9 px, lengths uniform in 112..223 px,
uniform random placement fully inside the image. A new line is rejected when it comes within
``spacing`` (10 px) of an existing line - measured across the lines when their extents overlap
along them, and also along them, so two collinear lines can never touch end to end either.
After ``max_tries`` (50) rejected draws the line is dropped, and the label stores the number of
lines actually drawn. Other image sizes scale lengths, widths and spacing by ``size / 224``
(rounded, at least 1 px).

Every image is a pure function of ``(seed, index)``: it is drawn from its own
``numpy.random.Generator(PCG64([seed, index]))``, so image ``i`` is the same whichever batch,
chunk, worker or dataset size it is generated in.

Example:
    >>> from pymks_vae.datasets import generate_lines
    >>> images, orientation, n_lines = generate_lines(range(3), size=64, seed=1)
    >>> images.shape, images.dtype, orientation.dtype
    ((3, 64, 64), dtype('float32'), dtype('int64'))
"""
import dataclasses
import hashlib
import json
import numbers
import os
import tempfile
from collections import OrderedDict

import numpy as np
import torch

__all__ = [
    "LINE",
    "BACKGROUND",
    "HORIZONTAL",
    "VERTICAL",
    "LinesConfig",
    "generate_lines",
    "line_layouts",
    "lines_labels",
    "LinesDataset",
    "lines_dataarray",
    "train_val_split",
]

LINE = 0.0
BACKGROUND = 1.0
HORIZONTAL = 0
VERTICAL = 1

_INT_FIELDS = (
    "size",
    "min_lines",
    "max_lines",
    "min_width",
    "max_width",
    "min_length",
    "max_length",
    "spacing",
    "max_tries",
)


def _is_int(v):
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _check_size(size, name="size"):
    if not _is_int(size) or size < 1:
        raise ValueError(f"{name} must be an int >= 1, got {size!r}")
    return int(size)


def _check_seed(seed):
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return int(seed)


@dataclasses.dataclass(frozen=True)
class LinesConfig:
    """Geometry of the lines dataset, given at the reference image size ``size``.

    Args:
        size: reference image size the pixel lengths below are given at (224, the paper's).
        min_lines, max_lines: number of lines tried per image, uniform in this range (1..4).
        min_width, max_width: line thickness in px, uniform integer (5..9).
        min_length, max_length: line length in px, uniform integer (112..223).
        spacing: minimum gap in px between neighbouring lines (10).
        max_tries: draws per line before it is dropped (50).

    Raises:
        ValueError: naming the field, for non-integers, values below their minimum, inverted
            ranges, lengths longer than the image or lines not longer than they are wide.

    Example:
        >>> cfg = LinesConfig().scaled(64)
        >>> (cfg.min_width, cfg.max_width, cfg.min_length, cfg.max_length, cfg.spacing)
        (1, 3, 32, 64, 3)
    """

    size: int = 224
    min_lines: int = 1
    max_lines: int = 4
    min_width: int = 5
    max_width: int = 9
    min_length: int = 112
    max_length: int = 223
    spacing: int = 10
    max_tries: int = 50

    def __post_init__(self):
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if not _is_int(value):
                raise ValueError(f"LinesConfig.{name} must be an int, got {value!r}")
        for name in ("size", "min_lines", "min_width", "min_length", "max_tries"):
            if getattr(self, name) < 1:
                raise ValueError(f"LinesConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.spacing < 0:
            raise ValueError(f"LinesConfig.spacing must be >= 0, got {self.spacing}")
        for lo, hi in (("min_lines", "max_lines"), ("min_width", "max_width"), ("min_length", "max_length")):
            if getattr(self, hi) < getattr(self, lo):
                raise ValueError(
                    f"LinesConfig.{hi} ({getattr(self, hi)}) must be >= LinesConfig.{lo} ({getattr(self, lo)})"
                )
        if self.max_length > self.size:
            raise ValueError(
                f"LinesConfig.max_length ({self.max_length}) must be <= LinesConfig.size ({self.size})"
            )
        if self.max_width > self.size:
            raise ValueError(f"LinesConfig.max_width ({self.max_width}) must be <= LinesConfig.size ({self.size})")
        if self.min_length <= self.max_width:
            # Otherwise a line's orientation cannot be read off its shape.
            raise ValueError(
                f"LinesConfig.min_length ({self.min_length}) must be > LinesConfig.max_width ({self.max_width})"
            )

    def scaled(self, size):
        """This geometry for images of ``size`` px: lengths, widths and spacing times size/self.size.

        Each scaled pixel length is rounded and kept at least 1 (spacing at least 1 when it was
        positive); lengths are capped at ``size``. Counts and ``max_tries`` are unchanged.

        Args:
            size: the target image size (int >= 1).

        Returns:
            a new :class:`LinesConfig` whose ``size`` is ``size``.

        Raises:
            ValueError: when ``size`` is too small for lines to stay longer than they are wide.
        """
        size = _check_size(size)
        if size == self.size:
            return self
        factor = size / self.size

        def px(v, low=1):
            return max(low, min(size, int(round(v * factor))))

        values = dict(
            size=size,
            min_lines=self.min_lines,
            max_lines=self.max_lines,
            min_width=px(self.min_width),
            max_width=px(self.max_width),
            min_length=px(self.min_length),
            max_length=px(self.max_length),
            spacing=px(self.spacing, low=1 if self.spacing > 0 else 0),
            max_tries=self.max_tries,
        )
        if values["min_length"] <= values["max_width"]:
            raise ValueError(
                f"size={size} is too small for this LinesConfig: scaled lengths "
                f"({values['min_length']}..{values['max_length']}) would not exceed scaled widths "
                f"({values['min_width']}..{values['max_width']})"
            )
        return LinesConfig(**values)

    def key(self):
        """A short stable hash of the geometry (used in cache file names)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:12]


def _resolve(size, config):
    size = _check_size(size)
    if config is None:
        config = LinesConfig()
    elif not isinstance(config, LinesConfig):
        raise TypeError(f"config must be a LinesConfig or None, got {type(config).__name__}")
    return config.scaled(size)


def _check_indices(indices, upper=None):
    idx = np.asarray(indices)
    if idx.ndim == 0:
        idx = idx.reshape(1)
    if idx.ndim != 1:
        raise ValueError(f"indices must be a 1D sequence of ints, got shape {idx.shape}")
    if idx.size == 0:
        return idx.astype(np.int64)
    if not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
    if idx.min() < 0:
        raise ValueError(f"indices must be >= 0, got {int(idx.min())}")
    if upper is not None and idx.max() >= upper:
        raise IndexError(f"index {int(idx.max())} out of range for {upper} images")
    return idx.astype(np.int64)


def _layout(seed, index, cfg):
    """Draw one image's lines. Returns (orientation, rects) with rects as (r0, r1, c0, c1).

    Lines are laid out as horizontal bars (rows = across, cols = along); a vertical image is the
    transpose. The sequence of draws is fixed, so (seed, index) alone decides the result.
    """
    rng = np.random.Generator(np.random.PCG64([seed, index]))
    orientation = int(rng.integers(2))
    wanted = int(rng.integers(cfg.min_lines, cfg.max_lines + 1))
    size, gap = cfg.size, cfg.spacing
    rects = []
    for _ in range(wanted):
        for _ in range(cfg.max_tries):
            width = int(rng.integers(cfg.min_width, cfg.max_width + 1))
            length = int(rng.integers(cfg.min_length, cfg.max_length + 1))
            r0 = int(rng.integers(0, size - width + 1))
            c0 = int(rng.integers(0, size - length + 1))
            r1, c1 = r0 + width, c0 + length
            # Too close: the two bars, each grown by `spacing`, would overlap on both axes.
            if all(r0 >= q1 + gap or q0 >= r1 + gap or c0 >= p1 + gap or p0 >= c1 + gap for q0, q1, p0, p1 in rects):
                rects.append((r0, r1, c0, c1))
                break
    return orientation, rects


def line_layouts(indices, *, size=224, seed=0, config=None):
    """The geometry of each image without drawing it.

    Args:
        indices: 1D sequence of image indices (ints >= 0).
        size, seed, config: as in :func:`generate_lines`.

    Returns:
        list of ``(orientation, rects)``; ``rects`` is a list of ``(r0, r1, c0, c1)`` half-open
        pixel boxes in the HORIZONTAL frame (transpose them for a VERTICAL image).

    Example:
        >>> orientation, rects = line_layouts([0], size=64)[0]
        >>> 1 <= len(rects) <= 4
        True
    """
    cfg = _resolve(size, config)
    seed = _check_seed(seed)
    return [_layout(seed, int(i), cfg) for i in _check_indices(indices)]


def lines_labels(indices, *, size=224, seed=0, config=None):
    """Labels ``(orientation, n_lines)`` (int64 arrays) of the given images, without drawing them.

    Example:
        >>> o, n = lines_labels(range(5), size=64)
        >>> o.shape, n.shape
        ((5,), (5,))
    """
    layouts = line_layouts(indices, size=size, seed=seed, config=config)
    orientation = np.fromiter((o for o, _ in layouts), dtype=np.int64, count=len(layouts))
    n_lines = np.fromiter((len(r) for _, r in layouts), dtype=np.int64, count=len(layouts))
    return orientation, n_lines


def generate_lines(indices, *, size=224, seed=0, config=None):
    """Draw the lines images with the given indices.

    Args:
        indices: 1D sequence (or range/array) of image indices, ints >= 0.
        size: image side in px (default 224); geometry scaled by ``size / config.size``.
        seed: dataset seed, int >= 0. Image ``i`` depends only on ``(seed, i)``.
        config: a :class:`LinesConfig` (default: the paper's geometry).

    Returns:
        ``(images, orientation, n_lines)``: float32 ``(n, size, size)`` with lines = 0.0 and
        background = 1.0; int64 ``(n,)`` with HORIZONTAL=0 / VERTICAL=1; int64 ``(n,)`` number
        of lines actually drawn.

    Example:
        >>> images, o, n = generate_lines([5, 7], size=64, seed=0)
        >>> bool(((images == 0.0) | (images == 1.0)).all())
        True
    """
    cfg = _resolve(size, config)
    return _draw(_check_indices(indices), _check_seed(seed), cfg)


def _draw(idx, seed, cfg):
    """generate_lines on validated indices, seed and (scaled) geometry."""
    n = idx.size
    images = np.full((n, cfg.size, cfg.size), BACKGROUND, dtype=np.float32)
    orientation = np.empty(n, dtype=np.int64)
    n_lines = np.empty(n, dtype=np.int64)
    for k, i in enumerate(idx):
        o, rects = _layout(seed, int(i), cfg)
        orientation[k] = o
        n_lines[k] = len(rects)
        img = images[k] if o == HORIZONTAL else images[k].T  # a view: drawing on it draws on images
        for r0, r1, c0, c1 in rects:
            img[r0:r1, c0:c1] = LINE
    return images, orientation, n_lines


# ----------------------------------------------------------------------------- dataset
class LinesDataset(torch.utils.data.Dataset):
    """A map-style torch dataset of ``n_images`` lines images, drawn on demand.

    ``ds[i]`` is ``(image, orientation, n_lines)``: a float32 tensor ``(1, size, size)`` (lines 0,
    background 1) and two python ints. Image ``i`` equals ``generate_lines([i], ...)``.

    Args:
        n_images: number of images (int >= 1); indices are ``0..n_images-1``.
        size: image side in px.
        seed: dataset seed.
        config: a :class:`LinesConfig` (default: the paper's).
        cache_dir: optional folder for an on-disk cache. Images are stored by chunks of
            ``chunk_size`` global indices, bit-packed, one ``.npz`` per chunk written atomically,
            named by seed, size and a hash of the geometry, so any dataset with the same
            seed/size/config (whatever its length) reuses them.
        chunk_size: images per cache chunk (default 1000).
        max_cached_chunks: chunks kept in memory (packed) per process (default 8).

    Example:
        >>> ds = LinesDataset(10, size=64, seed=3)
        >>> image, orientation, n_lines = ds[0]
        >>> tuple(image.shape), type(n_lines)
        ((1, 64, 64), <class 'int'>)
    """

    def __init__(self, n_images, *, size=224, seed=0, config=None, cache_dir=None, chunk_size=1000,
                 max_cached_chunks=8):
        if not _is_int(n_images) or n_images < 1:
            raise ValueError(f"n_images must be an int >= 1, got {n_images!r}")
        if not _is_int(chunk_size) or chunk_size < 1:
            raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
        if not _is_int(max_cached_chunks) or max_cached_chunks < 1:
            raise ValueError(f"max_cached_chunks must be an int >= 1, got {max_cached_chunks!r}")
        self.n_images = int(n_images)
        self.size = _check_size(size)
        self.seed = _check_seed(seed)
        self.config = config if config is not None else LinesConfig()
        self._cfg = _resolve(self.size, config)
        self.chunk_size = int(chunk_size)
        self.max_cached_chunks = int(max_cached_chunks)
        self.cache_dir = None if cache_dir is None else os.fspath(cache_dir)
        self._chunks = OrderedDict()
        self._labels = None

    def __len__(self):
        return self.n_images

    def _check_index(self, i):
        if not _is_int(i):
            raise TypeError(f"index must be an int, got {type(i).__name__}")
        i = int(i)
        if i < 0:
            i += self.n_images
        if not 0 <= i < self.n_images:
            raise IndexError(f"index {i} out of range for LinesDataset of {self.n_images} images")
        return i

    def __getitem__(self, i):
        i = self._check_index(i)
        if self.cache_dir is None:
            img, o, n = _draw(np.array([i]), self.seed, self._cfg)
            return torch.from_numpy(img), int(o[0]), int(n[0])
        packed, o, n = self._chunk(i // self.chunk_size)
        j = i % self.chunk_size
        img = self._unpack(packed[j : j + 1])
        return torch.from_numpy(img), int(o[j]), int(n[j])

    # -- cache
    def chunk_path(self, c):
        """File of cache chunk ``c`` (global indices ``c*chunk_size .. (c+1)*chunk_size-1``)."""
        if self.cache_dir is None:
            raise ValueError("this LinesDataset has no cache_dir")
        name = f"lines_s{self.size}_seed{self.seed}_{self._cfg.key()}_c{self.chunk_size}_{c:06d}.npz"
        return os.path.join(self.cache_dir, name)

    def _unpack(self, packed):
        bits = np.unpackbits(packed, axis=-1, count=self.size)
        # bit 1 marks a line pixel
        return np.where(bits.astype(bool), np.float32(LINE), np.float32(BACKGROUND))

    def _chunk(self, c):
        if c in self._chunks:
            self._chunks.move_to_end(c)
            return self._chunks[c]
        path = self.chunk_path(c)
        data = None
        if os.path.exists(path):
            try:
                with np.load(path) as f:
                    data = (f["packed"], f["orientation"], f["n_lines"])
                if data[0].shape[0] != self.chunk_size:
                    data = None
            except (OSError, ValueError, KeyError, EOFError):
                data = None  # a damaged file is regenerated below
        if data is None:
            idx = np.arange(c * self.chunk_size, (c + 1) * self.chunk_size)
            images, o, n = generate_lines(idx, size=self.size, seed=self.seed, config=self.config)
            data = (np.packbits(images == LINE, axis=-1), o, n)
            os.makedirs(self.cache_dir, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.cache_dir, suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.savez(fh, packed=data[0], orientation=o, n_lines=n)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        self._chunks[c] = data
        while len(self._chunks) > self.max_cached_chunks:
            self._chunks.popitem(last=False)
        return data

    # -- batches
    def images(self, indices):
        """The images at ``indices`` as a float32 numpy array ``(n, size, size)``.

        Raises:
            IndexError: an index outside ``0..n_images-1``.
        """
        idx = _check_indices(indices, upper=self.n_images)
        if self.cache_dir is None:
            return _draw(idx, self.seed, self._cfg)[0]
        out = np.empty((idx.size, self.size, self.size), dtype=np.float32)
        for k, i in enumerate(idx):
            packed = self._chunk(int(i) // self.chunk_size)[0]
            j = int(i) % self.chunk_size
            out[k] = self._unpack(packed[j])
        return out

    def labels(self, progress=False):
        """``(orientation, n_lines)`` int64 arrays for all images (geometry only, chunkwise).

        Args:
            progress: show a tqdm progress bar over chunks.
        """
        if self._labels is None:
            starts = range(0, self.n_images, self.chunk_size)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc="lines labels", unit="chunk")
            parts = [
                lines_labels(range(s, min(s + self.chunk_size, self.n_images)), size=self.size, seed=self.seed,
                             config=self.config)
                for s in starts
            ]
            self._labels = tuple(np.concatenate(p) for p in zip(*parts))
        return self._labels[0].copy(), self._labels[1].copy()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_chunks"] = OrderedDict()  # don't ship cached chunks to DataLoader workers
        return state


# ----------------------------------------------------------------------------- dask / xarray
def _draw_block(block, size, seed, config):
    return generate_lines(block, size=size, seed=seed, config=config)[0]


def lines_dataarray(n_images, *, size=224, seed=0, config=None, chunks=1000):
    """The first ``n_images`` lines images as a lazy ``xarray.DataArray``.

    Nothing is drawn until the data is computed: each chunk of samples is generated by
    :func:`generate_lines` inside ``dask.array.map_blocks``. The labels are attached eagerly as
    coordinates (they need only the geometry, not the pixels).

    Args:
        n_images: number of images (int >= 1).
        size, seed, config: as in :func:`generate_lines`.
        chunks: samples per dask chunk (int >= 1).

    Returns:
        DataArray of dims ``("sample", "y", "x")``, float32, with coords ``sample`` (the
        indices), ``orientation`` and ``n_lines`` on ``sample``.

    Example:
        >>> da = lines_dataarray(4, size=64, chunks=2)
        >>> da.dims, da.data.chunks[0]
        (('sample', 'y', 'x'), (2, 2))
    """
    import dask.array as dsa
    import xarray as xr

    if not _is_int(n_images) or n_images < 1:
        raise ValueError(f"n_images must be an int >= 1, got {n_images!r}")
    if not _is_int(chunks) or chunks < 1:
        raise ValueError(f"chunks must be an int >= 1, got {chunks!r}")
    cfg = _resolve(size, config)  # validates size and config up front
    seed = _check_seed(seed)
    indices = dsa.arange(n_images, chunks=chunks, dtype=np.int64)
    data = dsa.map_blocks(
        _draw_block,
        indices,
        size=cfg.size,
        seed=seed,
        config=config,
        new_axis=[1, 2],
        chunks=(indices.chunks[0], (cfg.size,), (cfg.size,)),
        dtype=np.float32,
        meta=np.empty((0, 0, 0), dtype=np.float32),
        name=f"lines-s{cfg.size}-seed{seed}-{cfg.key()}-n{n_images}-c{chunks}",
    )
    orientation, n_lines = lines_labels(range(n_images), size=size, seed=seed, config=config)
    return xr.DataArray(
        data,
        dims=("sample", "y", "x"),
        coords={
            "sample": np.arange(n_images, dtype=np.int64),
            "orientation": ("sample", orientation),
            "n_lines": ("sample", n_lines),
        },
        name="lines",
        attrs={"line_value": LINE, "background_value": BACKGROUND, "seed": seed, "size": cfg.size},
    )


def train_val_split(n_images, val_fraction=0.3, seed=127):
    """Random train/validation split of ``range(n_images)`` (the authors' 70/30 with seed 127).

    Args:
        n_images: number of images (int >= 2).
        val_fraction: fraction in (0, 1) sent to validation (rounded, at least 1 each side).
        seed: seed of the permutation.

    Returns:
        ``(train_indices, val_indices)``: sorted, disjoint int64 arrays covering ``range(n_images)``.

    Example:
        >>> tr, va = train_val_split(10)
        >>> len(tr), len(va)
        (7, 3)
    """
    if not _is_int(n_images) or n_images < 2:
        raise ValueError(f"n_images must be an int >= 2, got {n_images!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real) or not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    seed = _check_seed(seed)
    n_val = min(n_images - 1, max(1, int(round(n_images * float(val_fraction)))))
    perm = np.random.default_rng(seed).permutation(n_images)
    return np.sort(perm[n_val:]).astype(np.int64), np.sort(perm[:n_val]).astype(np.int64)
