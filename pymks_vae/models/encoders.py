"""Encoders of the VAE: each maps fields ``(B, C, *spatial)`` to ``(mu, logvar)``, both ``(B, latent)``.

* :class:`ConvEncoder` (``"cnn"``): a small strided-convolution encoder sized for CPU work, 2D
  images ``(B, C, H, W)`` or 3D volumes ``(B, C, X, Y, Z)`` of any size (fields whose sizes are
  not multiples of its stride are wrapped periodically, :mod:`pymks_vae.models.shapes`).
* :class:`StatsEncoder` (``"stats"``): reads the two-point statistics of its input within a lag
  window (the package's operator) through a small fully connected network; translation
  invariant by construction, 2D or 3D, any size and number of states.
* :class:`ResNet152Encoder` (``"resnet152"``): the paper's encoder, torchvision's ResNet-152
  without its ``fc`` layer, frozen, behind a learnable 1x1 convolution to 3 channels and the
  ImageNet normalisation, followed by a 2048 -> 1024 -> 1024 head. 2D only.

Example:
    >>> import torch
    >>> from pymks_vae.models.encoders import ConvEncoder
    >>> mu, logvar = ConvEncoder(latent_dim=9, image_size=32).eval()(torch.rand(2, 1, 32, 32))
    >>> tuple(mu.shape), tuple(logvar.shape)
    ((2, 9), (2, 9))
    >>> mu, _ = ConvEncoder(latent_dim=4, image_size=(15, 15, 15)).eval()(torch.rand(2, 1, 15, 15, 15))
    >>> tuple(mu.shape)
    (2, 4)
"""
import math
import numbers
import os

import torch
from torch import nn

from pymks_vae.models.shapes import image_hw, padded_shape, spatial_shape, wrap_pad

__all__ = ["ConvEncoder", "StatsEncoder", "ResNet152Encoder", "build_encoder", "ENCODERS", "image_hw",
           "STATS_ENCODER_MAX_FEATURES"]

ENCODERS = ("cnn", "stats", "resnet152")

#: The most statistics (pairs x lags) :class:`StatsEncoder` reads by default: the window shrinks
#: until they fit (a 3D window of 31^3 lags for one pair; every 2D window up to 181x181).
STATS_ENCODER_MAX_FEATURES = 32768

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

