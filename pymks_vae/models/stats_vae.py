"""A VAE of two-point statistics: it encodes a microstructure's statistics and decodes statistics.

The image VAE (:class:`~pymks_vae.models.VAE`) decodes an image and compares its statistics with
the input's. On the lines its decoder keeps one bar per orientation whatever the input holds
(docs/replication.md): the statistics carry the line count, but one network drawing for every
image at once does not use them. :class:`StatsVAE` learns the latent space in statistics space
directly - the encoder reads the statistics, the decoder writes them, the loss compares them
(:class:`~pymks_vae.losses.DecodedStatsLoss`) - and a microstructure is drawn from decoded
statistics afterwards, per sample, by a search (:func:`pymks_vae.reconstruction.draw_strokes`), as
microstructure reconstruction from statistics does.

Both networks work in the principal axes of the training statistics (:meth:`StatsVAE.fit_basis`,
kept in the state dict): the encoder reads the first ``n_basis`` whitened coordinates, the
decoder writes them, through a linear map plus an MLP. With the MLP at zero the decoder is
probabilistic PCA (the linear VAE's optimum spans the principal subspace); the MLP lets a small
latent bend along a nonlinear family.

Example:
    >>> import torch
    >>> from pymks_vae.models.stats_vae import StatsVAE
    >>> stats = torch.randn(50, 1, 9, 9)                  # e.g. SpatialStatsLoss.target_statistics(images)
    >>> model = StatsVAE(stats_shape=(1, 9, 9), latent_dim=3, n_basis=16).fit_basis(stats).eval()
    >>> f_hat, mu, logvar = model(stats[:4])
    >>> tuple(f_hat.shape), tuple(mu.shape)
    ((4, 1, 9, 9), (4, 3))
"""
import math

import torch
from torch import nn

from pymks_vae.models.encoders import _check_positive_int

__all__ = ["StatsVAE"]

_CONFIG_KEYS = ("kind", "stats_shape", "latent_dim", "n_basis", "hidden")


def _mlp(n_in, hidden, n_out):
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(True), nn.Linear(hidden, hidden), nn.ReLU(True),
                         nn.Linear(hidden, n_out))


