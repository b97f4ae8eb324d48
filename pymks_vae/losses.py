"""VAE losses: the spatial-statistics loss of the paper, the data-space (vanilla) loss, and KL.

Every loss is a callable ``loss(x_hat, x, mu, logvar) -> (total, parts)``: ``total`` is a scalar
tensor, a per-sample error plus ``beta * KL`` reduced over the batch as the loss's ``reduction``
says (``"batchmean"`` or ``"sum"``), and ``parts`` a dict of detached scalar tensors (``"stats"`` or
``"data"``, and ``"kl"``) for logging. :class:`SpatialStatsLoss` defaults to the variance
convention (the unexplained fraction of the statistics' variance, the same balance at every image
size); :meth:`SpatialStatsLoss.paper` is the paper's exact SSE. See docs/spatial_stats_loss.md.

Example:
    >>> import torch
    >>> from pymks_vae.losses import SpatialStatsLoss
    >>> x = (torch.rand(2, 1, 16, 16) > 0.5).float()
    >>> x_hat = torch.rand(2, 1, 16, 16, requires_grad=True)
    >>> total, parts = SpatialStatsLoss()(x_hat, x, torch.zeros(2, 9), torch.zeros(2, 9))
    >>> total.backward(); sorted(parts)
    ['kl', 'stats']
"""
import copy
import math
import numbers

import numpy as np
import torch

from pymks_vae import ops

__all__ = ["kl_divergence", "SpatialStatsLoss", "DecodedStatsLoss", "DataSpaceLoss", "LinearReadoutLoss", "stats_scale_from_data", "auto_cutoff", "DEFAULT_BETA",
           "independent_correlations"]

