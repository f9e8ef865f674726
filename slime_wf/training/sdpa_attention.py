"""Megatron's core attention computed by `torch.nn.functional.scaled_dot_product_attention`.

Megatron's local layer spec names `DotProductAttention`, which computes attention unfused: it
materializes the scores `[b, heads, s, s]`, masks and softmaxes them in separate passes, and
repeats the keys and values of each query group for grouped-query attention. On CPU that was a
large share of a training step's forward and backward. `SdpaAttention` keeps Megatron's module
(its parameters, its checkpoint layout and its tensor-parallel split are the parent's) and
replaces only the computation with PyTorch's fused kernel, which never stores the scores.

Same result: Megatron fills masked scores with -10000 before the softmax (`attention_mask_func`),
which in float32 gives masked keys exactly zero weight unless every key of a row is masked; the
mask is passed here as that same -10000 added to the scores. A fully masked row (a query at a
left-padding position, whose output nothing reads) then stays finite, as in Megatron, where a
boolean mask can give NaN, which would reach the gradients.
What this module does not cover (attention dropout, sliding windows, softmax offsets, packed
sequences, attention bias, no explicit mask) goes to the parent's unfused path unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention

# Megatron's attention_mask_func fills masked scores with this value.
_MASKED_SCORE = -10000.0


class SdpaAttention(DotProductAttention):
    """`DotProductAttention` with the fused kernel where it computes the same thing."""

    def _fused_applies(self, attention_mask: Any, attention_bias: Any, packed_seq_params: Any) -> bool:
        dropout = self.attention_dropout.p if self.training else 0.0
        return (
            attention_mask is not None
            and attention_bias is None
            and packed_seq_params is None
            and self.softmax_offset is None
            and dropout == 0.0
            and self.scale_mask_softmax.window_size is None
        )

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        attn_mask_type: Any = None,
        attention_bias: torch.Tensor | None = None,
        packed_seq_params: Any = None,
    ) -> torch.Tensor:
        if not self._fused_applies(attention_mask, attention_bias, packed_seq_params):
            return super().forward(
                query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params
            )
        assert attention_mask is not None  # _fused_applies checked it
        # [s, b, heads, dim] -> [b, heads, s, dim]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        scores_dtype = torch.float32 if self.config.attention_softmax_in_fp32 else q.dtype
        bias = torch.zeros(attention_mask.shape, dtype=scores_dtype, device=q.device)
        bias.masked_fill_(attention_mask, _MASKED_SCORE)
        context = torch.nn.functional.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=bias.to(q.dtype),
            scale=self.softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        # [b, heads, s, dim] -> [s, b, heads * dim]
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)
