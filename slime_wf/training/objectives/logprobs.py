"""Per-token log-probabilities and entropies of response tokens, from a model's logits.

The definition matches what the engines report as `output_token_logprobs`: the log-softmax of
`logits / T` at the sampling temperature T (SGLang reports raw-logit log-softmax for greedy
requests, so T = 0 is read as 1).

Alignment: a causal LM's logits at position t score the token at position t + 1. For one
sequence of n tokens whose last r tokens are the response, the response log-probs come from
logit rows n - r - 1 ... n - 2 and score tokens n - r ... n - 1. A response therefore needs a
prompt of at least one token.

Layouts: *packed* logits are `[sum(total_lengths), V]` (or `[1, T, V]`, slime's THD layout; extra
rows at the end are padding), *padded* logits are `[B, L, V]` with sample b at row b, left-aligned.
Rows are converted to float32 a chunk at a time (`chunk_size` rows, by default about 2^18 values on
a CPU and 2^26 on a GPU), and backward recomputes each chunk's softmax instead of keeping it, so a
long micro-batch or a large vocabulary costs no full-size float32 copy of the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def normalize_temperature(temperature: float | None) -> float:
    """The temperature that divides the logits: None or 0 (greedy) mean 1."""
    if temperature is None or temperature == 0:
        return 1.0
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    return float(temperature)


# Rows per chunk by default: float32 temporaries of at most 256 MB per chunk on a GPU (few kernel
# launches), and of about 1 MB on a CPU, where each chunk's temporary then stays in the core's cache
# between the passes over it (max, exp, sum, gather; the gradient's exp, scale, scatter), and the
# allocator reuses it chunk after chunk. 12m work of benchmarks/vs_trl.py (9,408 rows x 5,400): forward
# and backward 351 ms in one 200 MB chunk, 131 ms in chunks of 48 rows. At least 16 rows: a chunk's
# Python overhead stays small beside its work at a large vocabulary.
_AUTO_CHUNK_ELEMENTS = {"gpu": 1 << 26, "cpu": 1 << 18}
_MIN_AUTO_CHUNK_ROWS = 16


def auto_chunk_rows(vocab: int, device: torch.device) -> int:
    """The rows per chunk when none is given (see `_AUTO_CHUNK_ELEMENTS`)."""
    elements = _AUTO_CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "gpu"]
    return max(_MIN_AUTO_CHUNK_ROWS, elements // max(vocab, 1))


class _LogProbAndEntropy(torch.autograd.Function):
    """log p(target) and H(p) of softmax(logits * inv_t) row by row, in chunks of rows.

    Only the input logits and each row's log-sum-exp are kept for backward; each chunk's float32
    softmax is recomputed there, with the closed-form gradients d log p_y / dz = onehot(y) - p and
    dH / dz = -p * (z - sum(p * z)). An output that reaches no loss gets no gradient work: with the
    entropy a metric only (no entropy term in the loss), backward computes the log-prob term alone.
    """

    @staticmethod
    def forward(ctx, logits, targets, inv_t, chunk, with_entropy):
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        n = logits.size(0)
        log_probs = torch.empty(n, dtype=torch.float32, device=logits.device)
        lses = torch.empty(n, dtype=torch.float32, device=logits.device)
        entropy = torch.empty(n if with_entropy else 0, dtype=torch.float32, device=logits.device)
        for s in range(0, n, chunk):
            z = _scaled(logits[s : s + chunk], inv_t)
            top = z.amax(dim=-1, keepdim=True)
            ez = torch.sub(z, top).exp_()  # exp(z - max): the one [chunk, V] temporary
            total = ez.sum(dim=-1)
            lse = top.squeeze(-1) + total.log()
            lses[s : s + chunk] = lse
            log_probs[s : s + chunk] = z.gather(-1, targets[s : s + chunk, None]).squeeze(-1) - lse
            if with_entropy:  # H = lse - sum(p * z), p = ez / total
                entropy[s : s + chunk] = lse - ez.mul_(z).sum(dim=-1) / total
        ctx.save_for_backward(logits, targets, lses)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_log_probs, grad_entropy):
        logits, targets, lses = ctx.saved_tensors
        if grad_entropy is not None and not grad_entropy.numel():
            grad_entropy = None
        if grad_log_probs is None and grad_entropy is None:
            return None, None, None, None, None
        # contiguous, whatever the logits' strides: each chunk's gradient is written in place
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        inv_t, chunk = ctx.inv_t, ctx.chunk
        # In place where it can be: at a large vocabulary this loop is a sizeable share of the backward
        # pass, and every temporary [chunk, V] tensor is one more pass over memory.
        for s in range(0, logits.size(0), chunk):
            z = _scaled(logits[s : s + chunk], inv_t)
            out = grad[s : s + chunk]
            gz = out if out.dtype == torch.float32 else torch.empty_like(z)
            torch.sub(z, lses[s : s + chunk, None], out=gz).exp_()  # p
            term = None
            if grad_entropy is not None:
                term = z - (gz * z).sum(dim=-1, keepdim=True)
                term.mul_(gz).mul_(grad_entropy[s : s + chunk, None].float())
            if grad_log_probs is not None:
                g = grad_log_probs[s : s + chunk, None].float()
                gz.mul_(-g)
                gz.scatter_add_(-1, targets[s : s + chunk, None], g)
                if term is not None:
                    gz.sub_(term)
            else:
                assert term is not None  # one of the two gradients is there
                torch.neg(term, out=gz)
            if inv_t != 1.0:
                gz.mul_(inv_t)
            if gz is not out:
                out.copy_(gz)
        return grad, None, None, None, None


def _scaled(logits: torch.Tensor, inv_t: float) -> torch.Tensor:
    """float32 `logits * inv_t` (the logits themselves, not a copy, when they are float32 and inv_t is 1:
    never written to)."""
    z = logits.float()
    return z if inv_t == 1.0 else z * inv_t


def gather_log_probs_and_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float | None = 1.0,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row-aligned: `logits[i]` ([N, V]) scores `targets[i]` ([N]).

    Returns float32 `(log_probs [N], entropy [N] or None)`. Rows are processed `chunk_size` at a
    time (None, 0 or negative: `auto_chunk_rows`); backward keeps only `logits` and
    recomputes each chunk, so no [N, V] float32 copy outlives a chunk. `entropy_grad=False`
    returns the entropy detached (a metric only). Double backward is not supported.
    """
    if logits.dim() != 2:
        raise ValueError(
            f"logits must be [N, V] (rows aligned with targets), got shape {tuple(logits.shape)}"
        )
    targets = torch.as_tensor(targets, device=logits.device).long().reshape(-1)
    if targets.numel() != logits.size(0):
        raise ValueError(
            f"{logits.size(0)} logit rows but {targets.numel()} targets: they must be aligned 1:1"
        )
    vocab = logits.size(1)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(f"token id {bad} is outside the logits' vocabulary [0, {vocab})")
    inv_t = 1.0 / normalize_temperature(temperature)
    chunk = int(chunk_size) if chunk_size and chunk_size > 0 else auto_chunk_rows(vocab, logits.device)
    log_probs, entropy = _LogProbAndEntropy.apply(logits, targets, inv_t, chunk, with_entropy)
    if not with_entropy:
        return log_probs, None
    return log_probs, (entropy if entropy_grad else entropy.detach())