_REDUCTIONS = ("sum", "batchmean", "mean", "none")


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
        reduction: ``"sum"`` over the batch, ``"batchmean"`` (the per-sample sums averaged over the
            batch), ``"mean"`` (over every element, batch x latent, as PyTorch's losses) or ``"none"``
            (``(batch,)``).

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
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "mean":
        return per_sample.mean() / mu.shape[1]
    return per_sample


def _at_least_fp32(t):
    """``t`` cast up to float32 when it is a half-precision tensor (under autocast), else ``t``."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _check_pair(x_hat, x):
    for name, t in (("x_hat", x_hat), ("x", x)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x_hat.shape != x.shape:
        raise ValueError(f"x_hat shape {tuple(x_hat.shape)} differs from x shape {tuple(x.shape)}")
    if x.ndim < 3:
        raise ValueError(f"x must have shape (batch, channels, *spatial), got {tuple(x.shape)}")


NORMALISATIONS = ("variance", "minmax", "none")
INDICATORS = ("hat", "gaussian", "straight_through")
#: Default KL weight of the variance-normalised loss: one nat of latent information must buy a
#: 0.01% drop of the unexplained variance of the statistics (docs/spatial_stats_loss.md, measured).
DEFAULT_BETA = 1e-4


def _hat_width(states):
    """Half-width of each state's hat: the distance to the nearest other state (1 for one state)."""
    if len(states) == 1:
        return (1.0,)
    widths = []
    for k, h in enumerate(states):
        gaps = [abs(h - g) for j, g in enumerate(states) if j != k]
        widths.append(min(gaps))
    if min(widths) <= 0:
        raise ValueError(f"states must be distinct for the hat indicator, got {states!r}")
    return tuple(widths)


class SpatialStatsLoss:
    """The spatial-statistics VAE loss: a distance between two-point statistics plus ``beta`` x KL.

    ``total = reduce_b(alpha * E_b + beta * KL_b)``, where ``E_b`` compares the two-point
    statistics ``f`` (pairs ``correlations``, lags of the window) of the reconstruction and of the
    input of sample ``b``. Two conventions, named by ``normalise``:

    * ``"variance"`` (default): ``E_b = mean over pairs and lags of (f(x_hat) - f(x))**2 / var_f``,
      ``var_f`` the variance of ``f`` over a data set, averaged over pairs and lags (``scale =
      1 / sqrt(var_f)``, calibrated from data). ``E_b`` is the fraction of the statistics'
      variance left unexplained - 1 for a model that predicts the data set's mean statistics, 0
      for a perfect one: PCA's criterion, dimensionless, and the same for every image size,
      window, number of pairs or states. ``beta`` is then the price of one nat of latent
      information in that fraction (default :data:`DEFAULT_BETA`), the same at 32x32 and 224x224.
    * ``"minmax"`` (the paper): ``E_b = sum over pairs and lags of (scale * (f(x_hat) - f(x)))**2``
      with ``scale = 1 / (max f - min f)`` over a data set (the paper's min/max normalisation,
      whose offset cancels in the difference). Its size grows with the number of lags, so the
      balance with KL changes with the image size; use ``beta=1`` and ``reduction="sum"`` for the
      paper's exact loss (:meth:`paper`).
    * ``"none"``: the sum of ``(scale * (f(x_hat) - f(x)))**2`` with ``scale`` as given (default 1).

    ``reduction`` combines the samples: ``"batchmean"`` (default) the mean over the batch, ``"sum"``
    the sum (the paper's code); ``"none"`` returns ``(batch,)`` totals.

    Phase indicators of one-channel grey images ``x`` in [0, 1]: ``indicator="hat"`` (default) is
    PyMKS's hat basis (``PrimitiveTransformer``), ``m_h(x) = max(0, 1 - |x - h| / w_h)`` with
    ``w_h`` the distance to the nearest other state (1 for a single state): for states 0 and 1 it
    reads a sigmoid output as a phase probability, ``m_0 = 1 - x``, whose gradient never vanishes
    and whose statistics match a binary target's only when the image is binary (``f(0)`` is the
    mean of ``m**2``, the volume fraction only for ``m`` in {0, 1}). ``indicator="gaussian"`` is
    the paper's ``exp(-(x - h)^2 / (2 eps^2))``. ``indicator="straight_through"`` is the hard
    indicator of the nearest state (``|x - h| < w_h / 2``) in the forward pass and the Gaussian's
    gradient in the backward pass: the statistics are those of the thresholded image that a
    reader sees, so grey haze cannot hide mass the eye would not count, while gradients still
    flow. The input's indicators carry no gradient (with
    ``soft=False``: the hard ``|x - h| <= eps``, or ``x`` nearest to ``h`` for the hat). For
    multi-channel inputs (phase probabilities) the channels are the indicators and ``states`` is
    ignored.

    Args:
        states: grey values of the phases in ``correlations`` (default ``(0.0,)``: the lines).
        eps: width of the Gaussian indicator (0.25, the paper's) and of the hard target indicator.
        correlations: pairs of phase indices (into ``states``, or into the channels).
        normalise: ``"variance"``, ``"minmax"`` or ``"none"`` (see above).
        scale: None (calibrated: by :meth:`calibrate`, else from the first batch of inputs the loss
            sees, which needs 2 or more samples) or a number > 0 multiplying the statistics.
        alpha: weight of the statistics term.
        beta: weight of the KL term (default :data:`DEFAULT_BETA` for ``"variance"``, 1 otherwise).
        soft: soft (True) or hard (False) indicator for the target.
        periodic: periodic statistics (the paper) or zero padding with overlap normalisation.
        cutoff: ``"auto"`` (default: the window where the data's statistics carry structure,
            see :func:`auto_cutoff`, resolved by :meth:`calibrate`), None (every lag) or the
            largest lag compared along each axis; values above ``(N - 1) // 2`` are clipped to it
            (PyMKS's convention).
        indicator: ``"hat"``, ``"gaussian"`` or ``"straight_through"`` (see above).
        reduction: ``"batchmean"``, ``"sum"`` or ``"none"`` over the batch.
        centre: compare autocovariances ``f(r) - mean_i mean_j`` instead of ``f(r)`` (None: True for
            ``"variance"``, False otherwise). The volume fraction shifts every lag of ``f`` by the
            same ``mean_i mean_j``; without centring that shift holds most of the variance of ``f``
            in a data set whose volume fraction varies, and a VAE trained on it learns the volume
            fraction and little of the shape (measured: 0.51 against 1.00 test accuracy on
            ``generate_classes``, docs/spatial_stats_loss.md). ``f(0)`` still carries the fraction.
        one_point: also compare the one-point statistics, the volume fractions ``mean(m_i)`` of
            the phases in ``correlations`` (``"variance"`` only): ``E_b`` gains
            ``sum_i (mean m_i(x_hat) - mean m_i(x))**2 / var_1``, ``var_1`` their variance over
            the calibration data summed over the phases - the fraction of the volume fractions'
            variance left unexplained, weighted like the whole two-point term. Centring keeps the
            volume fraction only in ``c(0)``, one lag of the window; this term gives it back the
            weight PCA of uncentred statistics gives it, without letting it swamp the shape. When
            the fractions vary by less than one pixel over the data (``var_1 < (1 / n_pixels)**2``:
            every sample has the same composition) the term is off (``one_point_var_ = 0``).

    Attributes:
        scale_: the factor in use (None until calibrated).
        one_point_var_: ``var_1`` (None until calibrated, 0 when the term is off; only with ``one_point``).
        cutoff_: the window in use (None: every lag; unresolved until calibrated when ``"auto"``).

    Example:
        >>> x = (torch.rand(8, 1, 16, 16) > 0.5).float()
        >>> loss = SpatialStatsLoss().calibrate(x)
        >>> total, parts = loss(x, x, torch.zeros(8, 2), torch.zeros(8, 2))
        >>> float(total), sorted(parts)
        (0.0, ['kl', 'stats'])
    """

    def __init__(self, states=(0.0,), eps=0.25, correlations=((0, 0),), normalise="variance", scale=None,
                 alpha=1.0, beta=None, soft=True, periodic=True, cutoff="auto", indicator="hat",
                 reduction="batchmean", centre=None, one_point=False):
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
            pairs = tuple(tuple(p) for p in correlations)
        except TypeError:
            raise TypeError(f"correlations must be a sequence of (i, j) pairs of ints, got {correlations!r}") from None
        if not all(len(p) == 2 and all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in p)
                   for p in pairs):
            raise TypeError(f"correlations must be a sequence of (i, j) pairs of ints, got {correlations!r}")
        self.correlations = tuple((int(i), int(j)) for i, j in pairs)
        if not self.correlations:
            raise ValueError("correlations must hold at least one (i, j) pair")
        if normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
        self.normalise = normalise
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                                  or not (math.isfinite(scale) and scale > 0)):
            raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")
        self.scale = None if scale is None else float(scale)
        self.scale_ = self.scale if self.scale is not None else (1.0 if normalise == "none" else None)
        self.alpha = _check_weight(alpha, "alpha")
        if beta is None:
            beta = DEFAULT_BETA if normalise == "variance" else 1.0
        self.beta = _check_weight(beta, "beta")
        if not isinstance(soft, bool):
            raise TypeError(f"soft must be True or False, got {soft!r}")
        self.soft = soft
        if not isinstance(periodic, bool):
            raise TypeError(f"periodic must be True or False, got {periodic!r}")
        self.periodic = periodic
        if isinstance(cutoff, str) and cutoff == "auto":
            self.cutoff = "auto"
            self._window_resolved = False
            self.cutoff_ = None
        else:
            if cutoff is not None and (isinstance(cutoff, bool) or not isinstance(cutoff, numbers.Integral)
                                       or cutoff < 0):
                raise ValueError(f"cutoff must be 'auto', None or an int >= 0, got {cutoff!r}")
            self.cutoff = self.cutoff_ = None if cutoff is None else int(cutoff)
            self._window_resolved = True
        if indicator not in INDICATORS:
            raise ValueError(f"indicator must be one of {INDICATORS}, got {indicator!r}")
        self.indicator = indicator
        self._widths = _hat_width(self.states) if indicator != "gaussian" else None
        if reduction not in ("batchmean", "sum", "none"):
            raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction
        if centre is None:
            centre = normalise == "variance"
        if not isinstance(centre, bool):
            raise TypeError(f"centre must be None, True or False, got {centre!r}")
        self.centre = centre
        if not isinstance(one_point, bool):
            raise TypeError(f"one_point must be True or False, got {one_point!r}")
        if one_point and normalise != "variance":
            raise ValueError(f"one_point=True needs normalise='variance' (its own variance scales it), got {normalise!r}")
        self.one_point = one_point
        self.one_point_var_ = None
        self._one_point_states = sorted({i for p in self.correlations for i in p})

    @classmethod
    def paper(cls, scale, states=(0.0,), eps=0.25):
        """The paper's loss: SSE of min/max-scaled statistics (Gaussian indicator) + KL, summed over the batch.

        Example:
            >>> SpatialStatsLoss.paper(scale=5.0)
            SpatialStatsLoss(normalise='minmax', indicator='gaussian', states=(0.0,), eps=0.25, correlations=((0, 0),), scale_=5, alpha=1, beta=1, reduction='sum', centre=False, periodic=True, cutoff=None, cutoff_=None)
        """
        return cls(states=states, eps=eps, normalise="minmax", scale=scale, beta=1.0, indicator="gaussian",
                   reduction="sum", cutoff=None)

    def __repr__(self):
        scale = "None" if self.scale_ is None else f"{self.scale_:g}"
        return (f"SpatialStatsLoss(normalise={self.normalise!r}, indicator={self.indicator!r}, "
                f"states={self.states}, eps={self.eps}, correlations={self.correlations}, scale_={scale}, "
                f"alpha={self.alpha:g}, beta={self.beta:g}, reduction={self.reduction!r}, centre={self.centre}, "
                f"periodic={self.periodic}, cutoff={self.cutoff!r}, cutoff_={self.cutoff_}"
                + (f", one_point=True, one_point_var_={self.one_point_var_}" if self.one_point else "") + ")")

    def indicators(self, x, target=False):
        """Phase indicators ``(batch, n_phase, *spatial)`` of ``x`` (see the class docstring)."""
        if x.shape[1] > 1:
            return x
        # State by state with python floats: a tensor of the states built here would be copied from
        # the host on every call (a GPU waits for it, and a CUDA graph cannot capture it).
        states = self.states
        if target and not self.soft:
            if self.indicator != "gaussian":  # each value to its nearest state
                dist = torch.cat([(x - h).abs() for h in states], dim=1)
                nearest = dist.argmin(dim=1, keepdim=True)
                return torch.cat([(nearest == k).to(x.dtype) for k in range(len(states))], dim=1)
            return torch.cat([((x - h).abs() <= self.eps).to(x.dtype) for h in states], dim=1)
        if self.indicator == "gaussian":
            return ops.soft_indicator(x, states, self.eps)
        if self.indicator == "hat":
            return torch.cat([torch.clamp(1.0 - (x - h).abs() / w, min=0.0) for h, w in zip(states, self._widths)],
                             dim=1)
        soft = ops.soft_indicator(x, states, self.eps)
        hard = torch.cat([((x - h).abs() < 0.5 * w).to(x.dtype) for h, w in zip(states, self._widths)], dim=1)
        return hard + (soft - soft.detach())

    def _cutoff(self, x):
        if self.cutoff_ is None:
            return None
        return min(self.cutoff_, (min(x.shape[2:]) - 1) // 2)

    def _phase_means(self, m):
        """Volume fractions ``(batch, n)`` of the phases that appear in ``correlations``, in increasing order."""
        mu = m.flatten(2).mean(2)
        return torch.stack([mu[:, i] for i in self._one_point_states], dim=1)

    def _mean_products(self, m):
        """``mean(m_i) * mean(m_j)`` per sample and pair, ``(batch, n_pairs)``: the statistics' far level."""
        mu = m.flatten(2).mean(2)
        # indexed by python ints, not index tensors built on the host (see indicators)
        return torch.stack([mu[:, i] * mu[:, j] for i, j in self.correlations], dim=1)

    def statistics(self, m):
        """The compared statistics ``(batch, n_pairs, *window)`` of indicators ``m``: two-point
        statistics, minus ``mean(m_i) mean(m_j)`` (the autocovariance) when ``centre``."""
        f = ops.two_point_stats(m, self.correlations, periodic=self.periodic, cutoff=self._cutoff(m))
        if self.centre:
            f = f - self._mean_products(m).reshape(f.shape[:2] + (1,) * (f.ndim - 2))
        return f

    def target_statistics(self, x):
        """The compared statistics of the inputs ``x`` (their indicators, no gradient); see :meth:`statistics`."""
        with torch.no_grad():
            return self.statistics(self.indicators(x, target=True))

    def calibrate(self, images, batch_size=256):
        """Set ``cutoff_`` (when ``"auto"``) and ``scale_`` from a sample of inputs; returns self.

        Args:
            images: tensor or numpy array ``(n, C, *spatial)`` (or ``(n, *spatial)`` for one
                channel), n >= 2 for the variance, as the loss's inputs.
            batch_size: samples per batch of the computation.

        Returns:
            self.

        Raises:
            ValueError: too few samples, or statistics constant over the sample.
        """
        if not self._window_resolved:
            self.cutoff_ = auto_cutoff(images, loss=self, batch_size=batch_size)
            self._window_resolved = True
        if self.one_point and self.one_point_var_ is None:
            self.one_point_var_ = self._one_point_variance(images, batch_size)
        if self.normalise == "none" or self.scale is not None:  # a scale the user gave is kept
            return self
        self.scale_ = stats_scale_from_data(images, normalise=self.normalise, loss=self, batch_size=batch_size)
        return self

    def _one_point_variance(self, images, batch_size):
        x = _as_images(images)
        if x.shape[0] < 2:
            raise ValueError(f"the variance of the volume fractions needs 2 or more images, got {x.shape[0]}")
        with torch.no_grad():
            mu = torch.cat([self._phase_means(self.indicators(x[s : s + batch_size].to(torch.float64), target=True))
                            for s in range(0, x.shape[0], batch_size)])
        var = float(mu.var(0).sum())
        # Below one pixel's worth of spread every sample has the same composition: nothing to explain.
        return var if var >= (1.0 / math.prod(x.shape[2:])) ** 2 else 0.0

    @property
    def needs_calibration(self):
        """True until :meth:`calibrate` (or the first batch) has fixed ``scale_``, ``cutoff_``
        (and ``one_point_var_`` with ``one_point``)."""
        return (self.scale_ is None or not self._window_resolved
                or (self.one_point and self.one_point_var_ is None))

    def stats_error(self, x_hat, x, reduction="batchmean"):
        """The statistics term ``E`` alone (without ``alpha``), reduced over the batch.

        Statistics are computed in float32 at least, outside any ``torch.autocast`` region: a
        network running in bfloat16/float16 hands over its reconstruction, which is cast up here
        (differentiably), so the FFTs and the squared differences keep full precision.

        Args:
            x_hat, x: reconstruction and input, ``(batch, C, *spatial)``.
            reduction: ``"batchmean"``, ``"sum"`` or ``"none"``.

        Returns:
            a scalar tensor (``(batch,)`` for ``"none"``), float32 or float64.
        """
        _check_pair(x_hat, x)
        if self.needs_calibration:
            self.calibrate(x.detach())
        with torch.autocast(x_hat.device.type, enabled=False):
            return self._stats_error(_at_least_fp32(x_hat), x, reduction)

    def _stats_error(self, x_hat, x, reduction):
        with torch.no_grad():
            target = self.indicators(x.to(x_hat.dtype), target=True).detach()
        m_hat = self.indicators(x_hat)
        cutoff = self._cutoff(x)
        if (self.periodic and cutoff is None) or not self.centre:
            # the fused kernel (periodic, every lag); centring then only removes a per-sample constant:
            # sum_r (df(r) - dc)^2 = sum_r df(r)^2 - S dc^2, since sum_r f(r) = S mean_i mean_j exactly.
            per_sample = ops.spatial_stats_loss(m_hat, target, correlations=self.correlations, periodic=self.periodic,
                                                cutoff=cutoff, scale=self.scale_, reduction="none")
            if self.centre:
                dc = self._mean_products(m_hat) - self._mean_products(target)
                per_sample = per_sample - self.scale_**2 * math.prod(x.shape[2:]) * dc.pow(2).sum(1)
        else:
            # a window or zero padding with centring: the general fused kernel, the centring terms
            # subtracted per sample and pair inside it (differentiable through the offset)
            offset = self._mean_products(m_hat) - self._mean_products(target)
            per_sample = ops.spatial_stats_loss(m_hat, target, correlations=self.correlations, periodic=self.periodic,
                                                cutoff=cutoff, scale=self.scale_, reduction="none", offset=offset)
        if self.normalise == "variance":
            window = x.shape[2:] if cutoff is None else (2 * cutoff + 1,) * (x.ndim - 2)
            per_sample = per_sample / (len(self.correlations) * math.prod(window))
        if self.one_point and self.one_point_var_:
            d1 = self._phase_means(m_hat) - self._phase_means(target)
            per_sample = per_sample + d1.pow(2).sum(1) / self.one_point_var_
        return _reduce(per_sample, reduction)

    def __call__(self, x_hat, x, mu, logvar):
        _check_posterior(mu, logvar)
        stats = self.stats_error(x_hat, x, reduction="none")
        kl = kl_divergence(_at_least_fp32(mu), _at_least_fp32(logvar), reduction="none")
        total = _reduce(self.alpha * stats + self.beta * kl, self.reduction)
        return total, {"stats": _reduce(stats, self.reduction).detach(), "kl": _reduce(kl, self.reduction).detach()}


class DecodedStatsLoss:
    """The loss of a VAE that decodes statistics (:class:`~pymks_vae.models.stats_vae.StatsVAE`).

    ``total = reduce_b(alpha * E_b + beta * KL_b)`` with ``E_b = mean over statistics of
    ((f_hat - f) * scale)**2``: with ``scale`` of a calibrated variance-convention
    :class:`SpatialStatsLoss` (``from_loss``) it is the same fraction of unexplained variance, so
    ``beta`` (default :data:`DEFAULT_BETA`) keeps its meaning, the price of one nat.

    Args:
        scale: factor on the statistics' differences (a number > 0; ``1 / sqrt(var_f)`` for the
            variance convention).
        alpha, beta: weights of the statistics and KL terms.
        reduction: ``"batchmean"`` (default), ``"sum"`` or ``"none"`` over the batch.

    Example:
        >>> f = torch.randn(4, 1, 5, 5)
        >>> total, parts = DecodedStatsLoss(scale=2.0)(f + 0.5, f, torch.zeros(4, 2), torch.zeros(4, 2))
        >>> round(float(parts["stats"]), 6), float(parts["kl"])
        (1.0, 0.0)
    """

    def __init__(self, scale, alpha=1.0, beta=None, reduction="batchmean"):
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.scale = float(scale)
        self.alpha = _check_weight(alpha, "alpha")
        self.beta = _check_weight(DEFAULT_BETA if beta is None else beta, "beta")
        if reduction not in ("batchmean", "sum", "none"):
            raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")
        self.reduction = reduction

    @classmethod
    def from_loss(cls, loss, **kwargs):
        """The decoded-statistics loss with the scale of a calibrated variance-convention :class:`SpatialStatsLoss`."""
        if not isinstance(loss, SpatialStatsLoss):
            raise TypeError(f"loss must be a SpatialStatsLoss, got {type(loss).__name__}")
        if loss.normalise != "variance" or loss.needs_calibration or loss.one_point:
            raise ValueError("loss must be a calibrated SpatialStatsLoss of the variance convention without one_point")
        kwargs.setdefault("beta", loss.beta)
        kwargs.setdefault("alpha", loss.alpha)
        return cls(scale=loss.scale_, **kwargs)

    def __repr__(self):
        return f"DecodedStatsLoss(scale={self.scale:g}, alpha={self.alpha:g}, beta={self.beta:g}, reduction={self.reduction!r})"

    def stats_error(self, f_hat, f, reduction="batchmean"):
        """``E`` alone (without ``alpha``) between statistics ``f_hat`` and ``f`` of one shape ``(batch, ...)``."""
        for name, t in (("f_hat", f_hat), ("f", f)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.ndim < 2:
                raise TypeError(f"{name} must be a floating point tensor (batch, ...), got "
                                f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if f_hat.shape != f.shape:
            raise ValueError(f"f_hat {tuple(f_hat.shape)} and f {tuple(f.shape)} must have the same shape")
        d = (_at_least_fp32(f_hat) - f.to(_at_least_fp32(f_hat).dtype)) * self.scale
        return _reduce(d.pow(2).flatten(1).mean(1), reduction)

    def __call__(self, f_hat, f, mu, logvar):
        _check_posterior(mu, logvar)
        stats = self.stats_error(f_hat, f, reduction="none")
        kl = kl_divergence(_at_least_fp32(mu), _at_least_fp32(logvar), reduction="none")
        total = _reduce(self.alpha * stats + self.beta * kl, self.reduction)
        return total, {"stats": _reduce(stats, self.reduction).detach(), "kl": _reduce(kl, self.reduction).detach()}


#: :func:`auto_cutoff` keeps every lag where the mean autocovariance exceeds this fraction of its peak.
AUTO_CUTOFF_LEVEL = 0.05


def _as_images(images):
    x = images.detach().cpu() if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images))
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim < 3 or x.shape[0] == 0:
        raise ValueError(f"images must have shape (n, H, W) or (n, C, *spatial) with n >= 1, got {tuple(x.shape)}")
    return x


def auto_cutoff(images, loss=None, level=AUTO_CUTOFF_LEVEL, batch_size=256):
    """The lag window that holds the structure of a data set's two-point statistics.

    Over the images, the mean statistics ``m(r)`` of each pair are compared with their level far
    away (their median over all lags: most lags are far ones): the window is the smallest
    ``(2c+1)^d`` cube holding every lag where ``|m(r) - median m|`` exceeds ``level`` times its
    largest value. (Not the mean over the lags: a sample's autocovariance sums to zero over a
    periodic field, so on a small field the far lags sit below zero by the near lags' mass over
    the field's size, and measured from zero they all looked like structure: the whole field was
    kept for 32x32 random fields, a window of 8 px now, as at 48x48 to 128x128.) Beyond it single samples differ only by sampling noise, which no
    latent code can predict; a loss dominated by those lags (the full field of small-grained
    microstructures holds 5-10x more noise variance than structure) teaches the VAE nothing.

    Args:
        images: as :func:`stats_scale_from_data`.
        loss: a :class:`SpatialStatsLoss` whose indicators, pairs and boundary are used (None: the
            autocorrelation of state 0 of one-channel images, hat indicator).
        level: the fraction of the peak that counts as structure (default :data:`AUTO_CUTOFF_LEVEL`).
        batch_size: images per batch of the computation.

    Returns:
        an int ``c``, or None when the window is the whole field.

    Example:
        >>> x = torch.zeros(4, 1, 32, 32); x[:, :, :, 10:13] = 1.0    # thin stripes: structure along y only
        >>> auto_cutoff(1.0 - x) is None                              # ... but at every lag along it
        True
    """
    x = _as_images(images)
    if loss is None:
        loss = SpatialStatsLoss(cutoff=None, scale=1.0)
    full = copy.copy(loss)
    full.cutoff_ = None
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            f = full.target_statistics(x[s : s + batch_size].to(torch.float64))
            total = total + f.sum(0)
            n += f.shape[0]
    mean = total / n
    flat = mean.flatten(1)
    dev = (flat - flat.median(1, keepdim=True).values).abs()
    peak = dev.max(1, keepdim=True).values
    keep = (dev > level * peak.clamp_min(1e-300)).reshape(mean.shape).any(0)
    spatial = tuple(mean.shape[1:])
    idx = torch.nonzero(keep)
    if idx.numel() == 0:
        return 0
    centre = torch.tensor([s // 2 for s in spatial])
    c = int((idx - centre).abs().max())
    if c >= (min(spatial) - 1) // 2:
        return None
    return c


def _reduce(per_sample, reduction):
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "batchmean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'batchmean', 'sum' or 'none', got {reduction!r}")


class LinearReadoutLoss:
    """A VAE loss plus a linear read-out of the statistics from the latent means.

    ``total = base + weight * R``. ``s_b`` are the statistics that ``model``'s
    :class:`~pymks_vae.models.encoders.StatsEncoder` reads from ``x_b`` (the two-point statistics
    in its window, then its one-point statistics if it reads them), centred with the encoder's own
    running batch-norm means and divided by a scale (no gradient); ``W, c`` the read-out map
    (solved on each batch or trained, ``head`` below; kept in the model's ``stats_head``);
    ``e_b = (W mu_b + c - s_b)^2``.

    * ``scaling="pareto"`` (default): statistic ``k`` divided by ``sqrt(sd_k * sd)``, its own
      running standard deviation ``sd_k`` times their common scale ``sd`` (the root of their mean
      running variance): each statistic weighs by its standard deviation - Pareto scaling, the
      compromise of chemometrics' PCA between the two others. ``"global"``: one scale ``sd`` for
      all, each statistic weighs by its variance (PCA's criterion on the raw statistics; the
      high-variance short lags dominate). ``"lag"``: each standardised on its own, every lag
      weighs the same (weak long lags included). Measured in docs/pymks.md: ``"lag"`` loses the
      random fields' correlation length at latent size 2, ``"global"`` the lamellar spacing.
    * ``R_b = (1 - one_point_share) * mean(e_b over the two-point statistics) + one_point_share *
      mean(e_b over the one-point statistics)`` when the encoder reads one-point statistics, else
      the mean of ``e_b``. Why a share: a window drops the long lags, whose values tend to the
      product of the phase fractions; in a full-field PCA they carry the phase fractions with
      most of the variance. The share gives that information back at a weight that does not
      depend on the image size; 0.8 by default, so that the top components of this target hold
      the fractions as well as a full-field PCA does (docs/spatial_stats_loss.md).

    ``R`` is the part of the statistics that a *linear* map of the latent leaves unexplained - the
    criterion PCA minimises - in units of the statistics' variance, the currency of the variance
    convention's statistics term.

    * ``head="batch"`` (default): ``W, c`` are the least-squares map from the batch's latent means
      to its statistics, solved in closed form on every training batch (centred normal equations,
      a ridge of ``1e-6`` of the latent's mean variance for a collapsed latent) and differentiated
      through, so ``R`` is the batch's unexplained fraction itself, at the head's optimum; the
      solution is copied into ``model.stats_head``, which evaluation-mode calls and batches with
      no more than ``latent_dim + 1`` samples (no residual left to explain) use as a fixed map;
      its parameters are set not to require gradients (the optimiser leaves them alone). In a
      distributed run each rank solves on its own share of the batch.
      Why: a head trained alongside the encoder lags behind it, and the latent settled short of
      the optimum of its own criterion (on the tuning seeds, 0.019 of the variance unexplained
      where the top two principal components of the same statistics leave 0.014; with the solved
      head 0.014; docs/spatial_stats_loss.md). ``head="learned"``: ``model.stats_head`` trained
      with the rest by the optimiser (the first release).

    Why: the image decoder is nonlinear, so without this term the latent may place samples along
    curves (classes apart, but a continuous descriptor not in order) that a linear regressor
    cannot read. The term asks the latent to also hold a linear summary of the statistics, as PCA's
    components are; measured in docs/pymks.md.

    Args:
        base: the VAE loss, ``base(x_hat, x, mu, logvar) -> (total, parts)`` (e.g. a
            :class:`SpatialStatsLoss`); its calibration is delegated to it.
        model: a :class:`pymks_vae.models.VAE` with ``encoder="stats"`` and ``stats_head=True``.
        weight: weight of ``R`` (>= 0); 8 by default, chosen with ``one_point_share`` (and
            :class:`~pymks_vae.transformers.VAETransformer`'s ``linear_readout``).
        scaling: ``"pareto"``, ``"global"`` or ``"lag"`` (above).
        one_point_share: share of ``R`` given to the one-point statistics, in ``[0, 1]``
            (ignored when the encoder reads none).
        head: ``"batch"`` or ``"learned"`` (above).

    Example:
        >>> import torch
        >>> from pymks_vae.models import VAE
        >>> model = VAE(encoder="stats", latent_dim=2, image_size=16, channels=2, stats_head=True)
        >>> loss = LinearReadoutLoss(SpatialStatsLoss(states=(0.0, 1.0), scale=1.0, cutoff=None), model)
        >>> x = torch.nn.functional.one_hot((torch.rand(4, 16, 16) < 0.5).long(), 2).movedim(-1, 1).float()
        >>> x_hat, mu, logvar = model(x)
        >>> sorted(loss(x_hat, x, mu, logvar)[1])
        ['kl', 'readout', 'stats']
    """

    def __init__(self, base, model, weight=8.0, scaling="pareto", one_point_share=0.8, head="batch"):
        from pymks_vae.models.encoders import StatsEncoder

        if getattr(model, "stats_head", None) is None or not isinstance(getattr(model, "encoder", None), StatsEncoder):
            raise ValueError("LinearReadoutLoss needs a VAE with encoder='stats' and stats_head=True")
        self.base = base
        self.model = model
        self.weight = _check_weight(weight, "weight")
        if scaling not in ("lag", "global", "pareto"):
            raise ValueError(f"scaling must be 'lag', 'global' or 'pareto', got {scaling!r}")
        self.scaling = scaling
        share = one_point_share
        if isinstance(share, bool) or not isinstance(share, numbers.Real) or not 0.0 <= float(share) <= 1.0:
            raise ValueError(f"one_point_share must be a number in [0, 1], got {share!r}")
        self.one_point_share = float(share)
        if head not in ("batch", "learned"):
            raise ValueError(f"head must be 'batch' or 'learned', got {head!r}")
        self.head = head
        # A solved head is no parameter of the optimiser's: left trainable, it would take no
        # gradient, which DistributedDataParallel refuses (it waits for every trainable one).
        model.stats_head.requires_grad_(head == "learned")
        self.reduction = getattr(base, "reduction", "batchmean")

    @property
    def needs_calibration(self):
        return bool(getattr(self.base, "needs_calibration", False))

    def calibrate(self, images, *args, **kwargs):
        """Calibrate the base loss; returns self."""
        self.base.calibrate(images, *args, **kwargs)
        return self

    def __getattr__(self, name):  # the base loss's attributes (scale_, cutoff_, correlations, ...)
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def readout_error(self, x, mu, reduction="batchmean"):
        """``R`` alone, reduced over the batch."""
        enc = self.model.encoder
        norm = enc.norm
        with torch.no_grad():
            var = norm.running_var
            if self.scaling == "global":  # one scale, so each statistic keeps the weight of its own variance
                var = var.mean().expand_as(var)
            elif self.scaling == "pareto":  # each statistic weighs by its standard deviation
                var = (var + norm.eps).sqrt() * var.mean().sqrt()
            s = (enc.statistics(x) - norm.running_mean) * torch.rsqrt(var + norm.eps)
        s = s.to(mu.dtype)
        if self.head == "batch" and self.model.training and self.solvable(mu.shape[0], mu.shape[1]):
            err = self._solved_head_error(mu, s)
        else:  # the trained head, or the last solved one (fixed: its parameters take no gradient)
            err = (self.model.stats_head(mu) - s).pow(2)
        n1 = enc.n_one_point
        if n1:
            r = (1.0 - self.one_point_share) * err[:, :-n1].mean(1) + self.one_point_share * err[:, -n1:].mean(1)
        else:
            r = err.mean(1)
        return _reduce(r, reduction)

    @staticmethod
    def solvable(n_samples, latent_dim):
        """Whether a batch of ``n_samples`` leaves a residual to a least-squares map from
        ``latent_dim`` latent means with an intercept (``n_samples > latent_dim + 1``)."""
        return n_samples > latent_dim + 1

    def _solved_head_error(self, mu, s):
        """Squared residuals of the batch's least-squares map ``mu -> s``, differentiable in ``mu``.

        Solved in float64 (a ``latent_dim``-square system) on centred data, so the intercept is
        exact; the solution goes to ``model.stats_head`` without gradient."""
        mu64, s64 = mu.double(), s.double()
        mu_mean, s_mean = mu64.mean(0, keepdim=True), s64.mean(0, keepdim=True)
        mc, sc = mu64 - mu_mean, s64 - s_mean
        gram = mc.T @ mc
        # a ridge scaled to the latent keeps the system solvable when the latent collapses (mu ~ 0)
        ridge = 1e-6 * gram.diagonal().mean().detach() + torch.finfo(torch.float64).tiny
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        coef = torch.linalg.solve(gram + ridge * eye, mc.T @ sc)
        err = (mc @ coef - sc).pow(2).to(mu.dtype)
        with torch.no_grad():
            lin = self.model.stats_head
            lin.weight.copy_(coef.T.to(lin.weight.dtype))
            lin.bias.copy_((s_mean - mu_mean @ coef)[0].to(lin.bias.dtype))
        return err

    def __call__(self, x_hat, x, mu, logvar):
        total, parts = self.base(x_hat, x, mu, logvar)
        r = self.readout_error(x, mu, self.reduction)
        return total + self.weight * r, dict(parts, readout=r.detach())


class DataSpaceLoss:
    """The vanilla VAE loss: SSE between reconstruction and input plus ``beta`` times KL.

    Args:
        beta: weight of the KL term (the paper: 1).
        reduction: ``"sum"`` over the batch (the paper's code) or ``"batchmean"``.

    Example:
        >>> x = torch.zeros(2, 1, 4, 4)
        >>> total, parts = DataSpaceLoss()(torch.ones(2, 1, 4, 4), x, torch.zeros(2, 3), torch.zeros(2, 3))
        >>> float(total), float(parts["data"])
        (32.0, 32.0)
    """

    def __init__(self, beta=1.0, reduction="sum"):
        self.beta = _check_weight(beta, "beta")
        if reduction not in ("batchmean", "sum"):
            raise ValueError(f"reduction must be 'batchmean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def __repr__(self):
        return f"DataSpaceLoss(beta={self.beta:g}, reduction={self.reduction!r})"

    def __call__(self, x_hat, x, mu, logvar):
        _check_pair(x_hat, x)
        _check_posterior(mu, logvar)
        x_hat, mu, logvar = _at_least_fp32(x_hat), _at_least_fp32(mu), _at_least_fp32(logvar)  # as SpatialStatsLoss
        data = _reduce((x_hat - x.to(x_hat.dtype)).pow(2).flatten(1).sum(1), self.reduction)
        kl = kl_divergence(mu, logvar, reduction=self.reduction)
        return data + self.beta * kl, {"data": data.detach(), "kl": kl.detach()}


def stats_scale_from_data(images, eps=0.25, states=(0.0,), correlations=((0, 0),), batch_size=256,
                          normalise="minmax", loss=None):
    """The factor on the statistics that normalises them over a sample of images.

    * ``normalise="minmax"``: ``1 / (max f - min f)``, the paper's min/max normalisation (an affine
      map, so in a difference of two statistics only the factor survives);
    * ``normalise="variance"``: ``1 / sqrt(var_f)``, ``var_f`` the variance of ``f`` over the
      images, averaged over pairs and lags (:class:`SpatialStatsLoss`'s default convention).

    Args:
        images: ``(n, *spatial)`` grey images or ``(n, C, *spatial)`` (C = 1 grey; C > 1 phase
            probabilities), numpy array or tensor; 2D tensors of 4 axes are read as
            ``(n, C, H, W)``, numpy arrays of 3 axes as ``(n, H, W)``.
        eps, states, correlations: as in :class:`SpatialStatsLoss` (ignored when ``loss`` is given).
        batch_size: images per batch.
        normalise: ``"minmax"`` or ``"variance"``.
        loss: a :class:`SpatialStatsLoss` whose indicators, pairs, boundary and window are used.

    Returns:
        a python float.

    Raises:
        ValueError: empty input (or one image for the variance), or statistics that are constant
            over the sample.

    Example:
        >>> x = torch.ones(2, 1, 8, 8); x[0, 0, :4] = 0.0      # half the pixels are phase 0
        >>> round(stats_scale_from_data(x, loss=SpatialStatsLoss.paper(1.0)), 4)  # f from ~0 to 0.5
        2.0
    """
    x = _as_images(images)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if normalise not in ("minmax", "variance"):
        raise ValueError(f"normalise must be 'minmax' or 'variance', got {normalise!r}")
    if normalise == "variance" and x.shape[0] < 2:
        raise ValueError(f"the variance of the statistics needs 2 or more images, got {x.shape[0]}")
    if loss is None:
        loss = SpatialStatsLoss(states=states, eps=eps, correlations=correlations, indicator="gaussian",
                                scale=1.0, normalise="none", cutoff=None)
    lo, hi = math.inf, -math.inf
    n, total, total_sq = 0, 0.0, 0.0
    with torch.no_grad():
        for s in range(0, x.shape[0], batch_size):
            f = loss.target_statistics(x[s : s + batch_size].to(torch.float64))
            lo, hi = min(lo, float(f.min())), max(hi, float(f.max()))
            n += f.shape[0]
            total = total + f.sum(0)
            total_sq = total_sq + (f * f).sum(0)
    if normalise == "minmax":
        if not hi > lo:
            raise ValueError(f"the statistics are constant ({lo}) over these images: no min/max scale exists")
        return 1.0 / (hi - lo)
    mean = total / n
    var = float(((total_sq - n * mean * mean).clamp_min(0.0) / (n - 1)).mean())
    if not var > 0:
        raise ValueError("the statistics do not vary over these images: no variance scale exists")
    return 1.0 / math.sqrt(var)


def independent_correlations(n_state):
    """The pairs ``(i, j)``, ``i <= j < n_state - 1``: every two-point statistic of ``n_state`` phases, once.

    Phase indicators (one-hot or hat-basis) sum to 1 at every pixel: ``sum_k m_k = 1``. So for every
    lag ``r``, ``sum_k f_ik(r) = mean(m_i)``, and for the autocovariances that the loss compares by
    default (``centre=True``) ``sum_k c_ik(r) = 0``: the statistics involving the last phase follow
    from the others, ``c_{i,n-1} = -sum_{k<n-1} c_ik`` and ``c_{n-1,n-1} = sum_{j,k<n-1} c_jk``
    (with ``c_ji(r) = c_ij(-r)``). The pairs among the first ``n_state - 1`` phases therefore
    determine every auto- and cross-correlation of all phases, lag by lag, with no pair that the
    others already fix: ``(0, 0)`` for two phases (the paper's single autocorrelation), ``(0, 0),
    (0, 1), (1, 1)`` for three, ``n_state (n_state - 1) / 2`` pairs in general.

    Two other choices were considered and lose information from three phases on: PyMKS's default
    ``[(0, 0), (0, 1), ..., (0, n-1)]`` holds only ``n - 1`` independent functions (its last
    pair follows from the others) and says nothing of how phases 1 and 2 sit relative to each
    other; all autocorrelations ``(k, k)`` fix only the symmetric part ``c_ij(r) + c_ij(-r)`` of
    the cross-correlations for three phases, and not even that for four or more.

    Args:
        n_state: number of phases (>= 1; one phase has the single pair ``(0, 0)``).

    Returns:
        list of ``(int, int)`` pairs.

    Example:
        >>> independent_correlations(2), independent_correlations(3)
        ([(0, 0)], [(0, 0), (0, 1), (1, 1)])
    """
    if isinstance(n_state, bool) or not isinstance(n_state, numbers.Integral) or n_state < 1:
        raise ValueError(f"n_state must be an int >= 1, got {n_state!r}")
    last = max(int(n_state) - 1, 1)
    return [(i, j) for i in range(last) for j in range(i, last)]
