"""A masked twin of ``nn.MultiheadAttention``: its q/k/v and output projections are masked linear layers.

``nn.MultiheadAttention`` keeps its projections as raw parameters (a packed ``in_proj_weight``, or
``q/k/v_proj_weight`` when key and value widths differ) and an ``out_proj`` that
``F.multi_head_attention_forward`` reads as a tensor, never calls: a mask put on any of them is
ignored. The twin holds four ``MaskedLinear`` children, ``q_proj``, ``k_proj``, ``v_proj`` and
``out_proj``, and CALLS them, so everything that works on masked layers works on attention too: the
selector and the trainers see four masked linear layers, the FLOPs counter measures them with hooks,
HYDRA/BiP learn their scores through the same straight-through product.

The attention itself follows ``F.multi_head_attention_forward`` step by step (the same mask
canonicalisation, scaling, dropout, ``need_weights`` / ``average_attn_weights`` / ``is_causal``
semantics), so with all-ones masks the twin's output equals the plain module's. Not supported, and
refused when converting: ``add_bias_kv`` and ``add_zero_attn`` (no torchvision classifier uses them).

Loading: a plain module's keys (``in_proj_weight``, ``in_proj_bias``, ``q/k/v_proj_weight``) are split
into the twin's children when a state dict is loaded, so a torchvision ViT checkpoint loads strictly
into the masked model; ``plain()`` rebuilds a plain ``nn.MultiheadAttention`` holding ``weight * mask``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from layers.masked import MaskedLinear


class UnsupportedAttention(ValueError):
    """An nn.MultiheadAttention the twin cannot reproduce (its message says which option)."""


class MaskedMultiheadAttention(nn.Module):
    def __init__(self, embed_dim: int, num_heads: int, *, dropout: float = 0.0, bias: bool = True,
                 kdim: int | None = None, vdim: int | None = None, batch_first: bool = False,
                 granularity: str = "unstructured", device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"embed_dim {embed_dim} must be divisible by num_heads {num_heads}")
        self.packed = self.kdim == embed_dim and self.vdim == embed_dim  # nn.MultiheadAttention's _qkv_same_embed_dim
        kw = dict(granularity=granularity, device=device, dtype=dtype)
        self.q_proj = MaskedLinear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = MaskedLinear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = MaskedLinear(self.vdim, embed_dim, bias=bias, **kw)
        self.out_proj = MaskedLinear(embed_dim, embed_dim, bias=bias, **kw)
        self._register_load_state_dict_pre_hook(self._split_plain_keys)

    # -- conversion ---------------------------------------------------------------------------------
    @classmethod
    def from_plain(cls, mha: nn.MultiheadAttention, granularity: str) -> MaskedMultiheadAttention:
        if mha.bias_k is not None or mha.bias_v is not None:
            raise UnsupportedAttention("add_bias_kv=True is not supported by the masked attention")
        if mha.add_zero_attn:
            raise UnsupportedAttention("add_zero_attn=True is not supported by the masked attention")
        weight = mha.in_proj_weight if mha._qkv_same_embed_dim else mha.q_proj_weight
        twin = cls(mha.embed_dim, mha.num_heads, dropout=mha.dropout, bias=mha.in_proj_bias is not None,
                   kdim=mha.kdim, vdim=mha.vdim, batch_first=mha.batch_first, granularity=granularity,
                   device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for proj, w, b in zip((twin.q_proj, twin.k_proj, twin.v_proj), *_plain_projections(mha)):
                proj.weight.copy_(w)
                if b is not None:
                    assert proj.bias is not None
                    proj.bias.copy_(b)
            twin.out_proj.weight.copy_(mha.out_proj.weight)
            if mha.out_proj.bias is not None:
                assert twin.out_proj.bias is not None
                twin.out_proj.bias.copy_(mha.out_proj.bias)
        twin.train(mha.training)
        return twin

    def plain(self) -> nn.MultiheadAttention:
        """A plain nn.MultiheadAttention computing what this one computes now (weights times masks)."""
        weight = self.q_proj.weight
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, dropout=self.dropout,
                                    bias=self.q_proj.bias is not None, kdim=self.kdim, vdim=self.vdim,
                                    batch_first=self.batch_first, device=weight.device, dtype=weight.dtype)
        mha.load_state_dict(self.plain_state())
        mha.train(self.training)
        return mha

    def plain_state(self) -> dict[str, torch.Tensor]:
        """The state dict of the plain nn.MultiheadAttention (masks applied), keys relative to this module."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        weights = [(p.weight * p.mask).detach() for p in projections]
        out: dict[str, torch.Tensor] = {}
        if self.packed:
            out["in_proj_weight"] = torch.cat(weights)
        else:
            out.update(q_proj_weight=weights[0], k_proj_weight=weights[1], v_proj_weight=weights[2])
        if self.q_proj.bias is not None:
            out["in_proj_bias"] = torch.cat([p.bias.detach() for p in projections if p.bias is not None])
        out["out_proj.weight"] = (self.out_proj.weight * self.out_proj.mask).detach()
        if self.out_proj.bias is not None:
            out["out_proj.bias"] = self.out_proj.bias.detach()
        return {key: value.clone() for key, value in out.items()}

    def _split_plain_keys(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """A plain module's projection keys -> this module's children (in place, before the strict load)."""
        e = self.embed_dim
        packed = state_dict.pop(prefix + "in_proj_weight", None)
        if packed is not None:
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                state_dict[f"{prefix}{name}.weight"] = packed[i * e:(i + 1) * e]
        for name in ("q_proj", "k_proj", "v_proj"):
            separate = state_dict.pop(f"{prefix}{name}_weight", None)
            if separate is not None:
                state_dict[f"{prefix}{name}.weight"] = separate
        bias = state_dict.pop(prefix + "in_proj_bias", None)
        if bias is not None:
            for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
                state_dict[f"{prefix}{name}.bias"] = bias[i * e:(i + 1) * e]

    # -- forward: F.multi_head_attention_forward with the projections called as modules --------------
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:  # (L, E): a batch of one
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        src_len = key.shape[0]
        heads, head_dim = self.num_heads, self.head_dim

        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            if key_padding_mask is not None:
                is_causal = False  # the merged mask below carries the causal part

        q = self.q_proj(query)
        k = self.k_proj(key)
        v = self.v_proj(value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.view(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = v.view(src_len, bsz * heads, head_dim).transpose(0, 1)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1,
                                                                                                  src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding
        dropout = self.dropout if self.training else 0.0

        weights: torch.Tensor | None = None
        if need_weights:
            scaled = q * math.sqrt(1.0 / float(head_dim))
            logits = (torch.baddbmm(attn_mask, scaled, k.transpose(-2, -1)) if attn_mask is not None
                      else torch.bmm(scaled, k.transpose(-2, -1)))
            weights = F.softmax(logits, dim=-1)
            attended = torch.bmm(F.dropout(weights, p=dropout) if dropout > 0 else weights, v)
            attended = attended.transpose(0, 1).contiguous().view(tgt_len * bsz, self.embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                attn_mask = (attn_mask.unsqueeze(0) if attn_mask.size(0) == 1
                             else attn_mask.view(bsz, heads, -1, src_len))
            attended = F.scaled_dot_product_attention(q.view(bsz, heads, tgt_len, head_dim),
                                                      k.view(bsz, heads, src_len, head_dim),
                                                      v.view(bsz, heads, src_len, head_dim),
                                                      attn_mask, dropout, is_causal)
            attended = attended.permute(2, 0, 1, 3).contiguous().view(bsz * tgt_len, self.embed_dim)
        out = self.out_proj(attended).view(tgt_len, bsz, self.embed_dim)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


def _plain_projections(mha: nn.MultiheadAttention) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor | None, ...]]:
    """(q, k, v weights), (q, k, v biases) of a plain module, packed or separate."""
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        w = mha.in_proj_weight
        weights: tuple[torch.Tensor, ...] = (w[:e], w[e:2 * e], w[2 * e:])
    else:
        weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    b = mha.in_proj_bias
    biases: tuple[torch.Tensor | None, ...] = (b[:e], b[e:2 * e], b[2 * e:]) if b is not None else (None,) * 3
    return weights, biases
