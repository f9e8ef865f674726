"""The fused core attention (`training/sdpa_attention.py`) computes what Megatron's unfused one does."""

from __future__ import annotations

import torch
from helpers.megatron_helpers import VOCAB, make_hf_checkpoint

from slime_wf.training.model import build_gpt_model, forward_logits
from slime_wf.training.parallel import destroy_parallel, init_parallel
from slime_wf.training.sdpa_attention import SdpaAttention
from slime_wf.training.weights import load_hf_checkpoint_into


def _forward_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    logits = forward_logits(model, ids, mask)
    (logits * mask[..., None]).square().mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_fused_attention_matches_megatrons_unfused_path(tmp_path, monkeypatch):
    """Logits and gradients of a GQA Qwen3 on a batch with left and right padding (a query at a
    left-padding position has every key masked) equal those of Megatron's DotProductAttention at every
    real token, and stay finite everywhere."""
    path = make_hf_checkpoint(tmp_path / "qwen3", "qwen3", True)
    init_parallel(1, seed=0)
    try:
        model = build_gpt_model(path)
        load_hf_checkpoint_into(model, path)
        cores = [layer.self_attention.core_attention for layer in model.decoder.layers]
        assert cores and all(type(core) is SdpaAttention for core in cores)
        assert model.config.num_query_groups < model.config.num_attention_heads  # grouped-query attention

        gen = torch.Generator().manual_seed(5)
        ids = torch.randint(0, VOCAB, (3, 9), generator=gen)
        mask = torch.ones(3, 9, dtype=torch.long)
        mask[0, :3] = 0  # left padding: the first queries see no key at all
        mask[1, 6:] = 0  # right padding
        fused_logits, fused_grads = _forward_and_grads(model, ids, mask)

        calls = []
        fused_applies = SdpaAttention._fused_applies

        def unfused(self, *args):
            calls.append(fused_applies(self, *args))
            return False

        monkeypatch.setattr(SdpaAttention, "_fused_applies", unfused)
        plain_logits, plain_grads = _forward_and_grads(model, ids, mask)
        assert calls and all(calls)  # the fused kernel ran for every layer in the first pass
    finally:
        destroy_parallel()

    # Every logit is finite; those of real tokens are equal (a query that sees no key has no meaning).
    assert torch.isfinite(fused_logits).all()
    real = mask.bool()
    torch.testing.assert_close(fused_logits[real], plain_logits[real], atol=2e-5, rtol=1e-5)
    assert set(fused_grads) == set(plain_grads)
    for name, grad in fused_grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-5, rtol=1e-4, msg=name)
