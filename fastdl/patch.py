"""fastdl.patch(model): swap supported modules for their fastdl twins in place; fastdl.unpatch.

Three kinds of swap, all undone by :func:`unpatch`:

- a class swap in place, for modules whose twin subclasses them and only replaces ``forward``
  (torch.nn norms, convs, RNNs, MultiheadAttention; recognised third-party RMS norms):
  the module object, its parameters, buffers, hooks, device, dtype and mode stay as they are;
- a replacement in the parent, for twins with another layout (``nn.Linear`` -> ``Int8Linear``,
  PyG GCNConv/GATConv -> fastdl.nn): the original module is kept for unpatch;
- a setting (a HuggingFace model's ``attn_implementation``), the previous value kept.

Third-party classes are recognised by the integrations in fastdl.integrations, consulted only
when their package is already imported (a model made of its classes has imported it).
"""

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.nn.utils import parametrize

from fastdl import _checks
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

# The floating dtypes every fastdl kernel of these modules takes, per device type.
INT8_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Instance attribute of a patched module: what unpatch puts back (a class, a module or an Undo).
ORIGINAL = "_fastdl_original"


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


class Undo(Protocol):
    """A swap that is neither a class nor a module (e.g. a setting): ``undo(module)`` reverts it."""

    def undo(self, module: nn.Module) -> None: ...


@dataclass(frozen=True)
class Swap:
    """A recognised module: ``name`` is what include/exclude match; ``to`` names the twin.
    ``apply(module)`` changes the module in place, setting ``module.<ORIGINAL>`` to what unpatch
    restores (``in_place``), or returns a new module to put where it is (a replacement)."""

    name: str
    to: str
    apply: Callable[[nn.Module], nn.Module | None]
    in_place: bool = True


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def class_swap(twin: type[nn.Module], name: str | None = None) -> Swap:
    """The swap of a module's class for ``twin`` (a subclass of it that only replaces forward)."""

    def apply(module: nn.Module) -> None:
        module.__dict__[ORIGINAL] = _ClassSwap(type(module))
        module.__class__ = twin

    return Swap(name or twin.__name__, qualname(twin), apply)


