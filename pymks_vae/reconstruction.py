"""Microstructures drawn from two-point statistics: a per-sample search.

A :class:`~pymks_vae.models.stats_vae.StatsVAE` decodes statistics, not images. To see a
reconstruction, a drawing is searched whose statistics match the decoded ones - the
microstructure-reconstruction step of statistics-based materials design. :func:`draw_strokes`
searches drawings of dark axis-aligned bars (the lines experiment's
:class:`~pymks_vae.models.decoder.StrokeDecoder` without its network): Adam on the bars' numbers
from several random starts, keeping the start whose statistics come closest. The search sees
only the statistics it is given. Periodic statistics do not see where a drawing sits, so each
result is rolled periodically to put an empty row and column at its edges
(:func:`roll_to_gaps`): a bar is then never cut in two by the image edge.

Example:
    >>> import torch
    >>> from pymks_vae.losses import SpatialStatsLoss
    >>> from pymks_vae.reconstruction import draw_strokes
    >>> x = torch.ones(2, 1, 24, 24); x[:, :, 5:7, 3:20] = 0       # one horizontal bar each
    >>> loss = SpatialStatsLoss(indicator="straight_through", cutoff=None).calibrate(torch.cat([x, x.transpose(2, 3)]))
    >>> drawn, err = draw_strokes(loss.target_statistics(x), loss, image_size=24, restarts=2, steps=100)
    >>> tuple(drawn.shape), sorted(torch.unique(drawn).tolist())
    ((2, 1, 24, 24), [0.0, 1.0])
"""
import numbers

import numpy as np
import torch

from pymks_vae.losses import SpatialStatsLoss
from pymks_vae.models.decoder import StrokeDecoder
from pymks_vae.models.shapes import image_hw

__all__ = ["draw_strokes", "roll_to_gaps"]


