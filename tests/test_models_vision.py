"""fastdl.models.vision against its plain-torch twins (fastdl/models/twins/vision.py): the same
weights give the same outputs and gradients, 20 AdamW steps give the same losses (the
convergence test of Liger-Kernel), eval mode (folded BatchNorm) agrees, bad inputs raise."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fastdl.models import train
from fastdl.models import vision as V
from fastdl.models.twins import vision as T

SPECS = {spec.name: spec for spec in V.SPECS}


def _classify(n, size):
    def batch(generator, device):
        x, y = V.shape_images(generator, n, size, device)
        return (x,), y

    return batch


def _reconstruct(generator, device):
    x = V.shape_images(generator, 4, 32, device)[0]
    return (x,), x


def _gan(generator, device):
    real = V.shape_images(generator, 4, 32, device)[0] * 2 - 1
    return (torch.randn(4, 8, generator=generator), real), None


# Small configurations of every spec: (build, twin, batch).
SMALL = {
    "resnet18": (
        lambda: V.ResNet18(10, "cifar", width=8),
        lambda: T.ResNet18(10, "cifar", width=8),
        _classify(8, 32),
    ),
    "resnet18-imagenet": (
        lambda: V.ResNet18(10, "imagenet", width=8),
        lambda: T.ResNet18(10, "imagenet", width=8),
        _classify(8, 48),
    ),
    "dcgan": (lambda: V.DCGAN(8, 8), lambda: T.DCGAN(8, 8), _gan),
    "autoencoder": (
        lambda: V.ConvAutoencoder(8, 4),
        lambda: T.ConvAutoencoder(8, 4),
        _reconstruct,
    ),
    "vae": (lambda: V.VAE(8, 8), lambda: T.VAE(8, 8), _reconstruct),
    "vit": (
        lambda: V.ViT(32, 8, 10, dim=32, depth=2, heads=2),
        lambda: T.ViT(32, 8, 10, dim=32, depth=2, heads=2),
        _classify(4, 32),
    ),
}


def small(name: str):
    build, twin, batch = SMALL[name]
    return dataclasses.replace(SPECS[name], build=build, twin=twin, batch=batch)


def pair(spec):
    torch.manual_seed(0)
    model = spec.build()
    twin = spec.twin()
    twin.load_state_dict(model.state_dict())
    return model, twin


def data(spec, seed=0):
    return spec.batch(torch.Generator().manual_seed(seed), torch.device("cpu"))


def outputs(out):
    return out if isinstance(out, tuple) else (out,)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_specs_cover_the_issue():
    assert set(SPECS) == set(SMALL)
    for spec in V.SPECS:
        assert spec.group == "vision" and spec.train


@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_and_gradients_match_twin(name):
    # Gradients are compared in float64: in float32 a ReLU whose pre-activation rounds to the
    # other side of zero (seen: -1.9e-6 in torch, +5.7e-7 in fastdl, both within float32
    # rounding of a conv) flips one mask entry, and the BatchNorm backward below it turns that
    # into a 1e-2 relative change of a whole layer's gradient. float64 leaves no such flip, so
    # the composition is checked tightly; the float32 forward is checked beside it.
    spec = small(name)
    model, twin = pair(spec)
    inputs, target = data(spec)
    for a, b in zip(outputs(_run(model, inputs)), outputs(_run(twin, inputs)), strict=True):
        assert a.shape == b.shape
        assert rel(a, b) <= 1e-4
    model, twin = (m.double() for m in pair(spec))  # fresh BatchNorm running statistics
    inputs = tuple(t.double() for t in inputs)
    target = target.double() if target is not None and target.is_floating_point() else target
    results = []
    for m in (model, twin):
        out = _run(m, inputs)
        spec.loss(out, target).backward()
        results.append(out)
    for a, b in zip(outputs(results[0]), outputs(results[1]), strict=True):
        assert rel(a, b) <= 1e-10
    grads = dict(model.named_parameters())
    for pname, p in twin.named_parameters():
        assert grads[pname].grad is not None, pname
        assert rel(grads[pname].grad, p.grad) <= 1e-9, pname
    for bname, buf in twin.named_buffers():  # BatchNorm running statistics
        assert rel(model.get_buffer(bname).double(), buf.double()) <= 1e-10, bname


def _run(m, inputs):
    torch.manual_seed(1)  # the VAE's noise
    return m(*inputs)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_training_matches_twin(name):
    """20 AdamW steps (fastdl.models.train.step) from the same weights on the same batches: the
    losses agree at every step. At lr 1e-4: rounding differences grow chaotically through
    BatchNorm and Adam's normalized updates, and at 1e-3 torch's own ResNet-18 trained in
    channels_last instead of NCHW drifts from itself by 1e-2 relative by step 15."""
    spec = dataclasses.replace(small(name), lr=1e-4)
    run = train.train(spec, 20, torch.device("cpu"))
    ours, theirs = (torch.tensor(run.losses[who]) for who in ("fastdl", "torch"))
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=0)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_eval_matches_twin(name):
    """Eval mode after a few training steps (running statistics away from their start): the
    running-stat BatchNorm (folded into the convs in ResNet) and the VAE's z = mu."""
    spec = small(name)
    model, twin = pair(spec)
    opt = train.optimizer(model, spec)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        train.step(model, opt, spec, *spec.batch(gen, torch.device("cpu")))
    twin.load_state_dict(model.state_dict())
    model.eval()
    twin.eval()
    inputs, _ = data(spec, seed=1)
    with torch.no_grad():
        for a, b in zip(outputs(model(*inputs)), outputs(twin(*inputs)), strict=True):
            assert rel(a, b) <= 1e-4


