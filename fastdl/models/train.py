"""Training: one step (shared by the tests, the benchmarks and ``python -m fastdl train``) and the
loop behind ``python -m fastdl train``, which runs a model beside its twin."""

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fastdl.models.spec import ModelSpec


def optimizer(model: nn.Module, spec: ModelSpec) -> torch.optim.Optimizer:
    """AdamW at the spec's learning rate over every trainable parameter."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=spec.lr)


def step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    spec: ModelSpec,
    inputs: tuple,
    target: Any,
) -> torch.Tensor:
    """Forward, loss, backward and an optimizer step; returns the (detached) loss."""
    opt.zero_grad(set_to_none=True)
    loss = spec.loss(model(*inputs), target)
    loss.backward()
    opt.step()
    return loss.detach()


@dataclass
class Run:
    """The losses and step times (seconds) of a model and, when compared, of its twin."""

    name: str
    losses: dict[str, list[float]] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)

    def median_ms(self, who: str) -> float:
        return 1e3 * statistics.median(self.times[who])


def train(
    spec: ModelSpec,
    steps: int,
    device: torch.device,
    compare: bool = True,
    seed: int = 0,
    progress: Callable[[Run], None] | None = None,
) -> Run:
    """Trains the model (and, when ``compare``, its twin from the same weights on the same
    batches, steps interleaved so both see the same machine load) for ``steps`` steps."""
    if not spec.train:
        raise ValueError(f"{spec.name} is inference-only: train its float model and quantize it")
    torch.manual_seed(seed)
    models = {"fastdl": spec.build().to(device)}
    if compare:
        models["torch"] = spec.twin().to(device)
        models["torch"].load_state_dict(models["fastdl"].state_dict())
    opts = {who: optimizer(m, spec) for who, m in models.items()}
    run = Run(spec.name, {who: [] for who in models}, {who: [] for who in models})
    gen = torch.Generator(device="cpu").manual_seed(seed)
    for _ in range(steps):
        inputs, target = spec.batch(gen, device)
        for who, model in models.items():
            # Models that draw random numbers (dropout, a VAE's noise) draw the same ones.
            torch.manual_seed(seed + len(run.losses[who]))
            start = time.perf_counter()
            loss = step(model, opts[who], spec, inputs, target).item()
            run.times[who].append(time.perf_counter() - start)
            run.losses[who].append(loss)
        if progress is not None:
            progress(run)
    return run


def plot(run: Run, path: str) -> None:
    """A PNG of the loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for who, losses in run.losses.items():
        ax.plot(
            range(1, len(losses) + 1),
            losses,
            marker="o" if len(losses) < 30 else None,  # a curve of one point is a marker alone
            label=f"{who} ({run.median_ms(who):.1f} ms/step)",
        )
    ax.set(xlabel="step", ylabel="loss", title=f"{run.name}: training loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
