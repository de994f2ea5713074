"""unet-jax: a Flax Linen mirror of the MNIST diffusion tutorial's UNet."""

from unet_jax.model import ConvBlock, Decoder, Encoder, TimeEmbedding, Unet, UnetDown, UnetUp, init_variables

__all__ = ["ConvBlock", "Decoder", "Encoder", "TimeEmbedding", "Unet", "UnetDown", "UnetUp", "init_variables"]