def token_log_probs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float | None = 1.0,
    with_entropy: bool = True,
    *,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Next-token log-probs of a whole sequence: `logits` [T, V] (or [B, T, V]) for `tokens` [T]
    (or [B, T]); entry t of the result ([T - 1] or [B, T - 1]) is log p(tokens[t + 1] | logits[t])."""
    if logits.dim() not in (2, 3) or tokens.dim() != logits.dim() - 1:
        raise ValueError(
            f"expected logits [T, V] with tokens [T], or [B, T, V] with [B, T]; got {tuple(logits.shape)} "
            f"and {tuple(tokens.shape)}"
        )
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} disagree on [B, T]")
    shifted_logits = logits[..., :-1, :]
    shifted_tokens = tokens[..., 1:]
    lead_shape = shifted_tokens.shape
    log_probs, entropy = gather_log_probs_and_entropy(
        shifted_logits.reshape(-1, logits.size(-1)),
        shifted_tokens.reshape(-1),
        temperature=temperature,
        with_entropy=with_entropy,
        chunk_size=chunk_size,
    )
    return log_probs.reshape(lead_shape), (entropy.reshape(lead_shape) if entropy is not None else None)


def _check_lengths(total_lengths: Sequence[int], response_lengths: Sequence[int]) -> None:
    if len(total_lengths) != len(response_lengths):
        raise ValueError(
            f"{len(total_lengths)} total_lengths but {len(response_lengths)} response_lengths: one each per sample"
        )
    for i, (n, r) in enumerate(zip(total_lengths, response_lengths, strict=True)):
        if r < 0 or r >= n:
            raise ValueError(
                f"sample {i}: response_length {r} with total_length {n}; a response needs 0 <= r < n "
                "(at least one prompt token predicts the first response token)"
            )


def _layout(x: torch.Tensor, num_samples: int) -> str:
    # Only a 3-D tensor with one row per sample is read as padded; a 2-D padded tensor (a value
    # head's [B, L]) looks like packed logits [T, V] and must be named with layout="padded".
    if x.dim() == 3 and num_samples > 1 and x.size(0) == num_samples:
        return "padded"
    return "packed"


def slice_responses(
    x: torch.Tensor,
    total_lengths: Sequence[int],
    response_lengths: Sequence[int],
    *,
    layout: str | None = None,
) -> list[torch.Tensor]:
    """Per sample, the rows of a per-position output (logits, critic values) that score the
    response: rows n - r - 1 ... n - 2 of that sample. Views, never copies.

    `x` is packed `[T, ...]` / `[1, T, ...]` or padded `[B, L, ...]`. Without `layout`, a 3-D `x`
    with one row per sample is padded and anything else packed; pass `layout="padded"` for a 2-D
    padded tensor such as a value head's `[B, L]`.
    """
    _check_lengths(total_lengths, response_lengths)
    layout = layout or _layout(x, len(total_lengths))
    out = []
    if layout == "padded":
        if x.size(0) != len(total_lengths):
            raise ValueError(f"padded input has {x.size(0)} rows for {len(total_lengths)} samples")
        for b, (n, r) in enumerate(zip(total_lengths, response_lengths, strict=True)):
            if x.size(1) < n:
                raise ValueError(
                    f"padded input of length {x.size(1)} is shorter than sample {b} ({n} tokens)"
                )
            out.append(x[b, n - r - 1 : n - 1])
        return out
    if layout != "packed":
        raise ValueError(f"layout must be 'packed' or 'padded', got {layout!r}")
    if x.dim() == 3 and x.size(0) == 1:
        x = x[0]
    elif x.dim() == 2 and x.size(0) == 1 and sum(total_lengths) > 1:
        x = x[0]  # a value head's [1, T]; packed logits [T, V] with T > 1 never have one row
    if x.size(0) < sum(total_lengths):
        raise ValueError(
            f"packed input has {x.size(0)} positions but the samples need sum(total_lengths) = {sum(total_lengths)}"
        )
    start = 0
    for n, r in zip(total_lengths, response_lengths, strict=True):
        out.append(x[start + n - r - 1 : start + n - 1])
        start += n
    return out


def per_sample_tokens(
    tokens: torch.Tensor | Sequence[torch.Tensor | Sequence[int]], total_lengths: Sequence[int]
) -> list[torch.Tensor]:
    """Each sample's full token sequence from a list of sequences, a packed [T] or a padded [B, L]."""
    if isinstance(tokens, torch.Tensor):
        if tokens.dim() == 2 and tokens.size(0) == len(total_lengths) and len(total_lengths) > 1:
            return [tokens[b, :n] for b, n in enumerate(total_lengths)]
        flat = tokens.reshape(-1)
        if flat.numel() < sum(total_lengths):
            raise ValueError(
                f"packed tokens hold {flat.numel()} ids but sum(total_lengths) = {sum(total_lengths)}"
            )
        return list(flat[: sum(total_lengths)].split(list(total_lengths)))
    if len(tokens) != len(total_lengths):
        raise ValueError(f"{len(tokens)} token sequences for {len(total_lengths)} samples")
    out = []
    for i, (seq, n) in enumerate(zip(tokens, total_lengths, strict=True)):
        seq = torch.as_tensor(seq).long().reshape(-1)
        if seq.numel() != n:
            raise ValueError(f"sample {i}: {seq.numel()} tokens but total_length {n}")
        out.append(seq)
    return out


