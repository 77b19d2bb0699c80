"""HuggingFace transformers: ``attn_implementation="fastdl"`` and the recognition of its RMS norms.

Importing this module registers ``"fastdl"`` in transformers' ``AttentionInterface`` (and, where
transformers builds masks per implementation, in ``AttentionMaskInterface`` with the boolean
masks of its "sdpa" implementation), so a model built with ``attn_implementation="fastdl"``, or
switched with ``model.set_attn_implementation("fastdl")``, runs its attention in
:func:`fastdl.scaled_dot_product_attention`. ``fastdl.patch`` does that switch itself.

The contract is that of transformers' own "sdpa" function: query (B, Hq, L, D) and key/value
(B, Hkv, S, D) with Hq a multiple of Hkv (grouped-query heads are not repeated: the kernel reads
each key/value head once per group), a boolean mask (True attends) or an additive float mask
broadcastable to (B, Hq, L, S), or no mask and ``is_causal``; ``scaling``, ``dropout``, and
T5-style ``position_bias`` (added to the scores; it gets its gradient); a query batch of 1
against a key/value batch (or the reverse) is broadcast, as by torch's sdpa. The output is
(B, L, Hq, D). What the kernels do not take (head_dim > 256, value head_dim != query head_dim,
float16 on CPU) runs transformers' "sdpa" function instead, and what neither takes (``softcap``,
attention sinks) the model's own eager function, so every call is correct.
"""

import functools
import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fastdl import _checks
from fastdl.ops import attention as A
from fastdl.ops import norm as N
from fastdl.patch import ORIGINAL, Swap, class_swap

NAME = "fastdl"

# Attention arguments that change the scores beyond sdpa's contract: logit soft-capping
# (Gemma2) and sinks (GPT-OSS's ``s_aux``), which transformers' sdpa function refuses or ignores.
EAGER_ONLY = ("softcap", "s_aux", "sinks")


def _fastdl_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    return (
        _checks.kernels_take(query)
        and query.shape[-1] == key.shape[-1] == value.shape[-1] <= A.MAX_HEAD_DIM
        and query.shape[1] % key.shape[1] == 0
    )


def _causal(module: nn.Module, is_causal, mask, query: torch.Tensor) -> bool:
    # As transformers' sdpa function: one query (decoding) attends to every cached key, and a
    # mask, where there is one, holds the causality itself.
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    return bool(is_causal) and mask is None and query.shape[2] > 1


def _with_bias(position_bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    # The scores get the bias where the mask attends; finfo.min (not -inf) elsewhere, as
    # transformers' own functions do, so that a row with no key left is uniform as in eager.
    if mask is None:
        return position_bias
    if mask.dtype == torch.bool:
        return position_bias.masked_fill(~mask, torch.finfo(position_bias.dtype).min)
    return position_bias + mask


def _additive_mask(
    mask: torch.Tensor | None, causal: bool, query: torch.Tensor, key: torch.Tensor
) -> torch.Tensor | None:
    """The "fastdl" mask (sdpa's: boolean, True attends, or None for ``is_causal``) as the
    additive float mask eager functions add to the scores."""
    if mask is None and causal:
        # top left, as sdpa's is_causal: keys past the queries (an unfilled static cache) left out
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
        mask = mask.tril()[None, None]
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=query.dtype, device=mask.device).masked_fill(
        ~mask, torch.finfo(query.dtype).min
    )