class StatsVAE(nn.Module):
    """A VAE whose input and output are two-point statistics ``(B, *stats_shape)``.

    Args:
        stats_shape: shape of one sample's statistics, e.g. ``(n_pairs, *window)`` as returned by
            :meth:`~pymks_vae.losses.SpatialStatsLoss.target_statistics` (any number of axes).
        latent_dim: size of the latent vector.
        n_basis: principal axes of the training statistics that the networks read and write
            (at most the number of statistics; fewer training samples than ``n_basis + 1`` leave
            the last axes empty). The rest of each sample's statistics is its training mean's.
        hidden: width of the encoder's and decoder's two hidden layers.

    Attributes:
        config: the constructor arguments (see :meth:`from_config`), ``kind="statistics"``.
        basis_fitted: True once :meth:`fit_basis` has run (or a fitted state dict was loaded).

    Raises:
        ValueError: bad sizes.

    Example:
        >>> m = StatsVAE(stats_shape=(1, 5, 5), latent_dim=2, n_basis=4)
        >>> m.basis_fitted
        False
    """

    def __init__(self, stats_shape, latent_dim=9, n_basis=128, hidden=256):
        super().__init__()
        try:
            shape = tuple(int(s) for s in stats_shape)
        except (TypeError, ValueError):
            raise ValueError(f"stats_shape must be a sequence of ints >= 1, got {stats_shape!r}") from None
        if not shape or any(s < 1 for s in shape):
            raise ValueError(f"stats_shape must be a non-empty sequence of ints >= 1, got {stats_shape!r}")
        self.stats_shape = shape
        self.latent_dim = _check_positive_int(latent_dim, "latent_dim")
        n_stats = math.prod(shape)
        self.n_basis = min(_check_positive_int(n_basis, "n_basis"), n_stats)
        hidden = _check_positive_int(hidden, "hidden")
        self.register_buffer("mean", torch.zeros(n_stats))
        self.register_buffer("basis", torch.zeros(self.n_basis, n_stats))
        self.register_buffer("sigma", torch.ones(self.n_basis))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        self.encoder = _mlp(self.n_basis, hidden, 2 * self.latent_dim)
        self.linear = nn.Linear(self.latent_dim, self.n_basis)
        self.mlp = _mlp(self.latent_dim, hidden, self.n_basis)
        self.config = {"kind": "statistics", "stats_shape": list(shape), "latent_dim": self.latent_dim,
                       "n_basis": self.n_basis, "hidden": hidden}

    @classmethod
    def from_config(cls, config):
        """Rebuild the (untrained, unfitted) architecture of a :attr:`config` dict."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        missing = [k for k in _CONFIG_KEYS if k not in config]
        if missing or config["kind"] != "statistics":
            raise ValueError(f"not a StatsVAE config (lacks {missing} or kind != 'statistics'): {config!r}")
        return cls(stats_shape=tuple(config["stats_shape"]), latent_dim=config["latent_dim"],
                   n_basis=config["n_basis"], hidden=config["hidden"])

    @property
    def basis_fitted(self):
        return bool(self.fitted)

    def check_input(self, f, name="statistics"):
        """Raise TypeError/ValueError unless ``f`` is a float tensor ``(B, *stats_shape)``."""
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
        if not f.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {f.dtype}")
        if tuple(f.shape[1:]) != self.stats_shape or f.ndim != 1 + len(self.stats_shape):
            raise ValueError(f"{name} has shape {tuple(f.shape)}, but this model was built for (batch, *stats_shape) = "
                             f"(batch, {', '.join(str(s) for s in self.stats_shape)})")
        if f.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")

    @torch.no_grad()
    def fit_basis(self, stats):
        """Set the principal axes (float64 SVD) of training statistics ``stats`` ``(n, *stats_shape)``; returns self.

        ``sigma`` holds each axis's standard deviation over ``stats``, so that the networks see
        and write coordinates of unit variance whatever the statistics' units.

        Raises:
            ValueError: fewer than 2 samples, non-finite values, or statistics constant over ``stats``.
        """
        self.check_input(stats, name="stats")
        if stats.shape[0] < 2:
            raise ValueError(f"fit_basis needs 2 or more samples of statistics, got {stats.shape[0]}")
        f = stats.detach().flatten(1).to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(f).all():
            raise ValueError("stats hold NaN or infinite values")
        mean = f.mean(0)
        _, s, vt = torch.linalg.svd(f - mean, full_matrices=False)
        sd = s / math.sqrt(f.shape[0] - 1)
        if not sd[0] > 0:
            raise ValueError("the statistics are the same for every sample: there is nothing to encode")
        k = min(self.n_basis, vt.shape[0])
        keep = sd[:k] > sd[0] * 1e-6  # axes without variance stay empty (zero rows, unit sigma)
        basis = torch.zeros_like(self.basis, dtype=torch.float64)
        sigma = torch.ones_like(self.sigma, dtype=torch.float64)
        basis[:k][keep] = vt[:k][keep]
        sigma[:k][keep] = sd[:k][keep]
        self.mean.copy_(mean)
        self.basis.copy_(basis)
        self.sigma.copy_(sigma)
        self.fitted.fill_(True)
        return self

    def _require_basis(self):
        if not self.basis_fitted:
            raise RuntimeError("StatsVAE.fit_basis(training_statistics) must run before the model is used")

    def coordinates(self, f):
        """Whitened principal coordinates ``(B, n_basis)`` of statistics ``f`` ``(B, *stats_shape)``."""
        self._require_basis()
        return ((f.flatten(1).to(self.mean.dtype) - self.mean) @ self.basis.T) / self.sigma

    def statistics(self, c):
        """Statistics ``(B, *stats_shape)`` of whitened principal coordinates ``c`` ``(B, n_basis)``."""
        self._require_basis()
        return (self.mean + (c * self.sigma) @ self.basis).view(-1, *self.stats_shape)

    def encode(self, f):
        """Posterior parameters ``(mu, logvar)``, each ``(B, latent_dim)``, of statistics ``f``."""
        self.check_input(f)
        h = self.encoder(self.coordinates(f))
        return h[:, : self.latent_dim], h[:, self.latent_dim:]

    def decode(self, z):
        """Statistics ``(B, *stats_shape)`` from latent vectors ``(B, latent_dim)``."""
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.latent_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a tensor (batch, {self.latent_dim}), got {shape}")
        return self.statistics(self.linear(z) + self.mlp(z))

    def forward(self, f, noise=None):
        """``(f_hat, mu, logvar)``; ``z`` is sampled in training mode and equals ``mu`` in eval mode
        (``noise``: optional standard normal draws, as :meth:`pymks_vae.models.VAE.forward`)."""
        mu, logvar = self.encode(f)
        if self.training:
            if noise is None:
                noise = torch.randn_like(mu)
            z = mu + torch.exp(0.5 * logvar) * noise
        else:
            z = mu
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, n, generator=None):
        """Statistics ``(n, *stats_shape)`` decoded from ``n`` draws of the standard normal prior."""
        n = _check_positive_int(n, "n")
        z = torch.randn(n, self.latent_dim, generator=generator).to(self.mean.device)
        return self.decode(z)