def test_resnet_eval_folds_batch_norm_and_keeps_gradients():
    """Eval-mode ResNet runs folded convs, yet still differentiates (to weights and input)."""
    model, twin = pair(small("resnet18"))
    model.eval()
    twin.eval()
    x = data(small("resnet18"))[0][0]
    xs = [x.clone().requires_grad_() for _ in range(2)]
    for m, xi in zip((model, twin), xs, strict=True):
        m(xi).square().sum().backward()
    assert rel(xs[0].grad, xs[1].grad) <= 1e-4
    assert rel(model.layer2[0].bn2.weight.grad, twin.layer2[0].bn2.weight.grad) <= 1e-4


def test_resnet_stems():
    x = torch.randn(2, 3, 64, 64)
    cifar, imagenet = V.ResNet18(5, "cifar", 8), V.ResNet18(5, "imagenet", 8)
    assert cifar.conv1.kernel_size == (3, 3) and imagenet.conv1.kernel_size == (7, 7)
    assert cifar(x).shape == imagenet(x).shape == (2, 5)
    with pytest.raises(ValueError, match="ResNet18: stem must be 'cifar' or 'imagenet'"):
        V.ResNet18(stem="tiny")


def test_vae_noise_and_elbo():
    model = V.VAE(8, 8)
    x = data(small("vae"))[0][0]
    logits, mu, logvar = model(x)
    assert not torch.equal(model(x)[0], logits)  # training draws new noise per call
    torch.testing.assert_close(model(x, torch.zeros_like(mu))[0], model(x, torch.zeros_like(mu))[0])
    model.eval()
    torch.testing.assert_close(model(x)[0], model(x)[0])  # eval decodes the posterior mean
    # The ELBO by hand: Bernoulli log-likelihood and the Gaussian KL, per image.
    p = torch.sigmoid(logits)
    nll = -(x * p.log() + (1 - x) * (1 - p).log()).sum()
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum()
    elbo = V.elbo_loss((logits, mu, logvar), x)
    torch.testing.assert_close(elbo, (nll + kl) / 4, rtol=1e-4, atol=0)


def test_dcgan_losses_reach_only_their_network():
    """The discriminator's loss on generated images gives the generator no gradient, the
    generator's loss gives the discriminator none."""
    model = V.DCGAN(8, 8)
    (z, real), _ = data(small("dcgan"))
    _, fake_logits, gen_logits = model(z, real)
    F.softplus(fake_logits).mean().backward()
    assert all(p.grad is None for p in model.generator.parameters())
    model.zero_grad(set_to_none=True)
    F.softplus(-gen_logits).mean().backward()
    assert all(p.grad is None for p in model.discriminator.parameters())
    assert all(p.grad is not None for p in model.generator.parameters())


def test_shape_images():
    a, la = V.shape_images(torch.Generator().manual_seed(3), 64, 32)
    b, lb = V.shape_images(torch.Generator().manual_seed(3), 64, 32)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert a.shape == (64, 3, 32, 32) and a.min() >= 0 and a.max() <= 1
    assert set(la.tolist()) == set(range(10))
    # The classes differ: class-mean images are far apart compared with the pixel noise.
    means = torch.stack([a[la == c].mean(0) for c in la.unique()])
    assert torch.cdist(means.flatten(1), means.flatten(1)).fill_diagonal_(1e9).min() > 1.0