def response_log_probs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor | Sequence[torch.Tensor | Sequence[int]],
    total_lengths: Sequence[int],
    response_lengths: Sequence[int],
    *,
    temperature: float | None = 1.0,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    chunk_size: int | None = None,
    layout: str | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Per sample, float32 log-probs (and entropies) of its response tokens, each `[r_i]`.

    Like slime, every row of the (packed or padded) logits is scored in one chunked pass, rows
    outside a response against a dummy target 0, and the response rows are then sliced out;
    the other rows get no gradient.
    """
    _check_lengths(total_lengths, response_lengths)
    layout = layout or _layout(logits, len(total_lengths))
    sequences = per_sample_tokens(tokens, total_lengths)
    if logits.dim() == 3 and layout == "packed":
        if logits.size(0) != 1:
            raise ValueError(
                f"logits {tuple(logits.shape)} are neither packed ([T, V] or [1, T, V]) nor padded "
                f"([B, L, V] with one row per sample, B = {len(total_lengths)})"
            )
        logits = logits[0]
    if (logits.dim() == 2 and layout == "padded") or logits.dim() not in (2, 3):
        raise ValueError(f"padded logits must be [B, L, V] and packed ones [T, V]; got {tuple(logits.shape)}")
    grid = logits.shape[:-1]
    targets = torch.zeros(grid, dtype=torch.long, device=logits.device)
    target_rows = slice_responses(targets, total_lengths, response_lengths, layout=layout)
    for rows, seq, r in zip(target_rows, sequences, response_lengths, strict=True):
        rows.copy_(seq[seq.numel() - r :])  # rows are views into `targets`
    log_probs, entropy = gather_log_probs_and_entropy(
        logits.reshape(-1, logits.size(-1)),
        targets.reshape(-1),
        temperature=temperature,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
        chunk_size=chunk_size,
    )
    per_sample = slice_responses(log_probs.view(grid), total_lengths, response_lengths, layout=layout)
    if entropy is None:
        return per_sample, None
    return per_sample, slice_responses(entropy.view(grid), total_lengths, response_lengths, layout=layout)
