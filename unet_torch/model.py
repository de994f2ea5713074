"""The PyTorch reference: the MNIST diffusion tutorial's UNet, module for module.

The classes, their arguments and their ``state_dict`` names are exactly the tutorial's
(cells 2, 5, 8 and 11 of ``shared/seeds/000_ea2f922525bcfbec.txt``), so a state_dict saved
by the tutorial loads here with ``strict=True`` and the other way round. Only the layout of
the source changed; behaviour did not.
"""

import torch
import torch.nn as nn


class ConvBlock(nn.Module):
    """Conv 3x3 -> GroupNorm(8) -> ReLU; keeps the spatial size."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, 1, 1),
            nn.GroupNorm(8, out_channels),
            nn.ReLU(),
        )

    def forward(self, x):
        return self.block(x)


class UnetDown(nn.Module):
    """ConvBlock then MaxPool2d(downscale)."""

    def __init__(self, in_channels, out_channels, downscale=2):
        super().__init__()
        self.model = nn.Sequential(ConvBlock(in_channels, out_channels), nn.MaxPool2d(downscale))

    def forward(self, x):
        return self.model(x)


class Encoder(nn.Module):
    """1x28x28 -> 64x28x28 -> 64x14x14 -> 128x7x7 -> 128x3x3 -> 128x1x1."""

    def __init__(self):
        super().__init__()
        self.initial_features = nn.Sequential(
            nn.Conv2d(1, 64, 3, 1, 1),
            nn.GroupNorm(8, 64),
            nn.ReLU(),
        )
        self.down1 = UnetDown(64, 64, downscale=2)
        self.down2 = UnetDown(64, 128, downscale=2)
        self.down3 = UnetDown(128, 128, downscale=2)
        self.down4 = nn.Sequential(nn.AvgPool2d(3), nn.ReLU())

    def forward(self, x):
        x_f = self.initial_features(x)
        d1 = self.down1(x_f)
        d2 = self.down2(d1)
        d3 = self.down3(d2)
        latent = self.down4(d3)
        return x_f, d1, d2, d3, latent


class UnetUp(nn.Module):
    """Concatenate (x, skip) on channels, ConvTranspose2d(upscale, upscale), ConvBlock."""

    def __init__(self, in_channels, out_channels, upscale=2, extra_dim=0):
        super().__init__()
        self.model = nn.Sequential(
            nn.ConvTranspose2d(in_channels, out_channels, upscale, upscale, output_padding=extra_dim),
            ConvBlock(out_channels, out_channels),
        )

    def forward(self, x, skip):
        x = torch.cat((x, skip), 1)
        return self.model(x)


class Decoder(nn.Module):
    """128x1x1 -> 128x3x3 -> 128x7x7 -> 64x14x14 -> 64x28x28 -> 1x28x28, with skips."""

    def __init__(self):
        super().__init__()
        # The first decoder layer has no skip connection.
        self.up1 = nn.Sequential(
            nn.ConvTranspose2d(128, 128, 3, 3),
            nn.GroupNorm(8, 128),
            nn.ReLU(),
        )
        self.up2 = UnetUp(256, 128, upscale=2, extra_dim=1)
        self.up3 = UnetUp(256, 64, upscale=2)
        self.up4 = UnetUp(128, 64, upscale=2)
        self.out = nn.Conv2d(128, 1, 3, 1, 1)

    def forward(self, latent, d3, d2, d1, x_f):
        u1 = self.up1(latent)
        u2 = self.up2(u1, d3)
        u3 = self.up3(u2, d2)
        u4 = self.up4(u3, d1)
        eps_hat = self.out(torch.cat([u4, x_f], dim=1))
        return u1, u2, u3, u4, eps_hat


class TimeEmbedding(nn.Module):
    """t / n_T -> sin(Linear(1, 32)) -> Linear(32, embedding_dim), shaped (B, C, 1, 1)."""

    def __init__(self, embedding_dim):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.lin1 = nn.Linear(1, 32, bias=False)
        self.lin2 = nn.Linear(32, embedding_dim)

    def forward(self, ts):
        ts = ts.view(-1, 1)
        temb = torch.sin(self.lin1(ts))
        temb = self.lin2(temb)
        return temb.view(-1, self.embedding_dim, 1, 1)


class Unet(nn.Module):
    """eps_hat = Unet(x, t): x is (B, 1, 28, 28), t is (B,) holding timestep / n_T."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()
        self.decoder = Decoder()
        self.time_embedding_layer = TimeEmbedding(128)

    def forward(self, x, t):
        x_f, d1, d2, d3, latent = self.encoder(x)
        temb = self.time_embedding_layer(t)
        latent_temb = latent + temb
        _, _, _, _, eps_hat = self.decoder(latent_temb, d3, d2, d1, x_f)
        return eps_hat
