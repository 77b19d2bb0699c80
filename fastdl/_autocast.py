"""The dtype an op runs in inside ``torch.autocast``, the one its torch twin runs in: torch's
autocast casts convolutions, attention and the LSTM (and on CUDA also the GRU and the cells, all
cuDNN or lower-precision ops there) to the autocast dtype; on the CPU the GRU and the cells run
in x's dtype with the parameters following it. Norms need nothing: they take 16-bit x with
float32 parameters, as torch's do. The public functions cast their floating-point tensor
arguments before checking them, so the ops themselves never see mixed dtypes."""

import torch


def _enabled(x: torch.Tensor) -> bool:
    # Autocast has no state for other devices (meta tensors: torch.is_autocast_enabled raises).
    return (
        x.is_floating_point()
        and x.device.type in ("cpu", "cuda")
        and torch.is_autocast_enabled(x.device.type)
    )


def lower(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple:
    """``(x, *tensors)`` in the autocast dtype inside autocast, as they are outside."""
    if not _enabled(x):
        return (x, *tensors)
    return _cast(torch.get_autocast_dtype(x.device.type), x, *tensors)


def follow_x(x: torch.Tensor, *tensors: torch.Tensor | None) -> tuple:
    """``tensors`` in x's dtype inside autocast (the lower-precision ops on CUDA: the autocast
    dtype for x too), as they are outside."""
    if not _enabled(x):
        return (x, *tensors)
    if x.device.type == "cuda":
        return lower(x, *tensors)
    return _cast(x.dtype, x, *tensors)


def _cast(dtype: torch.dtype, *tensors: torch.Tensor | None) -> tuple:
    # As torch's autocast: float64 tensors are left as they are.
    return tuple(
        t.to(dtype)
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        else t
        for t in tensors
    )