@dataclass(frozen=True)
class _ClassSwap:
    """Undoes a class swap. A parametrization added since (torch's parametrize puts a class of
    its own over the module's class, here the twin) is kept: its class is rebuilt over the
    original. Holds the original class only, so that a patched model pickles."""

    original: type[nn.Module]

    def undo(self, module: nn.Module) -> None:
        cls = type(module)
        if parametrize.is_parametrized(module) and cls.__bases__ != (self.original,):
            body = {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")}
            module.__class__ = type(cls.__name__, (self.original,), body)
        else:
            module.__class__ = self.original


def dtype_problem(
    module: nn.Module, dtypes: dict[str, tuple[torch.dtype, ...]] = _checks.KERNEL_DTYPES
):
    """Why the fastdl kernels cannot take this module's floating parameters, or None."""
    for p in module.parameters(recurse=False):
        allowed = dtypes.get(p.device.type, ())
        if p.is_floating_point() and p.dtype not in allowed:
            return f"fastdl kernels take no {str(p.dtype).removeprefix('torch.')} on {p.device}"
    return None


def _quantize(module: nn.Module) -> nn.Module:
    new = fnn.Int8Linear.from_float(module)
    new.train(module.training)
    return new


def _recognise(module: nn.Module, quantize: bool, integrations) -> Swap | str | None:
    """The swap for ``module``, the reason it is left (a str), or None: not a swappable kind."""
    cls = type(module)
    if ORIGINAL in module.__dict__:
        return None  # patched already
    if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
        becomes = getattr(module, "cls_to_become", None)
        if becomes in TWINS or (becomes is nn.Linear and quantize):
            return "lazy module: run the model once (its shapes are set then), then patch"
        return None
    if cls in TWINS:
        return dtype_problem(module) or class_swap(TWINS[cls], cls.__name__)
    if isinstance(module, tuple(TWINS)):
        if isinstance(module, tuple(TWINS.values())):
            return None  # a fastdl module built directly
        if parametrize.is_parametrized(module):
            return "parametrized (torch.nn.utils.parametrize builds a subclass of its own)"
        return "subclass of a supported module (its forward may differ)"
    if cls is nn.TransformerEncoderLayer:
        # Not a swap of its own: its attention and norms are swapped, but this note says where
        # they do not run (torch's check for the fast path looks at their weights, not types).
        return (
            "in eval mode without autograd torch's fused fast path runs this layer whole, "
            "not its swapped attention and norms"
        )
    if cls is nn.Linear and quantize:
        return dtype_problem(module, {"cpu": INT8_DTYPES, "cuda": INT8_DTYPES}) or Swap(
            "Linear", qualname(fnn.Int8Linear), _quantize, in_place=False
        )
    for integration in integrations:
        found = integration.recognise(module)
        if found is not None:
            return found
    return None


def _integrations() -> list:
    found = []
    if "transformers" in sys.modules:
        from fastdl.integrations import transformers

        found.append(transformers)
    if "torch_geometric" in sys.modules:
        from fastdl.integrations import pyg

        found.append(pyg)
    return found


def _parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    # Every (parent, attribute) holding each module: a shared module is replaced everywhere.
    parents: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for key, child in parent._modules.items():
            if child is not None:
                parents.setdefault(id(child), []).append((parent, key))
    return parents


def name_list(fn: str, arg: str, names) -> list[str] | None:
    """An include/exclude argument as a list of strings (one string is a list of one: matched
    whole, not character by character)."""
    if names is None:
        return None
    if isinstance(names, str):
        return [names]
    if not isinstance(names, (list, tuple, set, frozenset)) or not all(
        isinstance(n, str) for n in names
    ):
        raise TypeError(f"{fn}: {arg} must be a list of strings, got {names!r}")
    return list(names)


def check_module(fn: str, model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expects an nn.Module, got {type(model).__name__}")


def patch(
    model: nn.Module,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    quantize: bool = False,
) -> PatchReport:
    """Swap every supported module in ``model`` (itself included) for its fastdl twin, in place.

    Swapped: torch.nn LayerNorm, RMSNorm, BatchNorm1d/2d, Conv2d, ConvTranspose2d, LSTM, GRU,
    LSTMCell, GRUCell, MultiheadAttention (exact types: a subclass may change forward, so it is
    left); ``nn.Linear`` -> :class:`fastdl.nn.Int8Linear` (weights quantized per channel) only
    when asked: ``quantize=True`` or ``"Linear"`` in ``include``. With their packages imported:
    HuggingFace RMS norms whose forward is LlamaRMSNorm's or T5LayerNorm's (recognised by
    their bytecode and attributes, see fastdl.integrations.transformers), a HuggingFace model's
    attention (``attn_implementation="fastdl"``), PyG GCNConv, GATConv, SAGEConv and GINConv.

    Parameters, buffers, devices, dtypes, hooks and train/eval mode are kept (a replaced module
    hands its very Parameter objects to the twin, except Int8Linear's quantized weight).
    ``include``/``exclude`` filter by class name (``"LayerNorm"``, ``"LlamaRMSNorm"``,
    ``"GCNConv"``, ``"Linear"``; the attention setting is ``"attn_implementation"``).
    Patching twice swaps nothing more. Returns a :class:`PatchReport`; :func:`unpatch` reverts.
    """
    check_module("fastdl.patch", model)
    include = name_list("fastdl.patch", "include", include)
    exclude = name_list("fastdl.patch", "exclude", exclude)
    quantize = quantize or (include is not None and "Linear" in include)
    report = PatchReport()
    integrations = _integrations()
    parents = _parents(model)
    for name, module in list(model.named_modules()):
        found = _recognise(module, quantize, integrations)
        if found is None:
            continue
        kind = qualname(type(module))
        if isinstance(found, str):
            report.left.append((name, kind, found))
            continue
        if (include is not None and found.name not in include) or (
            exclude is not None and found.name in exclude
        ):
            report.left.append((name, kind, "filtered by include/exclude"))
            continue
        if module is model and not found.in_place:
            report.left.append((name, kind, "the root module cannot be replaced"))
            continue
        new = found.apply(module)
        if not found.in_place:
            new.__dict__[ORIGINAL] = module
            for parent, key in parents.get(id(module), []):
                parent._modules[key] = new
        report.swapped.append((name, kind, found.to))
    return report


def unpatch(model: nn.Module) -> nn.Module:
    """Revert every swap fastdl.patch made in ``model``: original classes, the original modules
    (with the parameters they share with their twins, so training carries over) and settings.
    Returns ``model``."""
    parents = _parents(model)
    for module in list(model.modules()):
        original = module.__dict__.pop(ORIGINAL, None)
        if isinstance(original, type):  # a model patched (and pickled) by an older fastdl
            module.__class__ = original
        elif isinstance(original, nn.Module):
            original.train(module.training)
            for parent, key in parents.get(id(module), []):
                parent._modules[key] = original
        elif original is not None:
            original.undo(module)
    return model
