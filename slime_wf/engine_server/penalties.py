"""Per-request logit adjustments with SGLang 0.5.23's semantics (`srt/sampling/penaltylib/`,
`sampling_batch_info.py`), applied to the raw logits before temperature, truncation and the
returned log-probs (so log-probs include them, as SGLang's do).

Order, as SGLang applies its accumulated penalties before each forward:

1. additive: `frequency_penalty` × (times the token was generated), `presence_penalty` if it was
   generated at all, and -inf on EOS and `stop_token_ids` while fewer than `min_new_tokens` tokens
   were generated (stop strings are not held back, as in SGLang);
2. scaling: `repetition_penalty` divides positive and multiplies negative logits of tokens
   generated so far;
3. `logit_bias`, added last.

Only output tokens count, never the prompt: SGLang's penalizers accumulate output tokens only.
Every output token counts from the step after it was generated, which is what SGLang does with
`--disable-overlap-schedule`; with its default overlap scheduler the most recent token joins one
step late and the prompt's last token stands in for it at the first decode step.
"""

from __future__ import annotations

import torch

from slime_wf.engine_server.sampling import SamplingParams


class LogitAdjuster:
    """One request's penalties: the counts of its output tokens and what to do with the logits."""

    def __init__(self, params: SamplingParams, vocab_size: int, eos_token_ids: set[int]):
        self.params = params
        self.generated = 0
        p = params
        needs_counts = p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 or p.repetition_penalty != 1.0
        self.counts = torch.zeros(vocab_size) if needs_counts else None
        self.stop_ids = (
            torch.tensor(sorted(t for t in p.stop_token_ids | eos_token_ids if 0 <= t < vocab_size))
            if p.min_new_tokens > 0
            else None
        )
        self.bias: torch.Tensor | None = None
        if p.logit_bias:
            self.bias = torch.zeros(vocab_size)
            self.bias[torch.tensor(list(p.logit_bias))] = torch.tensor(list(p.logit_bias.values()))

    @classmethod
    def build(cls, params: SamplingParams, vocab_size: int, eos_token_ids: set[int]) -> LogitAdjuster | None:
        """The request's adjuster, or None when its parameters leave the logits as they are."""
        p = params
        if (
            p.frequency_penalty == 0.0
            and p.presence_penalty == 0.0
            and p.repetition_penalty == 1.0
            and p.min_new_tokens == 0
            and not p.logit_bias
        ):
            return None
        return cls(params, vocab_size, eos_token_ids)

    def apply_(self, logits: torch.Tensor) -> None:
        """Adjust one row of logits ([vocab]) in place, before the next token is drawn."""
        p = self.params
        if self.counts is not None:
            if p.frequency_penalty != 0.0:
                logits.sub_(p.frequency_penalty * self.counts)
            if p.presence_penalty != 0.0:
                logits.sub_(p.presence_penalty * (self.counts > 0))
        if self.stop_ids is not None and self.generated < p.min_new_tokens and self.stop_ids.numel():
            logits[self.stop_ids] = float("-inf")
        if self.counts is not None and p.repetition_penalty != 1.0:
            scale = torch.where(self.counts > 0, p.repetition_penalty, 1.0)
            logits.copy_(torch.where(logits < 0, logits * scale, logits / scale))
        if self.bias is not None:
            logits.add_(self.bias)

    def observe(self, token: int) -> None:
        """Count a generated token."""
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1
