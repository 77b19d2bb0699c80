"""Int8Linear (post-training weight quantization with on-the-fly per-token activation
quantization) and fastdl.quantize_model, which swaps a model's nn.Linear layers for it."""

import torch
from torch import nn

from fastdl.ops import int8 as F


def _repack(module: "Int8Linear", _keys) -> None:
    # A load_state_dict post hook at module level, not a lambda: the module must pickle.
    module.pack()


class Int8Linear(nn.Module):
    """A linear layer with int8 weights: ``y = x @ (weight * weight_scale[:, None]).T + bias``.

    State (the state_dict): ``weight`` (out_features, in_features) int8 and ``weight_scale``
    (out_features,) float32 buffers, ``bias`` a float Parameter (or None). The weight is packed
    for the CPU kernel, and packed again by the next forward whenever ``weight`` is reassigned,
    swapped in (``torch.func.functional_call``) or edited in place (under torch.compile: call
    :meth:`pack` before compiling). The activation is quantized per token on the fly;
    ``outlier_threshold`` keeps input columns reaching it in floating point (LLM.int8).
    Gradients flow to the input (through the dequantized weight) and to the bias, so a model with
    frozen int8 weights can be fine-tuned.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        outlier_threshold: float | None = None,
    ):
        super().__init__()
        if outlier_threshold is not None and not outlier_threshold > 0:
            raise ValueError(
                f"Int8Linear: outlier_threshold must be positive, got {outlier_threshold}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.outlier_threshold = outlier_threshold
        w = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        self.register_buffer("weight", w)
        self.register_buffer("weight_scale", torch.ones(out_features, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.register_buffer("weight_packed", None, persistent=False)
        self.register_load_state_dict_post_hook(_repack)
        self.pack()

    @classmethod
    def from_float(cls, linear: nn.Linear, outlier_threshold: float | None = None) -> "Int8Linear":
        """The int8 twin of ``linear``: its weight quantized per output channel, its bias kept in
        its dtype."""
        w = linear.weight.detach()
        if w.device.type != "meta" and not torch.isfinite(w).all():
            raise ValueError("Int8Linear.from_float: the weight holds NaN or Inf")
        module = cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            device=w.device,
            dtype=w.dtype,
            outlier_threshold=outlier_threshold,
        )
        q, scale = F.quantize_per_channel(w.float() if w.dtype == torch.float64 else w)
        module.weight.copy_(q)
        module.weight_scale.copy_(scale)
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        module.pack()
        return module.train(linear.training)

    @torch.no_grad()
    def pack(self) -> None:
        """(Re)pack ``weight`` for the CPU kernel (an empty buffer on CUDA)."""
        self.weight_packed = F.pack_weight(self.weight)
        self._packed_for = self._weight_key()

    def _weight_key(self) -> tuple:
        # Which weight was packed: its memory, version (in-place edits) and shape.
        w = self.weight
        return w.data_ptr(), None if w.is_inference() else w._version, w.shape, w.device

    def _apply(self, fn, recurse=True):
        # A module built on CUDA (nothing packed) and moved to the CPU needs its packing.
        super()._apply(fn, recurse)
        if self.weight.device.type == "cpu" and self.weight_packed.numel() != F.packed_bytes(
            self.in_features, self.out_features
        ):
            self.pack()
        return self

    def dequantized_weight(self) -> torch.Tensor:
        """``weight * weight_scale[:, None]`` in float32."""
        return self.weight.float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A weight reassigned, swapped in (torch.func.functional_call) or edited in place since
        # it was packed is packed again (not under torch.compile, which captures the buffer).
        packed_for = getattr(self, "_packed_for", None)  # absent from older pickles
        if not torch.compiler.is_compiling() and packed_for != self._weight_key():
            self.pack()
        return F.int8_linear(
            x,
            self.weight,
            self.weight_scale,
            self.bias,
            packed=self.weight_packed,
            outlier_threshold=self.outlier_threshold,
        )

    def extra_repr(self) -> str:
        s = f"in_features={self.in_features}, out_features={self.out_features}"
        s += f", bias={self.bias is not None}"
        if self.outlier_threshold is not None:
            s += f", outlier_threshold={self.outlier_threshold}"
        return s


def quantize_model(
    model: nn.Module,
    include: list[str] | None = None,
    exclude: list[str] | None = None,
    outlier_threshold: float | None = None,
):
    """Post-training quantization in place: every ``nn.Linear`` (exact type) in ``model`` whose
    qualified name is not filtered out is replaced by ``Int8Linear.from_float``. ``include`` /
    ``exclude``: lists of module-name prefixes (e.g. ``["encoder."]``, ``["lm_head"]``).
    Returns a :class:`fastdl.PatchReport` of what was swapped and what was left, and why.
    """
    from fastdl.patch import PatchReport, check_module, name_list, qualname

    check_module("fastdl.quantize_model", model)
    include = name_list("fastdl.quantize_model", "include", include)
    exclude = name_list("fastdl.quantize_model", "exclude", exclude)
    report = PatchReport()
    if type(model) is nn.Linear:
        raise TypeError("fastdl.quantize_model: pass the model that contains the nn.Linear")
    twins = {}  # a layer registered under several names (tied) gets one twin, under each name
    for name, module in list(model.named_modules()):
        for child_name, child in list(module._modules.items()):
            full = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear):
                continue
            if id(child) not in twins:
                why = _left(full, child, include, exclude)
                if why is not None:
                    report.left.append((full, qualname(type(child)), why))
                    continue
                twins[id(child)] = Int8Linear.from_float(child, outlier_threshold)
            setattr(module, child_name, twins[id(child)])
            report.swapped.append((full, qualname(nn.Linear), qualname(Int8Linear)))
    return report


def _left(name: str, linear: nn.Linear, include, exclude) -> str | None:
    """Why quantize_model leaves ``linear`` (None: it swaps it)."""
    from fastdl.patch import INT8_DTYPES, dtype_problem

    if type(linear) is not nn.Linear:
        return "subclass of nn.Linear"
    if (include is not None and not any(name.startswith(p) for p in include)) or (
        exclude is not None and any(name.startswith(p) for p in exclude)
    ):
        return "filtered by include/exclude"
    problem = dtype_problem(linear, {"cpu": INT8_DTYPES, "cuda": INT8_DTYPES})
    if problem is None and not torch.isfinite(linear.weight).all():
        return "weight holds NaN or Inf"
    return problem
