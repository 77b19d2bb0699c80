"""Vision models built from fastdl primitives: ResNet-18 (CIFAR and ImageNet stems), a DCGAN, a
convolutional autoencoder, a VAE and a ViT, with the synthetic image data they train on.

Each model's plain-torch twin is in fastdl/models/twins/vision.py under the same parameter and
buffer names. Every image model checks its input shape and raises ValueError naming itself and
the argument.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

import fastdl
from fastdl import _checks
from fastdl import nn as fnn
from fastdl.models.spec import ModelSpec, add_norm, check_dtype, check_heads
from fastdl.models.twins import vision as twins

# ---------------------------------------------------------------- input checks


def given(x) -> tuple | str:
    """What an input check reports as given: a tensor's shape, else the type's name."""
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def check_images(
    model: nn.Module,
    x: torch.Tensor,
    channels: int,
    size: int | None,
    min_size: int = 1,
    name: str = "x",
):
    """x must be (N, channels, H, W) in the model's dtype: H = W = size when size is given, else
    H, W >= min_size. Errors name the model's class and the argument ``name``."""
    want = f"(N, {channels}, {size or 'H'}, {size or 'W'})"
    ok = isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[1] == channels
    if ok and size is not None:
        ok = x.shape[2] == size and x.shape[3] == size
    if ok and size is None:
        ok = min(x.shape[2], x.shape[3]) >= min_size
        want += f" with H, W >= {min_size}"
    model_name = type(model).__name__
    if not ok:
        raise ValueError(f"{model_name}: {name} must be {want}, got {given(x)}")
    check_dtype(model, name, x)


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """x in channels_last: fastdl's CPU conv kernels compute on NHWC and return the input's
    layout, so an NCHW activation costs a layout copy on the way into every conv and out."""
    return x.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- ResNet-18


