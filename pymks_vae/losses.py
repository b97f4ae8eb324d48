"""VAE losses: the spatial-statistics loss of the paper, the data-space (vanilla) loss, and KL.

Every loss is a callable ``loss(x_hat, x, mu, logvar) -> (total, parts)``: ``total`` is a scalar
tensor, the per-sample sums of squared errors (SSE) plus ``beta * KL`` summed over the batch (as
the paper's authors did), and ``parts`` a dict of detached scalar tensors (``"stats"`` or
``"data"``, and ``"kl"``) for logging.

Example:
    >>> import torch
    >>> from pymks_vae.losses import SpatialStatsLoss
    >>> x = (torch.rand(2, 1, 16, 16) > 0.5).float()
    >>> x_hat = torch.rand(2, 1, 16, 16, requires_grad=True)
    >>> total, parts = SpatialStatsLoss()(x_hat, x, torch.zeros(2, 9), torch.zeros(2, 9))
    >>> total.backward(); sorted(parts)
    ['kl', 'stats']
"""
import math
import numbers

import numpy as np
import torch

from pymks_vae import ops

__all__ = ["kl_divergence", "SpatialStatsLoss", "DataSpaceLoss", "stats_scale_from_data"]

_REDUCTIONS = ("sum", "mean", "none")