BAD = [
    (V.ResNet18(10, "cifar", 8), [(2, 1, 32, 32)], r"ResNet18: x must be \(N, 3, H, W\)"),
    (V.ResNet18(10, "cifar", 8), [(3, 32, 32)], r"ResNet18: x must be .*got \(3, 32, 32\)"),
    (V.ResNet18(10, "imagenet", 8), [(2, 3, 16, 16)], r"ResNet18: x must be .*H, W >= 32"),
    (V.DCGANGenerator(8, 8), [(2, 7)], r"DCGANGenerator: z must be \(N, 8\)"),
    (V.DCGANDiscriminator(8), [(2, 3, 64, 64)], r"DCGANDiscriminator: x must be \(N, 3, 32, 32\)"),
    (V.DCGAN(8, 8), [(2, 8), (2, 1, 32, 32)], r"DCGAN: real must be \(N, 3, 32, 32\)"),
    (
        V.ConvAutoencoder(8, 4),
        [(2, 3, 28, 28)],
        r"ConvAutoencoder: x must be \(N, 3, 32, 32\), got",
    ),
    (V.VAE(8, 8), [(2, 4, 32, 32)], r"VAE: x must be \(N, 3, 32, 32\)"),
    (V.ViT(32, 8, 10, 32, 2, 2), [(2, 3, 16, 16)], r"ViT: x must be \(N, 3, 32, 32\)"),
]


@pytest.mark.parametrize("model, shapes, match", BAD)
def test_bad_input(model, shapes, match):
    with pytest.raises(ValueError, match=match):
        model(*(torch.randn(s) for s in shapes))


@pytest.mark.parametrize(
    "model, inputs, name",
    [
        (V.ResNet18(10, "cifar", 8), [torch.zeros(2, 3, 32, 32, dtype=torch.uint8)], "x"),
        (V.DCGANGenerator(8, 8), [torch.zeros(2, 8, dtype=torch.float64)], "z"),
        (
            V.DCGAN(8, 8),
            [torch.zeros(2, 8), torch.zeros(2, 3, 32, 32, dtype=torch.bfloat16)],
            "real",
        ),
        (V.ViT(32, 8, 10, 32, 2, 2), [torch.zeros(2, 3, 32, 32, dtype=torch.float64)], "x"),
        (V.VAE(8, 8), [torch.zeros(2, 3, 32, 32), torch.zeros(2, 8, dtype=torch.float64)], "eps"),
    ],
    ids=["resnet_uint8", "generator_f64", "dcgan_bf16", "vit_f64", "vae_eps_f64"],
)
def test_input_of_another_dtype_names_model_and_argument(model, inputs, name):
    label = type(model).__name__
    with pytest.raises(TypeError, match=rf"^{label}: {name} must have the model's dtype") as err:
        model(*inputs)
    # fastdl's DtypeError: also the ValueError/RuntimeError torch code may expect for it
    assert isinstance(err.value, ValueError) and isinstance(err.value, RuntimeError)


def test_autocast_takes_inputs_of_its_dtype():
    model, x = V.DCGANDiscriminator(8), torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, got = model(x), model(x.bfloat16())
    torch.testing.assert_close(got, expected)


def test_vit_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"ViT: size \(30\) must be a positive multiple of patch"):
        V.ViT(30, 4)
    with pytest.raises(ValueError, match=r"ViT: size \(4\) must be a positive multiple of patch"):
        V.ViT(4, 0)
    with pytest.raises(
        ValueError, match=r"ViT: heads \(4\) must be a positive divisor of dim \(30\)"
    ):
        V.ViT(32, 8, 10, 30, 2, 4)
    # Heads above the attention kernels' size limit: refused when built, not at the first call.
    with pytest.raises(ValueError, match=r"ViT: dim / heads = 257 is above .* limit of 256"):
        V.ViT(4, 2, dim=257, heads=1)


def test_vit_without_blocks_matches_twin():
    model, twin = V.ViT(8, 4, 2, dim=8, depth=0, heads=2), T.ViT(8, 4, 2, dim=8, depth=0, heads=2)
    twin.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(model(x), twin(x))


def test_non_tensor_input():
    with pytest.raises(ValueError, match=r"DCGANGenerator: z must be \(N, 8\) .* got list"):
        V.DCGANGenerator(8, 8)([[0.0] * 8])


def test_vae_eps_must_match_the_latent_mean():
    # A (latent,) or (1, latent) eps would broadcast: every image the same noise.
    model, x = V.VAE(8, 8), torch.rand(2, 3, 32, 32)
    for shape in ((2, 9), (8,), (1, 8), (2, 8, 1)):
        with pytest.raises(
            ValueError, match=r"VAE: eps must have the latent mean's shape .*\(2, 8\)"
        ):
            model(x, torch.randn(shape))
    with pytest.raises(
        ValueError, match=r"VAE: eps must be a floating-point tensor, got torch.int64"
    ):
        model(x, torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"VAE: eps must be a floating-point tensor, got list"):
        model(x, [[0.0] * 8] * 2)


def test_spec_batches_are_deterministic():
    for spec in V.SPECS:
        a, ta = spec.batch(torch.Generator().manual_seed(0), torch.device("cpu"))
        b, tb = spec.batch(torch.Generator().manual_seed(0), torch.device("cpu"))
        for u, v in zip(a, b, strict=True):
            assert torch.equal(u, v)
        assert (ta is None and tb is None) or torch.equal(ta, tb)
