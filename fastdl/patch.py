"""fastdl.patch(model): swap supported torch.nn modules for their fastdl twins, in place."""

from dataclasses import dataclass, field

from torch import nn

from fastdl import nn as fnn

# torch.nn class -> fastdl twin. Exact types only: a user subclass may change forward.
TWINS: dict[type[nn.Module], type[nn.Module]] = {
    nn.LayerNorm: fnn.LayerNorm,
    nn.RMSNorm: fnn.RMSNorm,
    nn.BatchNorm1d: fnn.BatchNorm1d,
    nn.BatchNorm2d: fnn.BatchNorm2d,
    nn.Conv2d: fnn.Conv2d,
    nn.ConvTranspose2d: fnn.ConvTranspose2d,
    nn.LSTM: fnn.LSTM,
    nn.GRU: fnn.GRU,
    nn.LSTMCell: fnn.LSTMCell,
    nn.GRUCell: fnn.GRUCell,
    nn.MultiheadAttention: fnn.MultiheadAttention,
}


@dataclass
class PatchReport:
    """What fastdl.patch swapped (name, from, to) and what it left (name, type, reason)."""

    swapped: list[tuple[str, str, str]] = field(default_factory=list)
    left: list[tuple[str, str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"fastdl.patch: swapped {len(self.swapped)}, left {len(self.left)}"]
        lines += [f"  swapped {n or '<root>'}: {a} -> {b}" for n, a, b in self.swapped]
        lines += [f"  left    {n or '<root>'}: {t} ({why})" for n, t, why in self.left]
        return "\n".join(lines)


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def patch(
    model: nn.Module,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
) -> PatchReport:
    """Swap every supported torch.nn module in ``model`` (itself included) for its fastdl twin.

    The twin subclasses the torch module and only replaces forward, so the swap is a class
    change in place: parameters, buffers, hooks, device, dtype and train/eval mode stay as they
    are. ``include``/``exclude`` filter by torch class name (e.g. ``["LayerNorm"]``).
    Returns a :class:`PatchReport`.
    """
    report = PatchReport()
    for name, module in model.named_modules():
        cls = type(module)
        twin = TWINS.get(cls)
        if twin is None:
            if isinstance(module, tuple(TWINS)) and not isinstance(module, tuple(TWINS.values())):
                report.left.append((name, _qualname(cls), "subclass of a supported module"))
            continue
        if (include is not None and cls.__name__ not in include) or (
            exclude is not None and cls.__name__ in exclude
        ):
            report.left.append((name, _qualname(cls), "filtered by include/exclude"))
            continue
        module.__class__ = twin
        report.swapped.append((name, _qualname(cls), _qualname(twin)))
    return report
