"""The variational autoencoder: an encoder, a Gaussian latent and a decoder.

Example:
    >>> import torch
    >>> from pymks_vae.models import VAE
    >>> model = VAE(encoder="cnn", latent_dim=9, image_size=32).eval()
    >>> x_hat, mu, logvar = model(torch.rand(4, 1, 32, 32))
    >>> tuple(x_hat.shape), tuple(mu.shape)
    ((4, 1, 32, 32), (4, 9))
    >>> volume = VAE(latent_dim=4, image_size=(15, 15, 15), channels=3).eval()   # any size, 2D or 3D
    >>> tuple(volume(torch.rand(2, 3, 15, 15, 15))[0].shape)
    (2, 3, 15, 15, 15)
"""
import torch
from torch import nn

from pymks_vae.models.decoder import DECODERS, build_decoder
from pymks_vae.models.encoders import ENCODERS, _check_positive_int, build_encoder
from pymks_vae.models.shapes import spatial_shape

__all__ = ["VAE"]

_CONFIG_KEYS = ("encoder", "decoder", "latent_dim", "image_size", "channels", "freeze_encoder")


class VAE(nn.Module):
    """A VAE for 2D images or 3D volumes of grey levels or phase probabilities ``(B, channels, *image_size)``.

    In training mode ``forward`` samples ``z = mu + sigma * noise``; in eval mode it uses
    ``z = mu`` (as the paper's authors did at evaluation).

    Args:
        encoder: ``"cnn"`` (small, CPU-sized, 2D or 3D), ``"stats"`` (reads the input's two-point
            statistics, 2D or 3D; :class:`~pymks_vae.models.encoders.StatsEncoder`) or
            ``"resnet152"`` (the paper's, 2D).
        latent_dim: size of the latent vector (the paper: 9).
        image_size: int (a square), ``(H, W)`` (2D) or ``(X, Y, Z)`` (3D), any positive sizes (the
            ``"cnn"`` networks wrap other sizes than multiples of 16 periodically, see
            :mod:`pymks_vae.models.shapes`); inputs of another size are refused.
        channels: 1 for a grey image (sigmoid output, the paper), > 1 for phase probabilities
            (e.g. one-hot microstructures; softmax over channels).
        weights: ResNet-152 ImageNet weights (a file path or ``"imagenet"``); ``"resnet152"`` only.
        freeze_encoder: freeze the ResNet-152 backbone. None means True for ``"resnet152"`` (the
            paper; needs ``weights``) and False for ``"cnn"`` and ``"stats"``.
        stats_head: for ``"stats"`` only: add ``stats_head``, a linear map from the latent to the
            encoder's standardised statistics, trained by
            :class:`pymks_vae.losses.LinearReadoutLoss` (default False).
        encoder_options: for ``"stats"`` only: a dict of
            :class:`~pymks_vae.models.encoders.StatsEncoder`'s ``correlations``, ``cutoff``,
            ``periodic``, ``hidden``, ``one_point`` and ``skip`` (None: its defaults).
        decoder: ``"paper"`` (the paper's decoder, any 2D size via a final resize), ``"cnn"`` (a
            lighter decoder reaching the size exactly, 2D or 3D), ``"strokes"`` (bars, 2D grey
            only) or ``"auto"``: ``"paper"`` with the ResNet-152 encoder, ``"cnn"`` with the others.
        stroke_layout: ``"free"`` (default) or ``"slots"``, the strokes' layout (``decoder="strokes"``
            only; see :class:`~pymks_vae.models.decoder.StrokeDecoder`).
        stroke_binary: the strokes decoder draws black and white pixels in eval mode
            (``decoder="strokes"`` only; default False; see
            :class:`~pymks_vae.models.decoder.StrokeDecoder`).

    Attributes:
        image_size: the spatial shape, a tuple of 2 or 3 ints.
        spatial_ndim: 2 or 3.
        config: the constructor arguments that rebuild this architecture (weights excluded:
            they are in the state dict); see :meth:`from_config`.

    Raises:
        ValueError / TypeError: for bad arguments (see the encoders and decoders).

    Example:
        >>> m = VAE(latent_dim=2, image_size=32, channels=3).eval()
        >>> probs = m.decode(torch.zeros(1, 2)).detach(); float(probs.sum(1).mean())
        1.0
    """

    def __init__(self, encoder="cnn", latent_dim=9, image_size=64, channels=1, weights=None,
                 freeze_encoder=None, decoder="auto", stroke_layout="free", stroke_binary=False, encoder_options=None,
                 stats_head=False):
        super().__init__()
        if encoder not in ENCODERS:
            raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}")
        if decoder == "auto":
            decoder = "paper" if encoder == "resnet152" else "cnn"
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be 'auto' or one of {DECODERS}, got {decoder!r}")
        if not isinstance(stats_head, bool):
            raise TypeError(f"stats_head must be True or False, got {stats_head!r}")
        if stats_head and encoder != "stats":
            raise ValueError(f"stats_head applies to encoder='stats' only, got encoder={encoder!r}")
        if freeze_encoder is not None and not isinstance(freeze_encoder, bool):
            raise TypeError(f"freeze_encoder must be None, True or False, got {freeze_encoder!r}")
        self.latent_dim = _check_positive_int(latent_dim, "latent_dim")
        self.channels = _check_positive_int(channels, "channels")
        self.image_size = spatial_shape(image_size)
        self.spatial_ndim = len(self.image_size)
        self.encoder = build_encoder(encoder, latent_dim=self.latent_dim, image_size=self.image_size,
                                     channels=self.channels, weights=weights, freeze=freeze_encoder,
                                     options=encoder_options)
        if decoder != "strokes" and stroke_layout != "free":
            raise ValueError(f"stroke_layout applies to decoder='strokes' only, got decoder={decoder!r}")
        if decoder != "strokes" and stroke_binary is not False:
            raise ValueError(f"stroke_binary applies to decoder='strokes' only, got decoder={decoder!r}")
        self.decoder = build_decoder(decoder, latent_dim=self.latent_dim, image_size=self.image_size,
                                     channels=self.channels, stroke_layout=stroke_layout,
                                     stroke_binary=stroke_binary)
        self.config = {
            "encoder": encoder,
            "decoder": decoder,
            "latent_dim": self.latent_dim,
            "image_size": list(self.image_size),
            "channels": self.channels,
            "freeze_encoder": bool(getattr(self.encoder, "frozen", False)),
        }
        self.stats_head = nn.Linear(self.latent_dim, self.encoder.norm.num_features) if stats_head else None
        if encoder == "stats":  # the window and pairs actually read, so that from_config rebuilds them
            self.config["encoder_options"] = {
                "correlations": [list(p) for p in self.encoder.correlations], "cutoff": self.encoder.cutoff,
                "periodic": self.encoder.periodic, "hidden": self.encoder.hidden,
                "one_point": self.encoder.one_point, "skip": self.encoder.skip is not None}
            self.config["stats_head"] = stats_head
        if decoder == "strokes":
            self.config["stroke_layout"] = stroke_layout
            self.config["stroke_binary"] = stroke_binary

    @classmethod
    def from_config(cls, config):
        """Rebuild the architecture described by ``config`` (a :attr:`config` dict), untrained.

        A frozen ResNet-152 is rebuilt frozen without needing its weights file: the caller loads
        the weights from a checkpoint's state dict afterwards (see
        :func:`pymks_vae.training.load_model`).

        Example:
            >>> m = VAE(latent_dim=3, image_size=32)
            >>> VAE.from_config(m.config).config == m.config
            True
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        missing = [k for k in _CONFIG_KEYS if k not in config]
        if missing:
            raise ValueError(f"model config lacks {missing}; got keys {sorted(config)}")
        frozen = bool(config["freeze_encoder"])
        model = cls(encoder=config["encoder"], latent_dim=config["latent_dim"],
                    image_size=tuple(config["image_size"]), channels=config["channels"],
                    freeze_encoder=False, decoder=config["decoder"],
                    # stroke models saved before layouts existed drew free strokes
                    stroke_layout=config.get("stroke_layout", "free") if config["decoder"] == "strokes" else "free",
                    stroke_binary=config.get("stroke_binary", False) if config["decoder"] == "strokes" else False,
                    encoder_options=config.get("encoder_options") if config["encoder"] == "stats" else None,
                    stats_head=bool(config.get("stats_head", False)))
        if frozen:
            model.encoder.freeze()
            model.config["freeze_encoder"] = True
        return model

    def check_input(self, x, name="x"):
        """Raise TypeError/ValueError unless ``x`` is a float tensor ``(B, channels, *image_size)`` of this model."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating point tensor, got {x.dtype}")
        want = (self.channels,) + self.image_size
        if x.ndim != 2 + self.spatial_ndim or tuple(x.shape[1:]) != want:
            axes = "H, W" if self.spatial_ndim == 2 else "X, Y, Z"
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}, but this model was built for (batch, channels, {axes}) = "
                f"(batch, {', '.join(str(v) for v in want)}) (channels={self.channels}, image_size={self.image_size})"
            )
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch")

    def encode(self, x):
        """Posterior parameters ``(mu, logvar)``, each ``(B, latent_dim)``."""
        self.check_input(x)
        return self.encoder(x)

    @staticmethod
    def reparameterize(mu, logvar, noise=None):
        """A draw ``mu + exp(logvar / 2) * noise``.

        Args:
            mu, logvar: posterior parameters ``(B, latent_dim)``.
            noise: standard normal draws ``(B, latent_dim)``; None draws them from torch's global
                RNG (``randn_like(mu)``).

        Returns:
            ``z`` ``(B, latent_dim)``.
        """
        if noise is None:
            noise = torch.randn_like(mu)
        elif not isinstance(noise, torch.Tensor) or tuple(noise.shape) != tuple(mu.shape):
            shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise).__name__
            raise ValueError(f"noise must be a tensor of shape {tuple(mu.shape)} (batch, latent_dim), got {shape}")
        return mu + torch.exp(0.5 * logvar) * noise

    def decode(self, z):
        """Fields ``(B, channels, *image_size)`` in [0, 1] from latent vectors ``(B, latent_dim)``."""
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.latent_dim:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"z must be a tensor (batch, {self.latent_dim}), got {shape}")
        return self.decoder(z)

    def forward(self, x, noise=None):
        """``(x_hat, mu, logvar)``; ``z`` is sampled in training mode and equals ``mu`` in eval mode.

        Args:
            x: images ``(B, channels, H, W)``.
            noise: optional standard normal draws ``(B, latent_dim)`` for the sample in training
                mode (a distributed run passes each rank its share of one global draw, so that N
                processes sample what one process would); None draws them here. Ignored in eval mode.
        """
        mu, logvar = self.encode(x)
        z = self.reparameterize(mu, logvar, noise) if self.training else mu
        return self.decode(z), mu, logvar

    @torch.no_grad()
    def sample(self, n, generator=None):
        """Decode ``n`` latent vectors drawn from the standard normal prior (in eval mode).

        Args:
            n: number of samples (int >= 1).
            generator: optional ``torch.Generator`` for the draw.

        Returns:
            tensor ``(n, channels, *image_size)`` on the model's device.
        """
        n = _check_positive_int(n, "n")
        device = next(self.parameters()).device
        gen_device = generator.device if generator is not None else device
        z = torch.randn(n, self.latent_dim, generator=generator, device=gen_device).to(device)
        was_training = self.training
        self.eval()
        try:
            return self.decode(z)
        finally:
            self.train(was_training)
