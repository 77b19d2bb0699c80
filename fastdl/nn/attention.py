"""MultiheadAttention on the fused fastdl attention kernel. It subclasses torch.nn's and only
replaces forward, so parameters, state_dict keys and isinstance checks are the twin's: a torch
state_dict loads unchanged and fastdl.patch can swap classes in place."""

import torch
import torch.nn.functional as F
from torch import nn

from fastdl import _checks
from fastdl.ops import attention as A


def _additive(name: str, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # nn.MultiheadAttention's bool masks mark what NOT to attend (the opposite of SDPA's).
    if not (mask.dtype == torch.bool or mask.is_floating_point()):
        # torch refuses them too; a 0/1 integer mask would otherwise be added as a bias
        raise _checks.DtypeError(
            f"fastdl.nn.MultiheadAttention: {name} must be a bool or floating-point mask, "
            f"got {mask.dtype}"
        )
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, -torch.inf
        )
    return mask.to(dtype)


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs in fastdl.scaled_dot_product_attention
    (the in/out projections stay torch's linear layers). need_weights=False is the fused path;
    need_weights=True (which must materialize the weights), unbatched inputs, add_bias_kv,
    add_zero_attn and dtypes the kernels do not take run torch's own forward, so every call is
    correct. On the fused path a row
    whose keys are all masked gives zeros (torch's forward: NaN), and ``is_causal`` follows
    torch's rule: it needs attn_mask, and without a key_padding_mask it replaces the mask."""

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if (
            need_weights
            or query.dim() != 3
            or self.bias_k is not None
            or self.add_zero_attn
            or not _checks.kernels_take(query)
        ):
            return super().forward(
                query, key, value, key_padding_mask, need_weights, attn_mask,
                average_attn_weights, is_causal,
            )  # fmt: skip
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "fastdl.nn.MultiheadAttention: is_causal is a hint that attn_mask is the causal "
                "mask; pass the mask too (as torch.nn.MultiheadAttention requires)"
            )
        if is_causal and key_padding_mask is None:
            attn_mask = None  # torch's rule: the hint alone, the mask dropped
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, e = query.shape
        s, h = key.shape[1], self.num_heads
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        bq, bk, bv = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3

        def heads(x, w, b):
            return F.linear(x, w, b).view(x.shape[0], x.shape[1], h, self.head_dim).transpose(1, 2)

        q, k, v = heads(query, wq, bq), heads(key, wk, bk), heads(value, wv, bv)
        mask = None
        if attn_mask is not None:
            mask = _additive("attn_mask", attn_mask, q.dtype)
            mask = mask.view(n, h, lq, s) if mask.dim() == 3 else mask
        if key_padding_mask is not None:
            pad = _additive("key_padding_mask", key_padding_mask, q.dtype).view(n, 1, 1, s)
            mask = pad if mask is None else mask + pad
        out = A.scaled_dot_product_attention(
            q, k, v, mask, self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None,
        )  # fmt: skip
        # (N, H, L, D) -> rows in the caller's layout, contiguous as torch's output
        rows = out.transpose(1, 2) if self.batch_first else out.permute(2, 0, 1, 3)
        return self.out_proj(rows.reshape(*rows.shape[:2], e)), None
