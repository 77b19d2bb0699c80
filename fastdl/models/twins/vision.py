"""Plain torch.nn twins of fastdl.models.vision: the same architectures, parameter and buffer
names, written as a torch user would (NCHW, unfused BatchNorm, separate residual adds)."""

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + skip)


class ResNet18(nn.Module):
    def __init__(
        self, num_classes: int = 10, stem: str = "cifar", width: int = 64, in_channels: int = 3
    ):
        super().__init__()
        self.stem = stem
        k, s, p = (3, 1, 1) if stem == "cifar" else (7, 2, 3)
        self.conv1 = nn.Conv2d(in_channels, width, k, s, p, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin = width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            stride = 1 if i == 0 else 2
            self.add_module(
                f"layer{i + 1}",
                nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)),
            )
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class ConvBlock(nn.Module):
    def __init__(self, conv: nn.Module, bn: bool, activation: str | None):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels) if bn else None
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        if self.activation == "relu":
            return F.relu(x)
        return F.leaky_relu(x, 0.2) if self.activation == "leaky_relu" else x


class DCGANGenerator(nn.Module):
    def __init__(self, nz: int = 64, width: int = 64, channels: int = 3):
        super().__init__()
        self.nz = nz
        w = [4 * width, 2 * width, width]
        self.blocks = nn.Sequential(
            ConvBlock(nn.ConvTranspose2d(nz, w[0], 4, 1, 0, bias=False), True, "relu"),
            ConvBlock(nn.ConvTranspose2d(w[0], w[1], 4, 2, 1, bias=False), True, "relu"),
            ConvBlock(nn.ConvTranspose2d(w[1], w[2], 4, 2, 1, bias=False), True, "relu"),
            ConvBlock(nn.ConvTranspose2d(w[2], channels, 4, 2, 1, bias=False), False, None),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.blocks(z.view(z.shape[0], self.nz, 1, 1)))


class DCGANDiscriminator(nn.Module):
    def __init__(self, width: int = 64, channels: int = 3):
        super().__init__()
        w = [width, 2 * width, 4 * width]
        self.blocks = nn.Sequential(
            ConvBlock(nn.Conv2d(channels, w[0], 4, 2, 1, bias=False), False, "leaky_relu"),
            ConvBlock(nn.Conv2d(w[0], w[1], 4, 2, 1, bias=False), True, "leaky_relu"),
            ConvBlock(nn.Conv2d(w[1], w[2], 4, 2, 1, bias=False), True, "leaky_relu"),
            ConvBlock(nn.Conv2d(w[2], 1, 4, 1, 0, bias=False), False, None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x).view(-1)


class DCGAN(nn.Module):
    def __init__(self, nz: int = 64, width: int = 64, channels: int = 3):
        super().__init__()
        self.generator = DCGANGenerator(nz, width, channels)
        self.discriminator = DCGANDiscriminator(width, channels)

    def forward(self, z: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fake = self.generator(z)
        d = self.discriminator
        frozen = {name: p.detach() for name, p in d.named_parameters()}
        return d(real), d(fake.detach()), torch.func.functional_call(d, frozen, (fake,))


def encoder(channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        ConvBlock(nn.Conv2d(channels, width, 4, 2, 1, bias=False), True, "relu"),
        ConvBlock(nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), True, "relu"),
    )


def decoder(channels: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        ConvBlock(nn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False), True, "relu"),
        ConvBlock(nn.ConvTranspose2d(width, channels, 4, 2, 1), False, None),
    )


class ConvAutoencoder(nn.Module):
    def __init__(self, width: int = 32, latent: int = 16, channels: int = 3):
        super().__init__()
        self.encoder = encoder(channels, width)
        self.code = nn.Conv2d(2 * width, latent, 3, 1, 1)
        self.expand = ConvBlock(nn.Conv2d(latent, 2 * width, 3, 1, 1), False, "relu")
        self.decoder = decoder(channels, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(self.expand(self.code(self.encoder(x)))))


class VAE(nn.Module):
    def __init__(self, width: int = 32, latent: int = 32, channels: int = 3):
        super().__init__()
        self.width = width
        flat = 2 * width * 8 * 8
        self.encoder = encoder(channels, width)
        self.mu = nn.Linear(flat, latent)
        self.logvar = nn.Linear(flat, latent)
        self.expand = nn.Linear(latent, flat)
        self.decoder = decoder(channels, width)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None):
        h = self.encoder(x).flatten(1)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu
        if self.training:
            eps = torch.randn_like(mu) if eps is None else eps
            z = mu + torch.exp(0.5 * logvar) * eps
        h = F.relu(self.expand(z)).view(-1, 2 * self.width, 8, 8)
        return self.decoder(h), mu, logvar


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(
        self,
        size: int = 32,
        patch: int = 4,
        num_classes: int = 10,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        channels: int = 3,
    ):
        super().__init__()
        self.patch_embed = nn.Conv2d(channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h)[:, 0])
