"""The PyTorch reference UNet of the MNIST diffusion tutorial."""

from unet_torch.model import ConvBlock, Decoder, Encoder, TimeEmbedding, Unet, UnetDown, UnetUp

__all__ = ["ConvBlock", "Decoder", "Encoder", "TimeEmbedding", "Unet", "UnetDown", "UnetUp"]
