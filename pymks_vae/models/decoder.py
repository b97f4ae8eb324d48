"""Decoders of the VAE: each maps a latent batch ``(B, latent)`` to fields ``(B, channels, *spatial)``.

* :class:`PaperDecoder` (``"paper"``): the paper's decoder. ``latent -> 1024 (BN, ReLU) -> 1024
  (BN, ReLU) -> (64, 4, 4) -> three 3x3 stride-2 transposed convolutions (64 -> 32 -> 8 -> 3,
  BN/ReLU between) -> 39x39 -> bilinear resize to (H, W) -> 1x1 conv 3 -> channels``. Any image
  size works through the final resize (the paper used 224x224). 2D only.
* :class:`ConvDecoder` (``"cnn"``): a lighter mirror of :class:`~pymks_vae.models.encoders.ConvEncoder`
  whose transposed convolutions reach the size exactly, so thin lines of small images stay sharp;
  the CPU default, 2D or 3D, any size (other sizes than multiples of its stride are drawn larger
  and cropped, :mod:`pymks_vae.models.shapes`).
* :class:`StrokeDecoder` (``"strokes"``): draws axis-aligned bars (the lines experiment). 2D only.

The output activation is a sigmoid for one channel (a grey image in [0, 1]) and a softmax over
the channels otherwise (phase probabilities summing to 1 at every pixel).

Example:
    >>> import torch
    >>> from pymks_vae.models.decoder import PaperDecoder
    >>> PaperDecoder(latent_dim=9, image_size=64).eval()(torch.zeros(2, 9)).shape
    torch.Size([2, 1, 64, 64])
"""
import math

import torch
from torch import nn
from torch.nn import functional as F

from pymks_vae.models.encoders import BATCH_NORM, CONV, CONV_TRANSPOSE, _check_positive_int
from pymks_vae.models.shapes import crop, image_hw, padded_shape, spatial_shape

__all__ = ["PaperDecoder", "ConvDecoder", "StrokeDecoder", "build_decoder", "DECODERS", "output_activation"]

DECODERS = ("paper", "cnn", "strokes")


def output_activation(logits):
    """Sigmoid for one channel, softmax over channels otherwise.

    Args:
        logits: ``(batch, channels, *spatial)``.

    Returns:
        the decoder's output of the same shape: grey values in (0, 1) for one channel, phase
        probabilities summing to 1 over the channels otherwise.

    Example:
        >>> import torch
        >>> output_activation(torch.zeros(1, 1, 2, 2)).flatten().tolist()
        [0.5, 0.5, 0.5, 0.5]
        >>> output_activation(torch.randn(1, 3, 4, 4)).sum(1).allclose(torch.ones(1, 4, 4))
        True
    """
    if logits.shape[1] == 1:
        return torch.sigmoid(logits)
    return torch.softmax(logits, dim=1)


class PaperDecoder(nn.Module):
    """The paper's decoder, generalised to any image size by its final bilinear resize.

    Args:
        latent_dim: size of the latent vector.
        image_size: int or ``(H, W)`` of the output.
        channels: output channels (1: sigmoid; more: softmax over channels).

    Example:
        >>> dec = PaperDecoder(latent_dim=3, image_size=(20, 30), channels=2).eval()
        >>> y = dec(torch.zeros(1, 3)); tuple(y.shape), bool(torch.allclose(y.sum(1), torch.ones(1)))
        ((1, 2, 20, 30), True)
    """

    def __init__(self, latent_dim, image_size, channels=1):
        super().__init__()
        self.latent_dim = _check_positive_int(latent_dim, "latent_dim")
        self.channels = _check_positive_int(channels, "channels")
        self.image_size = image_hw(image_size, owner="decoder='paper' (the paper's architecture)")
        self.fc = nn.Sequential(
            nn.Linear(self.latent_dim, 1024), nn.BatchNorm1d(1024), nn.ReLU(True),
            nn.Linear(1024, 1024), nn.BatchNorm1d(1024), nn.ReLU(True),
        )
        # 4 -> 9 -> 19 -> 39 pixels: (n - 1) * 2 + 3
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(64, 32, 3, stride=2), nn.BatchNorm2d(32), nn.ReLU(True),
            nn.ConvTranspose2d(32, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(True),
            nn.ConvTranspose2d(8, 3, 3, stride=2),
        )
        self.to_channels = nn.Conv2d(3, self.channels, 1)

    def forward(self, z):
        h = self.deconv(self.fc(z).view(-1, 64, 4, 4))
        h = F.interpolate(h, size=self.image_size, mode="bilinear", align_corners=False)
        return output_activation(self.to_channels(h))


