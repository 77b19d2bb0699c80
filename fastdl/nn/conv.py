"""Conv2d and ConvTranspose2d on fastdl kernels, and fuse_conv_bn. The modules subclass their
torch.nn twins and only replace forward, so parameters, state_dict keys, repr and isinstance
checks are the twin's: a torch state_dict loads unchanged and fastdl.patch swaps classes in
place."""

import collections
import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

from fastdl import _checks
from fastdl.ops import conv as ops

# The fused activations of Conv2d, as torch computes them (gelu: the exact erf form).
_EPILOGUES = {
    None: lambda y: y,
    "none": lambda y: y,
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,
}


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d on fastdl.conv2d. Every padding_mode of torch works: "zeros" runs in the
    kernel, the others ("reflect", "replicate", "circular") pad with F.pad first, as torch does.
    An ``activation`` attribute ("relu", "silu", "gelu"), when set, is fused into the conv."""

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        x, activation = input, getattr(self, "activation", None)
        if not _checks.kernels_take(x):  # torch's forward, then the same epilogue
            y = super().forward(x)
            y = y if residual is None else y + residual
            return _EPILOGUES[activation](y)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        return ops.conv2d(
            x,
            self.weight,
            self.bias,
            self.stride,
            padding,
            self.dilation,
            self.groups,
            activation=activation,
            residual=residual,
        )


class ConvTranspose2d(nn.ConvTranspose2d):
    """torch.nn.ConvTranspose2d on fastdl.conv_transpose2d (``output_size`` as torch)."""

    def forward(self, input: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        x = input
        if not _checks.kernels_take(x):
            return super().forward(x, output_size)
        if self.padding_mode != "zeros":
            raise ValueError(
                f"fastdl.nn.ConvTranspose2d: only padding_mode='zeros' is supported, "
                f"got {self.padding_mode!r}"
            )
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        return ops.conv_transpose2d(
            x, self.weight, self.bias, self.stride, self.padding, output_padding, self.groups,
            self.dilation,
        )  # fmt: skip


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Conv2d:
    """A Conv2d computing bn(conv(x)) with bn's running statistics (eval mode):
    w' = w * gamma / sqrt(var + eps), b' = (b - mean) * gamma / sqrt(var + eps) + beta."""
    fused = copy.deepcopy(conv)
    fused.__class__ = Conv2d
    with torch.no_grad():
        scale = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if conv.bias is not None:
            shift = shift + conv.bias.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        w = conv.weight.double() * scale.view(-1, 1, 1, 1)
        fused.weight = nn.Parameter(w.to(conv.weight.dtype), conv.weight.requires_grad)
        fused.bias = nn.Parameter(shift.to(conv.weight.dtype), conv.weight.requires_grad)
    return fused


def _foldable(conv, bn) -> bool:
    # A conv with a fused activation computes act(conv): bn(act(conv)) does not fold into it.
    return (
        isinstance(conv, nn.Conv2d)
        and getattr(conv, "activation", None) is None
        and isinstance(bn, nn.BatchNorm2d)
        and not bn.training
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


class _Tracer(torch.fx.Tracer):
    # Convs and BatchNorms stay call_module nodes, fastdl's (fastdl.patch) as well as torch's.
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


def _fuse_fx(model: nn.Module) -> nn.Module | None:
    try:
        gm = torch.fx.GraphModule(model, _Tracer().trace(model))
    except Exception:
        return None
    modules = dict(gm.named_modules())
    calls = collections.Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        src = node.args[0]
        if not (isinstance(src, torch.fx.Node) and src.op == "call_module"):
            continue
        conv, bn = modules[src.target], modules[node.target]
        # Folding changes the conv module: only when its one call feeds only this BatchNorm (and
        # takes no residual, which the BatchNorm would scale too).
        once = calls[src.target] == 1 and len(src.users) == 1
        if not (_foldable(conv, bn) and once and len(src.args) == 1 and not src.kwargs):
            continue
        parent, _, name = src.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name, _fold(conv, bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _fuse_sequential(module: nn.Module) -> None:
    for child in module.children():
        _fuse_sequential(child)
    if not isinstance(module, nn.Sequential):
        return
    names = list(module._modules)
    for a, b in itertools.pairwise(names):
        conv, bn = module._modules[a], module._modules[b]
        if _foldable(conv, bn):
            module._modules[a] = _fold(conv, bn)
            module._modules[b] = nn.Identity()


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (in eval mode) with every BatchNorm2d that directly follows a Conv2d
    folded into that conv (a fastdl.nn.Conv2d with bias): the same outputs as the unfused model
    in eval mode, one pass over memory less per pair. Pairs are found by torch.fx tracing; a
    model that cannot be traced has its nn.Sequential pairs fused. The original is unchanged."""
    if model.training:
        raise RuntimeError("fastdl.fuse_conv_bn: the model must be in eval mode (model.eval())")
    fused = _fuse_fx(copy.deepcopy(model))
    if fused is None:
        fused = copy.deepcopy(model)
        _fuse_sequential(fused)
    return fused