def roll_to_gaps(images, level=0.5):
    """Each image rolled periodically so that a row and a column without dark pixels sit at its edges.

    Args:
        images: numpy array ``(n, H, W)``; dark means below ``level``.
        level: the darkness threshold.

    Returns:
        a new array of the same shape (an image dark in every row or column is rolled along the
        other axis only, or not at all).

    Example:
        >>> img = np.ones((1, 4, 4)); img[0, 0, :] = 0; img[0, 3, :] = 0   # one bar across the edge
        >>> roll_to_gaps(img)[0, :, 0].tolist()
        [1.0, 1.0, 0.0, 0.0]
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must be (n, H, W), got shape {images.shape}")
    out = images.copy()
    for i, img in enumerate(images):
        dark = img < level
        rows, cols = np.flatnonzero(~dark.any(1)), np.flatnonzero(~dark.any(0))
        out[i] = np.roll(img, (-rows[0] if rows.size else 0, -cols[0] if cols.size else 0), axis=(0, 1))
    return out


def _count(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def draw_strokes(statistics, loss, *, image_size, n_strokes=6, restarts=4, steps=400, lr=0.05, seed=0,
                 batch_size=32, progress=False):
    """Black-and-white drawings of bars whose statistics match ``statistics``, one per sample.

    Args:
        statistics: target statistics ``(n, n_pairs, *window)``, as :meth:`loss.statistics
            <pymks_vae.losses.SpatialStatsLoss.statistics>` returns them for ``image_size`` images
            (decoded by a :class:`~pymks_vae.models.stats_vae.StatsVAE`, or an image's own).
        loss: the calibrated one-phase :class:`~pymks_vae.losses.SpatialStatsLoss` that defines the
            statistics (its indicator, window, centring); the search lowers the squared difference
            of statistics scaled as its variance convention scales them.
        image_size: int or ``(H, W)`` of the drawings.
        n_strokes: bars per drawing (each may vanish).
        restarts: random starts per sample; the lowest final error is kept.
        steps, lr: Adam steps and learning rate of each search.
        seed: seed of the random starts (the same seed gives the same drawings).
        batch_size: samples searched together (times ``restarts`` drawings).
        progress: show a tqdm bar over the batches.

    Returns:
        ``(drawings, errors)``: float32 tensor ``(n, 1, H, W)`` of 0 (the phase) and 1, rolled by
        :func:`roll_to_gaps`; the final error of each kept drawing ``(n,)``.

    Raises:
        TypeError / ValueError: bad arguments, or ``statistics`` not of the loss's shape.

    Example:
        >>> import torch
        >>> from pymks_vae.losses import SpatialStatsLoss
        >>> x = torch.ones(1, 1, 16, 16); x[:, :, 3:13, 7:9] = 0       # one vertical bar
        >>> loss = SpatialStatsLoss(indicator="straight_through", cutoff=None).calibrate(torch.cat([x, x.transpose(2, 3)]))
        >>> drawn, err = draw_strokes(loss.target_statistics(x), loss, image_size=16, n_strokes=2,
        ...                           restarts=2, steps=50)
        >>> tuple(drawn.shape), tuple(err.shape)
        ((1, 1, 16, 16), (1,))
    """
    if not isinstance(loss, SpatialStatsLoss):
        raise TypeError(f"loss must be a SpatialStatsLoss, got {type(loss).__name__}")
    if loss.needs_calibration:
        raise ValueError("loss must be calibrated (SpatialStatsLoss.calibrate) before drawing from statistics")
    if len(loss.states) != 1 or len(loss.correlations) != 1:
        raise ValueError(f"draw_strokes draws one phase: loss must have one state and one pair, got "
                         f"states={loss.states}, correlations={loss.correlations}")
    h, w = image_hw(image_size, owner="draw_strokes")
    n_strokes, restarts = _count(n_strokes, "n_strokes"), _count(restarts, "restarts")
    steps, batch_size = _count(steps, "steps", 0), _count(batch_size, "batch_size")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not lr > 0:
        raise ValueError(f"lr must be a number > 0, got {lr!r}")
    if not isinstance(statistics, torch.Tensor) or not statistics.is_floating_point():
        raise TypeError("statistics must be a floating point tensor (n, n_pairs, *window)")
    want = tuple(loss.statistics(torch.ones(1, 1, h, w)).shape[1:])
    if statistics.ndim != 1 + len(want) or tuple(statistics.shape[1:]) != want or statistics.shape[0] == 0:
        raise ValueError(f"statistics has shape {tuple(statistics.shape)}; this loss's statistics of {h}x{w} images "
                         f"are (n, {', '.join(map(str, want))})")
    target = statistics.detach().to(device="cpu", dtype=torch.float32)
    n = target.shape[0]
    dec = StrokeDecoder(latent_dim=1, image_size=(h, w), n_strokes=n_strokes)
    for p in dec.parameters():
        p.requires_grad_(False)
    scale2 = loss.scale_ ** 2
    starts = torch.randn(n, restarts, n_strokes * StrokeDecoder.N_PARAMS,
                         generator=torch.Generator().manual_seed(int(seed)))

    def error(raw, tgt):
        f = loss.statistics(loss.indicators(dec.draw(raw)))
        return (f - tgt).pow(2).flatten(1).mean(1) * scale2

    drawings, errors = [], []
    chunks = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="drawing from statistics", unit="batch")
    for s in chunks:
        tgt = target[s : s + batch_size].repeat_interleave(restarts, 0)
        raw = starts[s : s + batch_size].reshape(-1, starts.shape[-1]).clone().requires_grad_(True)
        opt = torch.optim.Adam([raw], lr=float(lr))
        for _ in range(steps):
            opt.zero_grad()
            error(raw, tgt).sum().backward()
            opt.step()
        with torch.no_grad():
            # Two candidates per start: the drawing as searched, and the same bars each turned wholly
            # horizontal or vertical (a bar whose orientation weight stayed between the two draws a
            # cross-shaped knob at one half); the one whose statistics come closer is kept.
            cands = [(dec.draw(raw) >= 0.5).to(torch.float32)]  # the phase the hard indicator sees
            dec.straight_through = ("orientation",)
            cands.append((dec.draw(raw) >= 0.5).to(torch.float32))
            dec.straight_through = ()
            drawn = torch.stack(cands, 1).view(-1, restarts * len(cands), 1, h, w)
            err = torch.stack([(loss.statistics(loss.indicators(c)) - tgt).pow(2).flatten(1).mean(1) * scale2
                               for c in cands], 1).view(-1, restarts * len(cands))
            best = err.argmin(1)
            k = torch.arange(best.shape[0])
            drawings.append(drawn[k, best])
            errors.append(err[k, best])
    out = torch.cat(drawings)
    out = torch.from_numpy(roll_to_gaps(out[:, 0].numpy()))[:, None]
    return out, torch.cat(errors)
