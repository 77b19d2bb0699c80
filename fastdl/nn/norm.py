"""LayerNorm, RMSNorm, BatchNorm1d/2d on fastdl kernels. Each subclasses its torch.nn twin and
only replaces forward, so parameters, buffers, state_dict keys, repr and isinstance checks are
the twin's: a torch state_dict loads unchanged and fastdl.patch can swap classes in place."""

import torch
from torch import nn

from fastdl import _checks
from fastdl.ops import norm as F


def _torch_runs(x: torch.Tensor, eps: float | None) -> bool:
    # What the kernels do not take runs torch's forward: x's dtype on its device, or eps 0
    # (the kernels want eps > 0; torch's LayerNorm with eps 0 is fine on non-constant rows).
    return not _checks.kernels_take(x) or (eps is not None and eps <= 0)


class LayerNorm(nn.LayerNorm):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _torch_runs(input, self.eps):
            return super().forward(input)
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch promotes a weight of another dtype (float64 x, float32 weight: float64); the
        # kernels take x's dtype, or float32 for 16-bit x.
        w = self.weight
        promotes = w is not None and not (
            w.dtype == x.dtype or (x.dtype in _checks.REDUCED and w.dtype == torch.float32)
        )
        if promotes or _torch_runs(x, self.eps):
            return super().forward(x)
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class _BatchNorm(nn.modules.batchnorm._BatchNorm):
    """torch's _BatchNorm.forward with fastdl.batch_norm; ``activation="relu"`` fuses a ReLU."""

    def __init__(self, *args, activation: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if activation not in F.ACTIVATIONS:
            raise ValueError(
                f"{type(self).__name__}: activation must be one of {F.ACTIVATIONS}, "
                f"got {activation!r}"
            )
        self.activation = activation

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        x = input
        if _torch_runs(x, self.eps):
            y = super().forward(x)
            return torch.relu(y) if getattr(self, "activation", None) == "relu" else y
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return F.batch_norm(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            momentum,
            self.eps,
            activation=getattr(self, "activation", None),
        )

    def extra_repr(self) -> str:
        act = getattr(self, "activation", None)
        return super().extra_repr() + (f", activation={act!r}" if act else "")


class BatchNorm1d(_BatchNorm, nn.BatchNorm1d):
    pass


class BatchNorm2d(_BatchNorm, nn.BatchNorm2d):
    pass