class ConvDecoder(nn.Module):
    """A light decoder mirroring :class:`~pymks_vae.models.encoders.ConvEncoder`, 2D or 3D.

    2D: ``latent -> hidden (BN, ReLU) -> widths[0] x (H/2^k) x (W/2^k) (BN, ReLU) -> k stages of
    (4x4 transposed conv, stride 2, BN, ReLU) -> 3x3 conv -> channels``, k = ``len(widths)``.

    3D: the same, except that the last of the k stages is a 4x4x4 transposed convolution straight
    to ``channels``, without the full-resolution 3x3x3 convolution: at 32^3 that convolution and
    a stage that keeps ``widths[-1]`` channels at full resolution cost 4-7x the rest of the
    decoder on a CPU (measured: 380 ms against 52 ms forward+backward for a batch of 16).

    A size that is not a multiple of ``2 ** k`` is drawn at the next multiples and cropped to its
    first entries along each axis (the inverse of the encoder's periodic padding); sizes that are
    multiples are not cropped, so their networks are exactly those of a fixed-size decoder.

    Args:
        latent_dim: size of the latent vector.
        image_size: int (a square), ``(H, W)`` or ``(X, Y, Z)``, any positive sizes.
        channels: output channels.
        widths: channels entering each upsampling stage (default ``(64, 32, 16, 8)``).
        hidden: width of the first fully connected layer.

    Attributes:
        image_size: the output's spatial shape.
        padded_size: the shape the transposed convolutions draw before the crop.

    Example:
        >>> ConvDecoder(latent_dim=2, image_size=32, widths=(16, 8)).eval()(torch.zeros(1, 2)).shape
        torch.Size([1, 1, 32, 32])
        >>> ConvDecoder(latent_dim=2, image_size=(15, 20, 9), channels=3).eval()(torch.zeros(1, 2)).shape
        torch.Size([1, 3, 15, 20, 9])
    """

    def __init__(self, latent_dim, image_size, channels=1, widths=(64, 32, 16, 8), hidden=256):
        super().__init__()
        self.latent_dim = _check_positive_int(latent_dim, "latent_dim")
        self.channels = _check_positive_int(channels, "channels")
        hidden = _check_positive_int(hidden, "hidden")
        widths = tuple(_check_positive_int(w, "widths[i]") for w in widths)
        if not widths:
            raise ValueError("widths must hold at least one stage width")
        self.image_size = spatial_shape(image_size)
        ndim = len(self.image_size)
        factor = 2 ** len(widths)
        self.padded_size = padded_shape(self.image_size, factor)
        self.start = (widths[0],) + tuple(p // factor for p in self.padded_size)
        n_start = math.prod(self.start)
        self.fc = nn.Sequential(
            nn.Linear(self.latent_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True),
            nn.Linear(hidden, n_start), nn.BatchNorm1d(n_start), nn.ReLU(True),
        )
        layers = []
        if ndim == 2:
            outs = widths[1:] + (widths[-1],)
        else:  # the last stage draws the channels itself (see the class docstring)
            outs = widths[1:]
        for c_in, c_out in zip(widths, outs):
            layers += [CONV_TRANSPOSE[ndim](c_in, c_out, 4, stride=2, padding=1, bias=False),
                       BATCH_NORM[ndim](c_out), nn.ReLU(True)]
        if ndim == 2:
            layers.append(CONV[ndim](widths[-1], self.channels, 3, padding=1))
        else:
            layers.append(CONV_TRANSPOSE[ndim](widths[-1], self.channels, 4, stride=2, padding=1))
        self.deconv = nn.Sequential(*layers)

    def forward(self, z):
        logits = self.deconv(self.fc(z).view(-1, *self.start))
        if self.padded_size != self.image_size:
            logits = crop(logits, self.image_size)
        return output_activation(logits)


def _edge(half, d, softness):
    """Coverage of a pixel at distance ``d`` from a bar's axis by a bar of half-width ``half``: a
    sigmoid edge ``softness`` pixels wide, so that pixels near an edge pass a gradient to it (exact
    area coverage, tried too, passes gradients through edge pixels only and learned less)."""
    return torch.sigmoid((half - d) / softness)


def _straight_through(p):
    """0 or 1 forward (``p > 0.5``), the gradient of ``p`` backward: a stroke is drawn or not, and
    horizontal or vertical, never a grey or crossed mixture, while its odds still learn."""
    return (p > 0.5).to(p.dtype) + p - p.detach()


class StrokeDecoder(nn.Module):
    """A decoder that draws ``n_strokes`` dark axis-aligned bars on a white background.

    An MLP maps the latent vector to, per stroke, a presence ``p`` in (0, 1), a centre, a
    half-length, a half-width and an orientation weight ``o`` in (0, 1) (0: horizontal bar, 1:
    vertical). Each bar's coverage of a pixel is a product of two sigmoid edges, ``sigmoid((half -
    |u - c|) / softness)`` along and across it, ``o``-weighted between the two orientations, and
    the image is ``prod_k (1 - p_k * coverage_k)``: 1 where no stroke is, dark under strokes.
    Every pixel's value is differentiable in every stroke parameter, so a loss on the
    image's two-point statistics alone moves, lengthens, thickens, turns, adds and removes strokes.

    It is the lines experiment's "decoder built to draw strokes" (docs/replication.md): the
    generic decoders must learn to draw long straight continuous lines from the statistics alone,
    and on a CPU budget they draw broken dashes and haze instead. One-channel output only.

    Args:
        latent_dim: size of the latent vector.
        image_size: int or ``(H, W)`` of the output.
        channels: must be 1 (grey images, strokes dark).
        n_strokes: largest number of strokes one image can hold (default 6).
        hidden: width of the two hidden layers.
        softness: width in pixels of a bar's sigmoid edges.
        straight_through: names among ``("presence", "orientation")`` drawn 0 or 1 in the forward
            pass with their sigmoid's gradient backward (default none).
        layout: where strokes sit. ``"free"`` (default): every centre anywhere in the image (a
            sigmoid of the network's output). ``"slots"``: stroke ``k`` is centred on the ``k``-th
            of ``n_strokes`` evenly spaced rows and columns, moved by at most a quarter of their
            gap; its length, width, orientation and presence stay free. The statistics are
            translation invariant, so they give a stroke's position a gradient only where its
            correlation peaks already overlap the input's (a phase retrieval problem): free
            centres drift to the image edge, where the sigmoid saturates, and the lines model
            draws one bar whatever the number of lines. Slots stop that and raise the line count
            (28-36% against 22-25% over three seeds), with thinner, lighter grey bars and one
            seed reading 94.7% of the orientations (docs/replication.md).
        binary: in eval mode (reconstructions, :meth:`VAE.sample`), draw each pixel 0 (line) or 1:
            0 where the soft drawing is below one half, which is the line phase that the
            straight-through indicator of :class:`~pymks_vae.losses.SpatialStatsLoss` computes the
            statistics of. In training mode the soft drawing is returned, as the loss needs its
            gradient. Default False: the grey drawing, whose thin bars stay lighter than the
            paper's 0.05 reading level at their centre (docs/replication.md).

    Example:
        >>> dec = StrokeDecoder(latent_dim=3, image_size=32).eval()
        >>> y = dec(torch.zeros(2, 3)); tuple(y.shape), bool(((y >= 0) & (y <= 1)).all())
        ((2, 1, 32, 32), True)
    """

    N_PARAMS = 6  # presence, centre row, centre column, half-length, half-width, orientation

    LAYOUTS = ("slots", "free")

    def __init__(self, latent_dim, image_size, channels=1, n_strokes=6, hidden=256, softness=0.5,
                 straight_through=(), layout="free", binary=False):
        super().__init__()
        if not isinstance(binary, bool):
            raise TypeError(f"binary must be True or False, got {binary!r}")
        self.binary = binary
        if layout not in self.LAYOUTS:
            raise ValueError(f"layout must be one of {self.LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.straight_through = tuple(straight_through)
        if not set(self.straight_through) <= {"presence", "orientation"}:
            raise ValueError(f"straight_through must name 'presence' and/or 'orientation', got {straight_through!r}")
        if isinstance(softness, bool) or not isinstance(softness, (int, float)) or not softness > 0:
            raise ValueError(f"softness must be a number > 0, got {softness!r}")
        self.softness = float(softness)
        self.latent_dim = _check_positive_int(latent_dim, "latent_dim")
        self.channels = _check_positive_int(channels, "channels")
        if self.channels != 1:
            raise ValueError(f"the 'strokes' decoder draws grey images: channels must be 1, got {channels!r}")
        self.n_strokes = _check_positive_int(n_strokes, "n_strokes")
        hidden = _check_positive_int(hidden, "hidden")
        self.image_size = image_hw(image_size, owner="decoder='strokes' (bars drawn in a plane)")
        self.fc = nn.Sequential(
            nn.Linear(self.latent_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True),
        )
        self.head = nn.Linear(hidden, self.n_strokes * self.N_PARAMS)
        with torch.no_grad():
            # Strokes start spread over the image rather than all at its centre (free layout), or
            # at different offsets within their slots, so that they do not begin as copies of one another.
            k = self.n_strokes
            spread = torch.linspace(0.15, 0.85, k)
            bias = torch.zeros(k, self.N_PARAMS)
            bias[:, 1] = torch.logit(spread)
            bias[:, 2] = torch.logit(spread[torch.randperm(k, generator=torch.Generator().manual_seed(0))])
            self.head.bias.copy_(bias.reshape(-1))
        h, w = self.image_size
        self.register_buffer("rows", torch.arange(h, dtype=torch.float32).view(1, 1, h, 1), persistent=False)
        self.register_buffer("cols", torch.arange(w, dtype=torch.float32).view(1, 1, 1, w), persistent=False)

    def _maybe_hard(self, name, p):
        return _straight_through(p) if name in self.straight_through else p

    def strokes(self, z):
        """Stroke parameters ``(B, n_strokes)`` each: presence, row, col, half_length, half_width, orientation."""
        return self.strokes_from_raw(self.head(self.fc(z)))

    def strokes_from_raw(self, raw):
        """The stroke parameters (as :meth:`strokes`) of unconstrained numbers ``raw`` ``(B, n_strokes * N_PARAMS)``,
        the network's last layer's output: each mapped into its range (presences in (0, 1), centres
        in the image, ...)."""
        h, w = self.image_size
        side = float(max(h, w))
        a = raw.reshape(-1, self.n_strokes, self.N_PARAMS)
        if self.layout == "slots":
            k = self.n_strokes
            slot = (torch.arange(k, dtype=a.dtype, device=a.device) + 0.5) / k
            row = (slot + torch.tanh(a[..., 1]) * (0.25 / k)) * h - 0.5
            col = (slot + torch.tanh(a[..., 2]) * (0.25 / k)) * w - 0.5
        else:
            row, col = torch.sigmoid(a[..., 1]) * (h - 1), torch.sigmoid(a[..., 2]) * (w - 1)
        return {
            "presence": self._maybe_hard("presence", torch.sigmoid(a[..., 0])),
            "row": row,
            "col": col,
            "half_length": 1.0 + torch.sigmoid(a[..., 3]) * (side / 2),
            "half_width": 0.25 + torch.sigmoid(a[..., 4]) * (side / 16),
            "orientation": self._maybe_hard("orientation", torch.sigmoid(a[..., 5])),
        }

    def forward(self, z):
        return self.draw(self.head(self.fc(z)))

    def draw(self, raw):
        """The image ``(B, 1, H, W)`` of unconstrained stroke numbers ``raw`` ``(B, n_strokes * N_PARAMS)``
        (see :meth:`strokes_from_raw`): the decoder without its network, which
        :func:`pymks_vae.reconstruction.draw_strokes` searches directly."""
        s = {k: v[..., None, None] for k, v in self.strokes_from_raw(raw).items()}
        dy, dx = (self.rows - s["row"]).abs(), (self.cols - s["col"]).abs()
        horizontal = _edge(s["half_width"], dy, self.softness) * _edge(s["half_length"], dx, self.softness)
        vertical = _edge(s["half_width"], dx, self.softness) * _edge(s["half_length"], dy, self.softness)
        cover = s["orientation"] * vertical + (1 - s["orientation"]) * horizontal
        image = torch.prod(1.0 - s["presence"] * cover, dim=1, keepdim=True)
        if self.binary and not self.training:
            return (image >= 0.5).to(image.dtype)
        return image


def build_decoder(name, *, latent_dim, image_size, channels=1, stroke_layout="free", stroke_binary=False):
    """The decoder called ``name`` (one of :data:`DECODERS`; only ``"cnn"`` draws 3D volumes).

    Example:
        >>> build_decoder("paper", latent_dim=9, image_size=224).__class__.__name__
        'PaperDecoder'
    """
    if name == "paper":
        return PaperDecoder(latent_dim, image_size, channels)
    if name == "cnn":
        return ConvDecoder(latent_dim, image_size, channels)
    if name == "strokes":
        return StrokeDecoder(latent_dim, image_size, channels, layout=stroke_layout, binary=stroke_binary)
    raise ValueError(f"decoder must be one of {DECODERS}, got {name!r}")