#: Convolution and batch-norm layers per number of spatial axes.
CONV = {2: nn.Conv2d, 3: nn.Conv3d}
CONV_TRANSPOSE = {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BATCH_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


class _Gaussian(nn.Module):
    """Two linear maps of a feature vector: the posterior mean and log-variance."""

    def __init__(self, features, latent_dim):
        super().__init__()
        self.mu = nn.Linear(features, latent_dim)
        self.logvar = nn.Linear(features, latent_dim)

    def forward(self, h):
        return self.mu(h), self.logvar(h)


class ConvEncoder(nn.Module):
    """A small convolutional encoder for CPU-sized 2D images or 3D volumes.

    ``len(widths)`` stages of (4x4[x4] conv, stride 2) -> BatchNorm -> ReLU, each halving every
    spatial axis, then flatten -> linear ``hidden`` (BatchNorm, ReLU) -> ``mu``, ``logvar``.

    A field whose sizes are not multiples of ``2 ** len(widths)`` is first extended periodically
    to the next multiples (microstructures are periodic: the padding repeats the field's own
    opposite side, and adds no edge that is not in the material); sizes that are multiples are
    not padded, so their networks are exactly those of a fixed-size encoder.

    Args:
        latent_dim: size of the latent vector.
        image_size: int (a square), ``(H, W)`` or ``(X, Y, Z)``, any positive sizes.
        channels: input channels.
        widths: output channels of each stage (default ``(8, 16, 32, 64)``: 64x64 -> 4x4).
        hidden: width of the fully connected layer.

    Attributes:
        image_size: the input's spatial shape.
        padded_size: the shape the convolutions see (``image_size`` rounded up to multiples of
            ``2 ** len(widths)``).

    Example:
        >>> enc = ConvEncoder(latent_dim=4, image_size=(16, 32), widths=(8, 8))
        >>> [tuple(t.shape) for t in enc.eval()(torch.rand(3, 1, 16, 32))]
        [(3, 4), (3, 4)]
        >>> ConvEncoder(latent_dim=4, image_size=(21, 50)).padded_size
        (32, 64)
    """

    def __init__(self, latent_dim, image_size, channels=1, widths=(8, 16, 32, 64), hidden=256):
        super().__init__()
        latent_dim = _check_positive_int(latent_dim, "latent_dim")
        channels = _check_positive_int(channels, "channels")
        hidden = _check_positive_int(hidden, "hidden")
        widths = tuple(_check_positive_int(w, "widths[i]") for w in widths)
        if not widths:
            raise ValueError("widths must hold at least one stage width")
        self.image_size = spatial_shape(image_size)
        ndim = len(self.image_size)
        factor = 2 ** len(widths)
        self.padded_size = padded_shape(self.image_size, factor)
        layers = []
        c_in = channels
        for c_out in widths:
            layers += [CONV[ndim](c_in, c_out, 4, stride=2, padding=1, bias=False), BATCH_NORM[ndim](c_out),
                       nn.ReLU(True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        flat = c_in * math.prod(p // factor for p in self.padded_size)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True))
        self.gaussian = _Gaussian(hidden, latent_dim)

    def forward(self, x):
        if self.padded_size != self.image_size:
            x = wrap_pad(x, self.padded_size)
        return self.gaussian(self.head(self.features(x)))


class StatsEncoder(nn.Module):
    """An encoder that reads the two-point statistics of its input, not its pixels.

    ``x -> f = two_point_stats(x, correlations, cutoff)`` (the periodic or non-periodic two-point
    statistics within a lag window, :func:`pymks_vae.ops.two_point_stats`) ``-> flatten [->
    append the phase fractions] -> BatchNorm (each statistic standardised over the data) ->
    linear hidden (BatchNorm, ReLU) -> mu, logvar`` [``+ a linear map of the standardised
    statistics to mu``].

    Why: a microstructure's class and descriptors (volume fraction, correlation lengths, sizes)
    do not depend on where its grains sit, and the spatial-statistics loss only asks the latent
    for what the statistics hold. A convolutional encoder must learn that invariance from the
    training set (a few hundred fields in a PyMKS study); this one has it by construction, and
    its first layer sees every statistic the PCA baseline sees (docs/pymks.md, measured).

    Args:
        latent_dim: size of the latent vector.
        image_size: int (a square), ``(H, W)`` or ``(X, Y, Z)``.
        channels: input channels (1: a grey field, read as one state; else phase indicators).
        correlations: channel pairs ``(i, j)`` whose statistics are read; None: every
            ``i <= j < channels - 1`` (:func:`pymks_vae.losses.independent_correlations`;
            ``[(0, 0)]`` for one or two channels).
        cutoff: largest lag read along each axis (an int >= 0, clipped to
            ``(min(image_size) - 1) // 2``), or None for the largest window; then shrunk until
            ``len(correlations) * (2 * cutoff + 1) ** ndim`` is at most ``max_features``.
        periodic: periodic statistics (True) or zero padding with overlap normalisation.
        hidden: width of the hidden layer; 0 for a linear map of the standardised statistics.
        max_features: upper bound on the statistics read (memory of the first layer).
        one_point: also read the independent phase fractions (the means of every channel but the
            last; of the one channel of a grey field), after the two-point statistics. A window
            drops the long lags, which carry the phase fractions; these give them back.
        skip: add a linear map of the standardised statistics to ``mu``, beside the hidden layer
            (ignored with ``hidden=0``, already linear).

    Attributes:
        cutoff: the window actually read.
        correlations: the pairs read, a list of tuples.
        n_one_point: the number of one-point statistics read (0 without ``one_point``).

    Example:
        >>> enc = StatsEncoder(latent_dim=2, image_size=(21, 30), channels=2, cutoff=4)
        >>> [tuple(t.shape) for t in enc.eval()(torch.rand(3, 2, 21, 30))], enc.cutoff
        ([(3, 2), (3, 2)], 4)
    """

    def __init__(self, latent_dim, image_size, channels=1, correlations=None, cutoff=None, periodic=True,
                 hidden=256, max_features=STATS_ENCODER_MAX_FEATURES, one_point=False, skip=False):
        super().__init__()
        latent_dim = _check_positive_int(latent_dim, "latent_dim")
        channels = _check_positive_int(channels, "channels")
        max_features = _check_positive_int(max_features, "max_features")
        if isinstance(hidden, bool) or not isinstance(hidden, numbers.Integral) or hidden < 0:
            raise ValueError(f"hidden must be an int >= 0, got {hidden!r}")
        if not isinstance(periodic, bool):
            raise TypeError(f"periodic must be a bool, got {periodic!r}")
        if not isinstance(one_point, bool):
            raise TypeError(f"one_point must be a bool, got {one_point!r}")
        if not isinstance(skip, bool):
            raise TypeError(f"skip must be a bool, got {skip!r}")
        self.image_size = spatial_shape(image_size)
        ndim = len(self.image_size)
        from pymks_vae import losses, ops

        # None: the pairs the loss compares by default (one channel: the grey field itself)
        pairs = (losses.independent_correlations(channels) if correlations is None
                 else ops._pairs(correlations, channels, "StatsEncoder"))
        largest = (min(self.image_size) - 1) // 2
        if cutoff is None:
            cutoff = largest
        elif isinstance(cutoff, bool) or not isinstance(cutoff, numbers.Integral) or cutoff < 0:
            raise ValueError(f"cutoff must be None or an int >= 0, got {cutoff!r}")
        cutoff = min(int(cutoff), largest)
        while cutoff > 0 and len(pairs) * (2 * cutoff + 1) ** ndim > max_features:
            cutoff -= 1
        self.cutoff, self.correlations, self.periodic, self.hidden = cutoff, pairs, periodic, int(hidden)
        self.one_point = one_point
        # the independent phase fractions: every channel but the last of a one-hot input (they sum to 1)
        self.n_one_point = max(1, channels - 1) if one_point else 0
        n_features = len(pairs) * (2 * cutoff + 1) ** ndim + self.n_one_point
        self.norm = nn.BatchNorm1d(n_features)
        if hidden:
            self.head = nn.Sequential(nn.Linear(n_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True))
        else:
            self.head = nn.Identity()
        self.gaussian = _Gaussian(hidden or n_features, latent_dim)
        # a linear path from the standardised statistics to mu, beside the hidden layer: the latent
        # can hold a linear summary of the statistics exactly, as PCA's components are
        self.skip = nn.Linear(n_features, latent_dim, bias=False) if skip and hidden else None

    def statistics(self, x):
        """The statistics read, flattened: ``(B, len(correlations) * window)``."""
        from pymks_vae import ops

        f = ops.two_point_stats(x, self.correlations, periodic=self.periodic, cutoff=self.cutoff).flatten(1)
        if self.n_one_point:
            f = torch.cat([f, x[:, : self.n_one_point].flatten(2).mean(2).to(f.dtype)], 1)
        return f

    def forward(self, x):
        h = self.norm(self.statistics(x))
        mu, logvar = self.gaussian(self.head(h))
        if self.skip is not None:
            mu = mu + self.skip(h)
        return mu, logvar


def _resnet152_state_dict(weights):
    """ImageNet weights of ResNet-152 from a file path or torchvision's enum (``"imagenet"``)."""
    if isinstance(weights, str) and weights.lower() == "imagenet":
        from torchvision.models import ResNet152_Weights

        try:
            return ResNet152_Weights.IMAGENET1K_V2.get_state_dict(progress=False)
        except Exception as exc:  # urllib/OSError/hash errors: all mean "no download"
            raise RuntimeError(
                "could not download the ImageNet ResNet-152 weights (ResNet152_Weights.IMAGENET1K_V2): "
                f"{type(exc).__name__}: {exc}. Downloads are impossible on an offline machine; download "
                "the file elsewhere and pass its path instead, e.g. weights='/path/resnet152.pth'"
            ) from exc
    try:
        path = os.fspath(weights)
    except TypeError:
        raise TypeError(f"weights must be None, 'imagenet' or a file path, got {type(weights).__name__}") from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ResNet-152 weights file not found: {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"could not read ResNet-152 weights from {path!r}: {type(exc).__name__}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} does not hold a state dict of ResNet-152 weights (got {type(state).__name__})")
    return state


class ResNet152Encoder(nn.Module):
    """The paper's encoder: a frozen ImageNet ResNet-152 with a learnable input map and head.

    ``x -> 1x1 conv (channels -> 3) -> ImageNet mean/std normalisation -> ResNet-152 without fc
    (2048 features) -> 1024 (BN, ReLU) -> 1024 (BN, ReLU) -> mu, logvar``.

    When frozen, the backbone's parameters take no gradient and the backbone always runs in eval
    mode, so its BatchNorm statistics stay those of ImageNet (gradients still flow through it to
    the learnable 1x1 convolution).

    Args:
        latent_dim: size of the latent vector.
        channels: input channels.
        weights: None (random initialisation), a path to a ResNet-152 state dict (torchvision's
            ``resnet152-*.pth``; loaded with ``weights_only=True``; ``fc.*`` entries are ignored),
            or ``"imagenet"`` (torchvision's ``ResNet152_Weights.IMAGENET1K_V2``: a download).
        freeze: freeze the backbone. None means True (the paper), which needs ``weights``.

    Raises:
        FileNotFoundError: ``weights`` names a missing file.
        RuntimeError: ``weights="imagenet"`` and the download failed (offline).
        ValueError: ``freeze`` with random weights (a frozen random network learns nothing).

    Example:
        >>> enc = ResNet152Encoder(latent_dim=9, freeze=False)   # random, trainable backbone
        >>> sum(p.numel() for p in enc.backbone.parameters()) > 50_000_000
        True
    """

    def __init__(self, latent_dim, channels=1, weights=None, freeze=None):
        super().__init__()
        import torchvision

        latent_dim = _check_positive_int(latent_dim, "latent_dim")
        channels = _check_positive_int(channels, "channels")
        if freeze is None:
            freeze = True
        if not isinstance(freeze, bool):
            raise TypeError(f"freeze_encoder must be None, True or False, got {freeze!r}")
        if freeze and weights is None:
            raise ValueError(
                "freeze_encoder=True with weights=None would freeze a randomly initialised ResNet-152, "
                "which then cannot learn anything. Pass ImageNet weights (weights='/path/resnet152.pth' "
                "or weights='imagenet'), or freeze_encoder=False to train the whole network"
            )
        # read the weights first: a bad path fails before the slow construction of the network
        state = None
        if weights is not None:
            state = {k: v for k, v in _resnet152_state_dict(weights).items() if not k.startswith("fc.")}
        net = torchvision.models.resnet152(weights=None)
        if state is not None:
            try:
                missing, unexpected = net.load_state_dict(state, strict=False)
            except RuntimeError as exc:  # tensor shapes that do not fit
                raise ValueError(f"weights {weights!r} do not fit torchvision's ResNet-152: {exc}") from exc
            missing = [k for k in missing if not k.startswith("fc.")]
            if missing or unexpected:
                raise ValueError(
                    f"weights {weights!r} do not match torchvision's ResNet-152: missing {missing[:5]}, "
                    f"unexpected {list(unexpected)[:5]}"
                )
        self.to_rgb = nn.Conv2d(channels, 3, 1)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        net.fc = nn.Identity()
        self.backbone = net
        self.head = nn.Sequential(
            nn.Linear(2048, 1024), nn.BatchNorm1d(1024), nn.ReLU(True),
            nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.ReLU(True),
        )
        self.gaussian = _Gaussian(1024, latent_dim)
        self.frozen = False
        if freeze:
            self.freeze()

    def freeze(self):
        """Freeze the backbone (no gradients, eval-mode BatchNorm)."""
        self.frozen = True
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()
        return self

    def train(self, mode=True):
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x):
        rgb = (self.to_rgb(x) - self.mean) / self.std
        return self.gaussian(self.head(self.backbone(rgb)))


def build_encoder(name, *, latent_dim, image_size, channels=1, weights=None, freeze=None, options=None):
    """The encoder called ``name`` (one of :data:`ENCODERS`).

    Args:
        name: ``"cnn"`` (2D or 3D), ``"stats"`` (2D or 3D) or ``"resnet152"`` (2D).
        latent_dim, image_size, channels: the model's sizes.
        weights: for ``"resnet152"`` only (see :class:`ResNet152Encoder`).
        freeze: freeze the encoder; only None/False for ``"cnn"`` and ``"stats"`` (they have no
            pretrained weights).
        options: for ``"stats"`` only, a dict of :class:`StatsEncoder`'s keyword arguments
            (``correlations``, ``cutoff``, ``periodic``, ``hidden``, ``one_point``, ``skip``).

    Returns:
        an ``nn.Module`` mapping ``(B, channels, *image_size)`` to ``(mu, logvar)``.

    Example:
        >>> build_encoder("cnn", latent_dim=2, image_size=32).__class__.__name__
        'ConvEncoder'
    """
    if options and name != "stats":
        raise ValueError(f"encoder options apply to encoder='stats' only, got encoder={name!r}, options={options!r}")
    if name in ("cnn", "stats"):
        if weights is not None:
            raise ValueError(
                f"encoder={name!r} has no pretrained weights; got weights={weights!r} (use encoder='resnet152')"
            )
        if freeze:
            raise ValueError(
                f"freeze_encoder=True with encoder={name!r} would freeze a randomly initialised network; "
                "use freeze_encoder=None/False"
            )
        if name == "stats":
            options = dict(options or {})
            bad = sorted(set(options) - {"correlations", "cutoff", "periodic", "hidden", "one_point", "skip"})
            if bad:
                raise ValueError(f"unknown options for encoder='stats': {bad}")
            return StatsEncoder(latent_dim, image_size, channels, **options)
        return ConvEncoder(latent_dim, image_size, channels)
    if name == "resnet152":
        image_hw(image_size, owner="encoder='resnet152' (the paper's ImageNet network)")
        return ResNet152Encoder(latent_dim, channels, weights=weights, freeze=freeze)
    raise ValueError(f"encoder must be one of {ENCODERS}, got {name!r}")