def _eager_function(module: nn.Module, kwargs):
    """The model's own eager function (what attn_implementation="eager" runs), for what neither
    fastdl nor transformers' sdpa function computes."""
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        used = [k for k in EAGER_ONLY if kwargs.get(k) is not None]
        raise NotImplementedError(
            f"fastdl attention: {type(module).__name__} passes {used}, which fastdl does not "
            "implement, and its module has no eager_attention_forward to run instead; use "
            'attn_implementation="eager"'
        )
    return eager


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention function signature on fastdl.scaled_dot_product_attention."""
    if any(kwargs.get(k) is not None for k in EAGER_ONLY):
        eager = _eager_function(module, kwargs)
        causal = _causal(module, is_causal, attention_mask, query)
        mask = _additive_mask(attention_mask, causal, query, key)
        if position_bias is not None:
            mask = _with_bias(position_bias, mask)
        return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    if not _fastdl_takes(query, key, value):
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
            is_causal=is_causal, position_bias=position_bias, **kwargs,
        )  # fmt: skip
    # With no mask, the band is causal from the top left, which also ignores the unfilled tail
    # of a static cache.
    is_causal = _causal(module, is_causal, attention_mask, query)
    if position_bias is not None:
        attention_mask = _with_bias(position_bias, attention_mask)
    out = A.scaled_dot_product_attention(
        query, key, value, attention_mask, dropout, is_causal, scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )  # fmt: skip
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"fastdl"`` with transformers (done on import; calling again is harmless)."""
    AttentionInterface.register(NAME, attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # transformers < 4.53 builds one 4-D float mask for every implementation
        return
    AttentionMaskInterface.register(NAME, sdpa_mask)


register()


# ---------------------------------------------------------------- fastdl.patch


@dataclass(frozen=True)
class _Attention:
    """What fastdl.unpatch restores: the attention implementation of each config of the model."""

    previous: str | dict

    def undo(self, model: PreTrainedModel) -> None:
        _set_attention(model, self.previous)


def _takes_fastdl(model: PreTrainedModel) -> str | None:
    """Why transformers' attention of this (sub-)model cannot be "fastdl", or None."""
    can_set = getattr(type(model), "_can_set_attn_implementation", None)
    if can_set is not None and not can_set():
        return "its attention does not go through transformers' AttentionInterface"
    if not getattr(model, "_supports_sdpa", False):
        # transformers keeps these off "sdpa", whose contract "fastdl" shares: they have no
        # attention, or one that needs more (sinks, softcap, an explicit causal mask).
        return "no attention that transformers runs on sdpa (_supports_sdpa is False)"
    return None


def _config_tree(config, value) -> str | dict:
    """value(config) for config and each of its sub-configs, in the form set_attn_implementation
    takes: {"": the config's, sub-config name: its tree}, or one string when all are the same."""
    tree = {"": value(config)}
    for key in getattr(config, "sub_configs", None) or {}:
        sub = getattr(config, key, None)
        if sub is not None:
            tree[key] = _config_tree(sub, value)

    def values(t):  # a leaf may be None: a sub-config never given an implementation
        return set().union(*map(values, t.values())) if isinstance(t, dict) else {t}

    return tree[""] if len(values(tree)) == 1 else tree


def _set_attention(model: PreTrainedModel, implementation: str | dict) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(implementation)
        return

    def apply(config, tree):  # transformers < 4.50
        config._attn_implementation = tree[""] if isinstance(tree, dict) else tree
        for key, sub in tree.items() if isinstance(tree, dict) else ():
            if key:
                apply(getattr(config, key), sub)

    apply(model.config, implementation)


def _switch_attention(model: PreTrainedModel) -> None:
    """ "fastdl" for the model's config and every sub-config whose sub-model takes it; the
    others (a sub-model transformers keeps off sdpa, as Gemma 4's audio encoder, or a sub-config
    no sub-model is built on) keep theirs."""
    owners = {id(m.config): m for m in model.modules() if isinstance(m, PreTrainedModel)}

    def wanted(config):
        owner = owners.get(id(config))
        return (
            NAME
            if owner is not None and _takes_fastdl(owner) is None
            else config._attn_implementation
        )

    previous = _config_tree(model.config, lambda config: config._attn_implementation)
    _set_attention(model, _config_tree(model.config, wanted))
    model.__dict__[ORIGINAL] = _Attention(previous)


def _attention_swap(model: PreTrainedModel) -> Swap | str | None:
    if getattr(model.config, "_attn_implementation", None) == NAME:
        return None  # switched already, or a submodel sharing a switched config
    problem = _takes_fastdl(model)
    if problem is not None:
        return problem
    return Swap("attn_implementation", f"attn_implementation={NAME!r}", _switch_attention)


def _code_key(fn) -> tuple | None:
    code = getattr(fn, "__code__", None)
    if code is None:
        return None
    return code.co_code, code.co_consts, code.co_names, code.co_varnames, code.co_freevars


@functools.cache
def _rms_forms() -> frozenset:
    """The forward bodies recognised as ``weight * x / sqrt(mean(x^2) + variance_epsilon)``:
    LlamaRMSNorm's (which transformers' code generation copies into Mistral, Qwen2, Phi3 and
    most decoder models' norms, bytecode for bytecode) and T5LayerNorm's. Identical bytecode
    and names mean the same computation on the same attributes, which _rms_problem checks."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    return frozenset(_code_key(cls.forward) for cls in (LlamaRMSNorm, T5LayerNorm))


def _rms_problem(module: nn.Module) -> str | None:
    params = dict(module.named_parameters(recurse=False))
    eps = getattr(module, "variance_epsilon", None)
    if list(params) != ["weight"] or params["weight"].dim() != 1:
        return "RMS-norm forward, but not one 1-D weight as its only parameter"
    if next(module.children(), None) is not None or next(module.buffers(), None) is not None:
        return "RMS-norm forward, but with submodules or buffers"
    if not (isinstance(eps, float) and eps > 0):
        return f"RMS-norm forward, but variance_epsilon={eps!r} is not a positive float"
    return None


def _rms_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    x, w = hidden_states, self.weight
    # HF multiplies in the weight's dtype when it differs from x's (and returns that dtype);
    # fastdl.rms_norm returns x's dtype, so only matching dtypes run the kernel.
    if x.dtype == w.dtype and _checks.kernels_take(x):
        return N.rms_norm(x, w.shape, w, self.variance_epsilon)
    return type(self).__bases__[0].forward(self, hidden_states)


def _reduce_twin(self, protocol: int) -> tuple:
    # A twin is made at run time, so pickle cannot import it by name: it pickles the HF class
    # instead, and the twin is made again on load.
    _, _, *state = object.__reduce_ex__(self, protocol)
    return (_new_twin, (type(self).__bases__[0],), *state)


def _new_twin(cls: type[nn.Module]) -> nn.Module:
    twin = _rms_twin(cls)
    return twin.__new__(twin)


@functools.cache
def _rms_twin(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of the HF norm class whose forward is fastdl.rms_norm (patch swaps classes)."""
    doc = f"{cls.__name__} with its forward on fastdl.rms_norm (made by fastdl.patch)."
    attributes = {"forward": _rms_forward, "__reduce_ex__": _reduce_twin, "__doc__": doc}
    return type(cls.__name__, (cls,), {**attributes, "__module__": __name__})


def recognise(module: nn.Module) -> Swap | str | None:
    """fastdl.patch's hook: the swap for a transformers module, why it is left, or None."""
    if isinstance(module, PreTrainedModel):
        return _attention_swap(module)
    cls = type(module)
    if _code_key(cls.forward) in _rms_forms():
        return _rms_problem(module) or class_swap(_rms_twin(cls), cls.__name__)
    if cls.__module__.startswith("transformers.") and cls.__name__.endswith(
        ("RMSNorm", "LayerNorm")
    ):
        return "a norm whose forward is not a recognised RMS-norm form (left, not guessed)"
    return None