def conv_bn_eval(conv, bn, x, activation=None, residual=None):
    """conv followed by eval-mode BatchNorm as one fused conv (inference only; training needs
    the batch statistics): w' = w * g, b' = beta - mean * g with g = gamma / sqrt(var + eps),
    then ``act(conv(x, w') + b' + residual)`` in the conv's epilogue."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    weight = conv.weight * scale.view(-1, 1, 1, 1)
    bias = bn.bias - bn.running_mean * scale
    return fastdl.conv2d(
        x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
        activation=activation, residual=residual,
    )  # fmt: skip


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., 2016): ``relu(bn2(conv2(relu(bn1(conv1(x))))) + skip(x))``,
    skip a strided 1x1 conv + BN when the shape changes. Training: BN1's ReLU runs inside the
    BN kernel. Eval: each BN is folded into its conv and the residual add and final ReLU run in
    conv2's epilogue (the batch statistics of training leave no room for that fusion)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = fnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = fnn.BatchNorm2d(cout, activation="relu")
        self.conv2 = fnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = fnn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                fnn.Conv2d(cin, cout, 1, stride, bias=False), fnn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            skip = x if self.downsample is None else conv_bn_eval(*self.downsample, x)
            h = conv_bn_eval(self.conv1, self.bn1, x, activation="relu")
            return conv_bn_eval(self.conv2, self.bn2, h, activation="relu", residual=skip)
        skip = x if self.downsample is None else self.downsample(x)
        # bn2's output is not saved by its backward, so the add and ReLU may reuse its memory.
        return self.bn2(self.conv2(self.bn1(self.conv1(x)))).add_(skip).relu_()


class ResNet18(nn.Module):
    """ResNet-18 (He et al., 2016): a stem, four stages of two basic blocks (width, 2x, 4x, 8x
    channels; stages 2-4 halve the resolution), global average pooling and a linear classifier.

    ``stem="cifar"``: a 3x3 stride-1 conv, no max-pool (32x32 inputs). ``stem="imagenet"``: a
    7x7 stride-2 conv and a 3x3 stride-2 max-pool (224x224 inputs; any size >= 32 works).
    Parameter names follow torchvision's resnet18. Activations run in channels_last
    (:func:`nhwc`). Input: x (N, in_channels, H, W); output logits (N, classes).
    """

    def __init__(
        self, num_classes: int = 10, stem: str = "cifar", width: int = 64, in_channels: int = 3
    ):
        super().__init__()
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"ResNet18: stem must be 'cifar' or 'imagenet', got {stem!r}")
        self.stem, self.in_channels = stem, in_channels
        k, s, p = (3, 1, 1) if stem == "cifar" else (7, 2, 3)
        self.conv1 = fnn.Conv2d(in_channels, width, k, s, p, bias=False)
        self.bn1 = fnn.BatchNorm2d(width, activation="relu")
        widths = [width, 2 * width, 4 * width, 8 * width]
        cin = width
        for i, cout in enumerate(widths):
            stride = 1 if i == 0 else 2
            self.add_module(
                f"layer{i + 1}",
                nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)),
            )
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(self, x, self.in_channels, None, 8 if self.stem == "cifar" else 32)
        x = nhwc(x)
        if self.training:
            x = self.bn1(self.conv1(x))
        else:
            x = conv_bn_eval(self.conv1, self.bn1, x, activation="relu")
        if self.stem == "imagenet":
            x = F.max_pool2d(x, 3, 2, 1)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------- DCGAN


class ConvBlock(nn.Module):
    """conv (or transposed conv) -> optional BatchNorm -> activation: "relu" (inside the BN
    kernel, or in a Conv2d's epilogue when there is no BN), "leaky_relu" (slope 0.2) or None."""

    def __init__(self, conv: nn.Module, bn: bool, activation: str | None):
        super().__init__()
        self.conv = conv
        relu = activation == "relu"
        self.bn = (
            fnn.BatchNorm2d(conv.out_channels, activation="relu" if relu else None) if bn else None
        )
        if relu and not bn:
            if not isinstance(conv, fnn.Conv2d):
                raise ValueError("ConvBlock: a ReLU without BatchNorm needs a Conv2d to fuse into")
            conv.activation = "relu"
        self.leaky = activation == "leaky_relu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.bn(x)
        return F.leaky_relu(x, 0.2) if self.leaky else x


class DCGANGenerator(nn.Module):
    """DCGAN generator (Radford et al., 2016) for 32x32 images: z (N, nz) or (N, nz, 1, 1) ->
    4x4 -> 8x8 -> 16x16 -> 32x32 through 4x4 transposed convs, BN + ReLU between, tanh out."""

    def __init__(self, nz: int = 64, width: int = 64, channels: int = 3):
        super().__init__()
        self.nz = nz
        w = [4 * width, 2 * width, width]
        self.blocks = nn.Sequential(
            ConvBlock(fnn.ConvTranspose2d(nz, w[0], 4, 1, 0, bias=False), True, "relu"),
            ConvBlock(fnn.ConvTranspose2d(w[0], w[1], 4, 2, 1, bias=False), True, "relu"),
            ConvBlock(fnn.ConvTranspose2d(w[1], w[2], 4, 2, 1, bias=False), True, "relu"),
            ConvBlock(fnn.ConvTranspose2d(w[2], channels, 4, 2, 1, bias=False), False, None),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or (
            tuple(z.shape[1:]) not in ((self.nz,), (self.nz, 1, 1))
        ):
            raise ValueError(
                f"DCGANGenerator: z must be (N, {self.nz}) or (N, {self.nz}, 1, 1), got {given(z)}"
            )
        check_dtype(self, "z", z)
        # The first block's 1x1 input is as much NCHW as NHWC; its 4x4 output goes NHWC.
        h = nhwc(self.blocks[0](z.view(z.shape[0], self.nz, 1, 1)))
        return torch.tanh(self.blocks[1:](h))


class DCGANDiscriminator(nn.Module):
    """DCGAN discriminator for 32x32 images: 4x4 stride-2 convs 32 -> 16 -> 8 -> 4 with
    LeakyReLU(0.2) (BN after all but the first), then a 4x4 conv to one logit per image."""

    def __init__(self, width: int = 64, channels: int = 3):
        super().__init__()
        self.channels = channels
        w = [width, 2 * width, 4 * width]
        self.blocks = nn.Sequential(
            ConvBlock(fnn.Conv2d(channels, w[0], 4, 2, 1, bias=False), False, "leaky_relu"),
            ConvBlock(fnn.Conv2d(w[0], w[1], 4, 2, 1, bias=False), True, "leaky_relu"),
            ConvBlock(fnn.Conv2d(w[1], w[2], 4, 2, 1, bias=False), True, "leaky_relu"),
            ConvBlock(fnn.Conv2d(w[2], 1, 4, 1, 0, bias=False), False, None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(self, x, self.channels, 32)
        return self.blocks(nhwc(x)).view(-1)


class DCGAN(nn.Module):
    """A generator and a discriminator trained together by one optimizer: ``forward(z, real)``
    returns the discriminator's logits on the real images, on the generated ones as a constant
    (the discriminator's loss) and on the generated ones through a frozen copy of its
    parameters (the generator's loss), so one backward gives each network only its own
    gradient: simultaneous gradient descent on the non-saturating GAN game (Goodfellow et al.,
    2014; see :func:`gan_loss`)."""

    def __init__(self, nz: int = 64, width: int = 64, channels: int = 3):
        super().__init__()
        self.generator = DCGANGenerator(nz, width, channels)
        self.discriminator = DCGANDiscriminator(width, channels)

    def forward(self, z: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, ...]:
        check_images(self, real, self.discriminator.channels, 32, name="real")
        fake = self.generator(z)
        d = self.discriminator
        frozen = {name: p.detach() for name, p in d.named_parameters()}
        return d(real), d(fake.detach()), torch.func.functional_call(d, frozen, (fake,))


def gan_loss(logits: tuple[torch.Tensor, ...], _target=None) -> torch.Tensor:
    """Discriminator BCE (real -> 1, fake -> 0) plus the non-saturating generator loss
    -log D(G(z)), from the logits of :class:`DCGAN` (softplus(-l) = -log sigmoid(l))."""
    real, fake, gen = logits
    return F.softplus(-real).mean() + F.softplus(fake).mean() + F.softplus(-gen).mean()


# ---------------------------------------------------------------- autoencoder and VAE


def encoder(channels: int, width: int) -> nn.Sequential:
    """32x32 -> 16x16 -> 8x8: two 4x4 stride-2 convs, BN + ReLU after each."""
    return nn.Sequential(
        ConvBlock(fnn.Conv2d(channels, width, 4, 2, 1, bias=False), True, "relu"),
        ConvBlock(fnn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), True, "relu"),
    )


def decoder(channels: int, width: int) -> nn.Sequential:
    """8x8 -> 16x16 -> 32x32: two 4x4 stride-2 transposed convs (BN + ReLU after the first), the
    output as logits."""
    return nn.Sequential(
        ConvBlock(fnn.ConvTranspose2d(2 * width, width, 4, 2, 1, bias=False), True, "relu"),
        ConvBlock(fnn.ConvTranspose2d(width, channels, 4, 2, 1), False, None),
    )


class ConvAutoencoder(nn.Module):
    """Convolutional autoencoder for 32x32 images in [0, 1]: the encoder to an 8x8 code of
    ``latent`` channels (a 3x3 conv), the decoder back; output sigmoid(logits)."""

    def __init__(self, width: int = 32, latent: int = 16, channels: int = 3):
        super().__init__()
        self.channels = channels
        self.encoder = encoder(channels, width)
        self.code = fnn.Conv2d(2 * width, latent, 3, 1, 1)
        self.expand = ConvBlock(fnn.Conv2d(latent, 2 * width, 3, 1, 1), False, "relu")
        self.decoder = decoder(channels, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(self, x, self.channels, 32)
        return torch.sigmoid(self.decoder(self.expand(self.code(self.encoder(nhwc(x))))))


class VAE(nn.Module):
    """Variational autoencoder (Kingma & Welling, 2014) for 32x32 images in [0, 1]: the
    encoder, linear heads for the posterior mean and log-variance, the reparametrization
    ``z = mu + exp(logvar / 2) * eps`` (eps ~ N(0, I) from torch's generator, or given; eval
    mode uses z = mu), a linear layer back to 8x8 and the decoder. Returns (logits, mu, logvar);
    :func:`elbo_loss` scores them."""

    def __init__(self, width: int = 32, latent: int = 32, channels: int = 3):
        super().__init__()
        self.channels, self.width = channels, width
        flat = 2 * width * 8 * 8
        self.encoder = encoder(channels, width)
        self.mu = nn.Linear(flat, latent)
        self.logvar = nn.Linear(flat, latent)
        self.expand = nn.Linear(latent, flat)
        self.decoder = decoder(channels, width)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None):
        check_images(self, x, self.channels, 32)
        if eps is not None:
            if not isinstance(eps, torch.Tensor) or not eps.is_floating_point():
                got = eps.dtype if isinstance(eps, torch.Tensor) else type(eps).__name__
                raise _checks.DtypeError(f"VAE: eps must be a floating-point tensor, got {got}")
            # Exactly mu's shape: a (latent,) or (1, latent) eps would broadcast, giving every
            # image the same noise.
            latent = (x.shape[0], self.mu.out_features)
            if eps.shape != latent:
                raise ValueError(
                    f"VAE: eps must have the latent mean's shape (N, latent) = {latent}, "
                    f"got {tuple(eps.shape)}"
                )
            check_dtype(self, "eps", eps)
        h = self.encoder(nhwc(x)).flatten(1)
        mu, logvar = self.mu(h), self.logvar(h)
        z = mu
        if self.training:
            eps = torch.randn_like(mu) if eps is None else eps
            z = mu + torch.exp(0.5 * logvar) * eps
        h = F.relu(self.expand(z)).view(-1, 2 * self.width, 8, 8)
        return self.decoder(nhwc(h)), mu, logvar


def elbo_loss(out: tuple[torch.Tensor, ...], x: torch.Tensor) -> torch.Tensor:
    """The negative ELBO per image: Bernoulli reconstruction (binary cross-entropy summed over
    pixels) plus KL(q(z|x) || N(0, I)) = -1/2 sum(1 + logvar - mu^2 - exp(logvar))."""
    logits, mu, logvar = out
    recon = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.square() - logvar.exp())
    return (recon + kl) / x.shape[0]


# ---------------------------------------------------------------- ViT


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class EncoderBlock(nn.Module):
    """Pre-norm Transformer encoder block: x + attn(norm1(x)), then + mlp(norm2(.)), each residual
    add fused with the LayerNorm after it: ``forward(h, d)`` takes the previous block's MLP output
    ``d`` not yet added to ``h`` (None before the first block) and returns ``h`` before its own
    MLP output's add and that output, so a block reads only its own weights (FSDP2 can shard it
    as a unit)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = fnn.LayerNorm(dim, eps=1e-6)
        self.attn = fnn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = fnn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, h: torch.Tensor, d: torch.Tensor | None):
        y, h = (self.norm1(h), h) if d is None else add_norm(h, d, self.norm1)
        a = self.attn(y, y, y, need_weights=False)[0]
        y, h = add_norm(h, a, self.norm2)
        return h, self.mlp(y)


class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al., 2021): non-overlapping patches embedded by a
    strided conv, a class token, learned position embeddings, pre-norm encoder blocks with fused
    attention (fastdl.scaled_dot_product_attention inside MultiheadAttention), a final
    LayerNorm and a linear head on the class token. Every residual add is fused with the
    LayerNorm that follows it (fastdl.add_layer_norm). Input (N, channels, size, size)."""

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
        if patch < 1 or size < 1 or size % patch:
            raise ValueError(
                f"ViT: size ({size}) must be a positive multiple of patch ({patch}), "
                "which must be >= 1"
            )
        check_heads("ViT", "dim", dim, heads)
        self.size, self.channels = size, channels
        self.patch_embed = fnn.Conv2d(channels, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(EncoderBlock(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = fnn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(self, x, self.channels, self.size)
        # From NHWC the patch embedding's (N, dim, h, w) output is (N, h * w, dim) in memory.
        h = self.patch_embed(nhwc(x)).flatten(2).transpose(1, 2)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], 1) + self.pos_embed
        d = None
        for block in self.blocks:
            h, d = block(h, d)
        y = self.norm(h) if d is None else add_norm(h, d, self.norm)[0]
        return self.head(y[:, 0])


# ---------------------------------------------------------------- data


def _patterns(u: torch.Tensor, v: torch.Tensor, r, freq, phase) -> torch.Tensor:
    """Ten class patterns in [0, 1], (10, N, S, S), on centred coordinates u, v (N, S, S)."""
    rad = torch.sqrt(u * u + v * v)
    box = torch.maximum(u.abs(), v.abs())
    wave = freq * math.pi
    patterns = [
        rad < r,  # disk
        (rad - r).abs() < 0.12,  # ring
        box < 0.8 * r,  # square
        ((u.abs() < 0.12) | (v.abs() < 0.12)) & (box < r),  # cross
        torch.sin(wave * v + phase) > 0,  # horizontal stripes
        torch.sin(wave * u + phase) > 0,  # vertical stripes
        torch.sin(wave * (u + v) / math.sqrt(2) + phase) > 0,  # diagonal stripes
        torch.sin(wave * u + phase) * torch.sin(wave * v + phase) > 0,  # checkerboard
        (v < 0.5 * r) & (2 * u.abs() < 0.5 * r - v),  # triangle, apex up
        torch.exp(-(rad * rad) / (0.5 * r * r)),  # soft blob
    ]
    return torch.stack([p.to(u.dtype) for p in patterns])


def shape_images(
    generator: torch.Generator, n: int, size: int = 32, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A synthetic 10-class image task: each class is a pattern (disk, ring, square, cross,
    horizontal / vertical / diagonal stripes, checkerboard, triangle, blob) at a random position,
    scale, frequency and phase, in a random colour on a random background, plus Gaussian noise.
    Returns images (n, 3, size, size) in [0, 1] and labels (n,) int64, all drawn from
    ``generator`` (CPU), then moved to ``device``."""

    def rand(*shape):
        return torch.rand(*shape, generator=generator)

    labels = torch.randint(10, (n,), generator=generator)
    axis = torch.linspace(-1, 1, size)
    centre = (rand(n, 2, 1, 1) - 0.5) * 0.6
    u = axis.view(1, 1, size) - centre[:, 0]
    u, v = torch.broadcast_tensors(u, axis.view(1, size, 1) - centre[:, 1])
    r = 0.35 + 0.25 * rand(n, 1, 1)
    freq = 2.5 + 1.5 * rand(n, 1, 1)
    phase = 2 * math.pi * rand(n, 1, 1)
    pattern = _patterns(u, v, r, freq, phase)[labels, torch.arange(n)].unsqueeze(1)
    fg, bg = 0.5 + 0.5 * rand(n, 3, 1, 1), 0.4 * rand(n, 3, 1, 1)
    noise = torch.randn(n, 3, size, size, generator=generator)
    images = (bg + (fg - bg) * pattern + 0.08 * noise).clamp_(0, 1)
    return images.to(device), labels.to(device)


# ---------------------------------------------------------------- specs


def _classify(size: int, n: int):
    def batch(generator, device):
        x, y = shape_images(generator, n, size, device)
        return (x,), y

    return batch


def _reconstruct(n: int):
    def batch(generator, device):
        x = shape_images(generator, n, 32, device)[0]
        return (x,), x

    return batch


def _gan_batch(n: int, nz: int):
    def batch(generator, device):
        real = shape_images(generator, n, 32)[0] * 2 - 1  # tanh range
        z = torch.randn(n, nz, generator=generator)
        return (z.to(device), real.to(device)), None

    return batch


SPECS = (
    ModelSpec(
        name="resnet18",
        group="vision",
        task="ResNet-18 (CIFAR stem) classifying 32x32 synthetic shape images, batch 32",
        build=lambda: ResNet18(10, "cifar"),
        twin=lambda: twins.ResNet18(10, "cifar"),
        batch=_classify(32, 32),
        loss=F.cross_entropy,
    ),
    ModelSpec(
        name="resnet18-imagenet",
        group="vision",
        task="ResNet-18 (ImageNet stem) classifying 64x64 synthetic shape images, batch 16",
        build=lambda: ResNet18(10, "imagenet"),
        twin=lambda: twins.ResNet18(10, "imagenet"),
        batch=_classify(64, 16),
        loss=F.cross_entropy,
    ),
    ModelSpec(
        name="dcgan",
        group="vision",
        task="DCGAN generating 32x32 synthetic shape images, batch 64",
        build=lambda: DCGAN(64, 32),
        twin=lambda: twins.DCGAN(64, 32),
        batch=_gan_batch(64, 64),
        loss=gan_loss,
        lr=2e-4,
    ),
    ModelSpec(
        name="autoencoder",
        group="vision",
        task="convolutional autoencoder reconstructing 32x32 synthetic shape images, batch 64",
        build=lambda: ConvAutoencoder(32, 16),
        twin=lambda: twins.ConvAutoencoder(32, 16),
        batch=_reconstruct(64),
        loss=F.mse_loss,
    ),
    ModelSpec(
        name="vae",
        group="vision",
        task="VAE (ELBO) on 32x32 synthetic shape images, batch 64",
        build=lambda: VAE(32, 32),
        twin=lambda: twins.VAE(32, 32),
        batch=_reconstruct(64),
        loss=elbo_loss,
    ),
    ModelSpec(
        name="vit",
        group="vision",
        task="ViT (patch 4, dim 128, depth 4) classifying 32x32 synthetic shape images, batch 64",
        build=lambda: ViT(),
        twin=lambda: twins.ViT(),
        batch=_classify(32, 64),
        loss=F.cross_entropy,
    ),
)