def _check_weight(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_posterior(mu, logvar):
    for name, t in (("mu", mu), ("logvar", logvar)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if mu.shape != logvar.shape or mu.ndim != 2:
        raise ValueError(
            f"mu and logvar must both have shape (batch, latent_dim); got {tuple(mu.shape)} and {tuple(logvar.shape)}"
        )


def kl_divergence(mu, logvar, reduction="sum"):
    """KL divergence of ``N(mu, exp(logvar))`` from the standard normal prior.

    ``KL = -0.5 * sum(1 + logvar - mu^2 - exp(logvar))`` over the latent dimensions, per sample.

    Args:
        mu, logvar: tensors ``(batch, latent_dim)``.
        reduction: ``"sum"`` over the batch, ``"mean"`` over the batch, or ``"none"`` (``(batch,)``).

    Returns:
        a scalar tensor, or ``(batch,)`` for ``"none"``.

    Example:
        >>> float(kl_divergence(torch.zeros(3, 9), torch.zeros(3, 9)))
        0.0
    """
    _check_posterior(mu, logvar)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    per_sample = -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    return per_sample


def _check_pair(x_hat, x):
    for name, t in (("x_hat", x_hat), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat shape {tuple(x_hat.shape)} differs from x shape {tuple(x.shape)}")
    if x.ndim < 3:
        raise ValueError(f"x must have shape (batch, channels, *spatial), got {tuple(x.shape)}")


class SpatialStatsLoss:
    """The paper's loss: SSE between two-point statistics plus ``beta`` times the KL divergence.

    ``total = alpha * sum_b sum_{pairs, r} (scale * (f(x_hat_b) - f(x_b)))**2 + beta * KL``.

    Phase indicators: for one-channel grey images, the soft indicator
    ``exp(-(x - h)^2 / (2 eps^2))`` of each state ``h`` in ``states``
    (:func:`pymks_vae.ops.soft_indicator`); the target's indicator is computed without gradient
    (and, with ``soft=False``, is the hard ``|x - h| <= eps`` instead). For multi-channel inputs
    (phase probabilities), the channels themselves are the indicators and ``states`` is ignored.

    Args:
        states: grey values of the phases in ``correlations`` (default ``(0.0,)``: the lines).
        eps: width of the soft indicator (0.25, the paper's).
        correlations: pairs of phase indices (into ``states``, or into the channels).
        scale: multiplies the statistics: the paper's min/max normalisation of f, whose offset
            cancels in the difference; see :func:`stats_scale_from_data`.
        alpha: weight of the statistics term.
        beta: weight of the KL term.
        soft: soft (True) or hard (False) indicator for the target.
        periodic: periodic statistics (the paper) or zero padding with overlap normalisation.
        cutoff: None (the paper: every lag) or the largest lag compared along each axis; values
            above ``(N - 1) // 2`` are clipped to it (PyMKS's convention).

    Example:
        >>> loss = SpatialStatsLoss(scale=4.0, beta=0.5)
        >>> x = torch.ones(1, 1, 8, 8)
        >>> float(loss(x, x, torch.zeros(1, 2), torch.zeros(1, 2))[0])
        0.0
    """

    def __init__(self, states=(0.0,), eps=0.25, correlations=((0, 0),), scale=1.0, alpha=1.0, beta=1.0, soft=True,
                 periodic=True, cutoff=None):
        try:
            self.states = tuple(float(h) for h in states)
        except (TypeError, ValueError):
            raise TypeError(f"states must be a sequence of numbers, got {states!r}") from None
        if not self.states or not all(math.isfinite(h) for h in self.states):
            raise ValueError(f"states must be a non-empty sequence of finite numbers, got {states!r}")
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not (math.isfinite(eps) and eps > 0):
            raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
        self.eps = float(eps)
        if isinstance(correlations, (str, bytes)):
            raise TypeError(f"correlations must be a sequence of (i, j) pairs, got {correlations!r}")
        try:
            self.correlations = tuple((int(i), int(j)) for i, j in correlations)
        except (TypeError, ValueError):
            raise TypeError(f"correlations must be a sequence of (i, j) pairs of ints, got {correlations!r}") from None
        if not self.correlations:
            raise ValueError("correlations must hold at least one (i, j) pair")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)
        self.alpha = _check_weight(alpha, "alpha")
        self.beta = _check_weight(beta, "beta")
        if not isinstance(soft, bool):
            raise TypeError(f"soft must be True or False, got {soft!r}")
        self.soft = soft
        if not isinstance(periodic, bool):
            raise TypeError(f"periodic must be True or False, got {periodic!r}")
        self.periodic = periodic
        if cutoff is not None and (isinstance(cutoff, bool) or not isinstance(cutoff, numbers.Integral) or cutoff < 0):
            raise ValueError(f"cutoff must be None or an int >= 0, got {cutoff!r}")
        self.cutoff = None if cutoff is None else int(cutoff)

    def __repr__(self):
        return (f"SpatialStatsLoss(states={self.states}, eps={self.eps}, correlations={self.correlations}, "
                f"scale={self.scale:g}, alpha={self.alpha:g}, beta={self.beta:g}, soft={self.soft}, "
                f"periodic={self.periodic}, cutoff={self.cutoff})")

    def indicators(self, x, target=False):
        """Phase indicators ``(batch, n_phase, *spatial)`` of ``x`` (see the class docstring)."""
        if x.shape[1] > 1:
            return x
        if target and not self.soft:
            h = torch.tensor(self.states, dtype=x.dtype, device=x.device).reshape((1, -1) + (1,) * (x.ndim - 2))
            return ((x - h).abs() <= self.eps).to(x.dtype)
        return ops.soft_indicator(x, self.states, self.eps)

    def stats_error(self, x_hat, x, reduction="sum"):
        """The statistics term alone (without ``alpha``): per-sample SSE, reduced."""
        _check_pair(x_hat, x)
        with torch.no_grad():
            target = self.indicators(x.to(x_hat.dtype), target=True)
        cutoff = self.cutoff
        if cutoff is not None:
            cutoff = min(cutoff, (min(x.shape[2:]) - 1) // 2)
        return ops.spatial_stats_loss(self.indicators(x_hat), target.detach(), correlations=self.correlations,
                                      periodic=self.periodic, cutoff=cutoff, scale=self.scale, reduction=reduction)

    def __call__(self, x_hat, x, mu, logvar):
        _check_posterior(mu, logvar)
        stats = self.stats_error(x_hat, x)
        kl = kl_divergence(mu, logvar)
        total = self.alpha * stats + self.beta * kl
        return total, {"stats": stats.detach(), "kl": kl.detach()}


class DataSpaceLoss:
    """The vanilla VAE loss: SSE between reconstruction and input plus ``beta`` times KL.

    Args:
        beta: weight of the KL term (the paper: 1).

    Example:
        >>> x = torch.zeros(2, 1, 4, 4)
        >>> total, parts = DataSpaceLoss()(torch.ones(2, 1, 4, 4), x, torch.zeros(2, 3), torch.zeros(2, 3))
        >>> float(total), float(parts["data"])
        (32.0, 32.0)
    """

    def __init__(self, beta=1.0):
        self.beta = _check_weight(beta, "beta")

    def __repr__(self):
        return f"DataSpaceLoss(beta={self.beta:g})"

    def __call__(self, x_hat, x, mu, logvar):
        _check_pair(x_hat, x)
        _check_posterior(mu, logvar)
        data = (x_hat - x.to(x_hat.dtype)).pow(2).sum()
        kl = kl_divergence(mu, logvar)
        return data + self.beta * kl, {"data": data.detach(), "kl": kl.detach()}


def stats_scale_from_data(images, eps=0.25, states=(0.0,), correlations=((0, 0),), batch_size=256):
    """``1 / (max f - min f)`` over a sample of images: the paper's min/max normalisation of f.

    The normalisation ``(f - min) / (max - min)`` is affine, so in a difference of two statistics
    only the factor survives; pass the result as ``scale`` to :class:`SpatialStatsLoss`.

    Args:
        images: ``(n, H, W)`` grey images or ``(n, C, H, W)`` (C = 1 grey; C > 1 phase
            probabilities), numpy array or tensor.
        eps, states, correlations: as in :class:`SpatialStatsLoss`.
        batch_size: images per batch.

    Returns:
        a python float.

    Raises:
        ValueError: empty input, or statistics that are constant over the sample.

    Example:
        >>> x = torch.ones(2, 1, 8, 8); x[0, 0, :4] = 0.0      # half the pixels are phase 0
        >>> round(stats_scale_from_data(x), 4)  # f ranges from ~0 to 0.5 over the sample
        2.0
    """
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4 or x.shape[0] == 0:
        raise ValueError(f"images must have shape (n, H, W) or (n, C, H, W) with n >= 1, got {tuple(x.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    loss = SpatialStatsLoss(states=states, eps=eps, correlations=correlations, soft=True)
    lo, hi = math.inf, -math.inf
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            batch = x[s : s + batch_size].to(torch.float64)
            f = ops.two_point_stats(loss.indicators(batch, target=True), loss.correlations)
            lo, hi = min(lo, float(f.min())), max(hi, float(f.max()))
    if not hi > lo:
        raise ValueError(f"the statistics are constant ({lo}) over these images: no min/max scale exists")
    return 1.0 / (hi - lo)
