"""The served-weights check (slime's `check_weight_update_equal` debug mode): every engine must give
the greedy tokens and log-probs of a plain forward pass over the weights it was sent."""

from __future__ import annotations

import asyncio
from typing import Any

from slime_wf.checkpoint import CheckpointError


def reference_greedy(
    model_path: str, prompt_ids: list[int], max_new_tokens: int
) -> tuple[list[int], list[float]]:
    """Greedy tokens and their log-probs from a plain forward pass over `model_path` (FP8 dequantized).

    The checkpoint is loaded with the engine server's own loader (`engine_server.model`), so a
    difference means the engine serves other weights than those sent, not that it reads them differently."""
    # torch and transformers load when a check runs, not whenever weight sync is imported.
    import torch

    from slime_wf.engine_server.model import load_model

    model = load_model(model_path, torch.float32)
    ids = list(prompt_ids)
    out_ids, out_lps = [], []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            tok = int(torch.argmax(logits))
            out_ids.append(tok)
            out_lps.append(float(lp[tok]))
            ids.append(tok)
    return out_ids, out_lps


async def verify_served_weights(
    session: Any,
    model_path: str,
    prompt_ids: list[int] | None = None,
    max_new_tokens: int = 8,
    tol: float = 1e-3,
) -> float:
    """Check that every engine serves `model_path`: same greedy tokens, log-probs within `tol`."""
    prompt_ids = prompt_ids or [2, 5, 7, 11, 13]
    want_ids, want_lps = await asyncio.to_thread(reference_greedy, model_path, prompt_ids, max_new_tokens)
    payload = {
        "input_ids": prompt_ids,
        "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0.0, "ignore_eos": True},
        "return_logprob": True,
    }
    worst = 0.0
    for url in session.worker_urls:
        out = await session.client(url).generate(payload, timeout=300)
        got = out["meta_info"]["output_token_logprobs"]
        got_ids = [int(t) for _, t, _ in got]
        if got_ids != want_ids:
            raise CheckpointError(
                f"engine {url} does not serve {model_path}: greedy tokens {got_ids} != reference {want_ids}"
            )
        diff = max(abs(float(lp) - w) for (lp, _, _), w in zip(got, want_lps, strict=True))
        if diff > tol:
            raise CheckpointError(
                f"engine {url} does not serve {model_path}: log-probs differ by {diff:.2e} > {tol}"
            )
        worst = max(worst, diff)
    return worst
