"""Decoders of the VAE: each maps a latent batch ``(B, latent)`` to images ``(B, channels, H, W)``.

* :class:`PaperDecoder` (``"paper"``): the paper's decoder. ``latent -> 1024 (BN, ReLU) -> 1024
  (BN, ReLU) -> (64, 4, 4) -> three 3x3 stride-2 transposed convolutions (64 -> 32 -> 8 -> 3,
  BN/ReLU between) -> 39x39 -> bilinear resize to (H, W) -> 1x1 conv 3 -> channels``. Any image
  size works through the final resize (the paper used 224x224).
* :class:`ConvDecoder` (``"cnn"``): a lighter mirror of :class:`~pymks_vae.models.encoders.ConvEncoder`
  whose transposed convolutions reach (H, W) exactly, so thin lines of small images stay sharp;
  the CPU default.

The output activation is a sigmoid for one channel (a grey image in [0, 1]) and a softmax over
the channels otherwise (phase probabilities summing to 1 at every pixel).

Example:
    >>> import torch
    >>> from pymks_vae.models.decoder import PaperDecoder
    >>> PaperDecoder(latent_dim=9, image_size=64).eval()(torch.zeros(2, 9)).shape
    torch.Size([2, 1, 64, 64])
"""
import torch
from torch import nn
from torch.nn import functional as F

from pymks_vae.models.encoders import _check_positive_int, image_hw

__all__ = ["PaperDecoder", "ConvDecoder", "build_decoder", "DECODERS", "output_activation"]

DECODERS = ("paper", "cnn")


def output_activation(logits):
    """Sigmoid for one channel, softmax over channels otherwise."""
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
        self.image_size = image_hw(image_size)
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
    """A light decoder mirroring :class:`~pymks_vae.models.encoders.ConvEncoder`.

    ``latent -> hidden (BN, ReLU) -> widths[0] x (H/2^k) x (W/2^k) (BN, ReLU) -> k stages of
    (4x4 transposed conv, stride 2, BN, ReLU) -> 3x3 conv -> channels``, k = ``len(widths)``.

    Args:
        latent_dim: size of the latent vector.
        image_size: int or ``(H, W)``, divisible by ``2 ** len(widths)``.
        channels: output channels.
        widths: channels entering each upsampling stage (default ``(64, 32, 16, 8)``).
        hidden: width of the first fully connected layer.

    Example:
        >>> ConvDecoder(latent_dim=2, image_size=32, widths=(16, 8)).eval()(torch.zeros(1, 2)).shape
        torch.Size([1, 1, 32, 32])
    """

    def __init__(self, latent_dim, image_size, channels=1, widths=(64, 32, 16, 8), hidden=256):
        super().__init__()
        self.latent_dim = _check_positive_int(latent_dim, "latent_dim")
        self.channels = _check_positive_int(channels, "channels")
        hidden = _check_positive_int(hidden, "hidden")
        widths = tuple(_check_positive_int(w, "widths[i]") for w in widths)
        if not widths:
            raise ValueError("widths must hold at least one stage width")
        h, w = self.image_size = image_hw(image_size)
        factor = 2 ** len(widths)
        if h % factor or w % factor:
            raise ValueError(
                f"image_size {(h, w)} is not supported by the 'cnn' decoder with {len(widths)} stride-2 stages: "
                f"H and W must be divisible by {factor}"
            )
        self.start = (widths[0], h // factor, w // factor)
        n_start = widths[0] * (h // factor) * (w // factor)
        self.fc = nn.Sequential(
            nn.Linear(self.latent_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True),
            nn.Linear(hidden, n_start), nn.BatchNorm1d(n_start), nn.ReLU(True),
        )
        layers = []
        for c_in, c_out in zip(widths, widths[1:] + (widths[-1],)):
            layers += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(True)]
        layers.append(nn.Conv2d(widths[-1], self.channels, 3, padding=1))
        self.deconv = nn.Sequential(*layers)

    def forward(self, z):
        return output_activation(self.deconv(self.fc(z).view(-1, *self.start)))


def build_decoder(name, *, latent_dim, image_size, channels=1):
    """The decoder called ``name`` (one of :data:`DECODERS`).

    Example:
        >>> build_decoder("paper", latent_dim=9, image_size=224).__class__.__name__
        'PaperDecoder'
    """
    if name == "paper":
        return PaperDecoder(latent_dim, image_size, channels)
    if name == "cnn":
        return ConvDecoder(latent_dim, image_size, channels)
    raise ValueError(f"decoder must be one of {DECODERS}, got {name!r}")
