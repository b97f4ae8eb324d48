"""VAE models: :class:`VAE` and its encoders and decoders; :class:`StatsVAE`, a VAE of two-point statistics.

Example:
    >>> from pymks_vae.models import VAE
    >>> VAE(latent_dim=9, image_size=64).config["decoder"]
    'cnn'
"""
from pymks_vae.models.decoder import ConvDecoder, PaperDecoder
from pymks_vae.models.encoders import ConvEncoder, ResNet152Encoder, StatsEncoder
from pymks_vae.models.stats_vae import StatsVAE
from pymks_vae.models.vae import VAE

__all__ = ["VAE", "StatsVAE", "ConvEncoder", "StatsEncoder", "ResNet152Encoder", "ConvDecoder", "PaperDecoder"]
