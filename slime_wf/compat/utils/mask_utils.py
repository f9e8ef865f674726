"""`slime.utils.mask_utils`: the loss mask of a whole conversation (SFT and multi-turn rollouts).

slime writes one routine per chat-template family (`tokenizer_type` qwen, qwen3, qwen3_5,
distill_qwen). This one works from the template itself for every family: it renders the conversation
one message longer each time and takes the new tokens; an assistant message trains on its tokens
after the generation prompt (`<|im_start|>assistant\\n` and the like), every other message on none.
That needs a template under which a conversation's rendering starts with the rendering of its
first messages; one that rewrites earlier turns (a template that drops past reasoning) is reported
with the message where it happens. `tokenizer_type` is accepted and only checked.
"""

from __future__ import annotations

from typing import Any

TOKENIZER_TYPES = ("qwen", "qwen3", "qwen3_5", "distill_qwen")


def get_response_lengths(loss_masks: list[list[int]]) -> list[int]:
    """Per mask: the length from its first 1 to its end (0 when it has none)."""
    return [len(mask[mask.index(1) :]) if 1 in mask else 0 for mask in loss_masks]


class MultiTurnLossMaskGenerator:
    def __init__(self, tokenizer: Any, tokenizer_type: str = "qwen"):
        if tokenizer_type not in TOKENIZER_TYPES:
            raise ValueError(f"unsupported tokenizer_type {tokenizer_type!r}; one of {TOKENIZER_TYPES}")
        self.tokenizer = tokenizer
        self.tokenizer_type = tokenizer_type

    def get_response_lengths(self, loss_masks: list[list[int]]) -> list[int]:
        return get_response_lengths(loss_masks)

    def _render(self, messages: list[dict], tools: list[dict] | None, generation_prompt: bool) -> list[int]:
        if not messages and not generation_prompt:
            return []
        ids = self.tokenizer.apply_chat_template(
            messages, tokenize=True, tools=tools, add_generation_prompt=generation_prompt, return_dict=False
        )
        return list(ids)

    def _extend(self, before: list[int], after: list[int], i: int, what: str) -> list[int]:
        if after[: len(before)] != before:
            raise ValueError(
                f"the chat template renders messages[:{i + 1}] ({what}) without the rendering of the messages "
                "before it as a prefix (it rewrites earlier turns); its loss mask cannot be built per message"
            )
        return after[len(before) :]

    def get_loss_mask(
        self, messages: list[dict], tools: list[dict] | None = None
    ) -> tuple[list[int], list[int]]:
        """(token ids, loss mask) of the conversation: 1 on the assistant's tokens, unless the message
        has `step_loss_mask` other than 1."""
        token_ids: list[int] = []
        loss_mask: list[int] = []
        for i, message in enumerate(messages):
            full = self._render(messages[: i + 1], tools, generation_prompt=False)
            if message["role"] == "assistant":
                header = self._render(messages[:i], tools, generation_prompt=True)
                head = self._extend(token_ids, header, i, "the generation prompt")
                body = self._extend(header, full, i, "the assistant message")
                trained = 1 if message.get("step_loss_mask", 1) == 1 else 0
                new_mask = [0] * len(head) + [trained] * len(body)
            else:
                new_mask = [0] * len(self._extend(token_ids, full, i, f"a {message['role']} message"))
            token_ids = full
            loss_mask += new_mask
        return token_ids, loss_mask

    def get_loss_mask_with_multimodal_alignment(
        self, messages: list[dict], input_ids: list[int], tools: list[dict] | None = None
    ) -> tuple[list[int], list[int]]:
        """The text-only mask, left-padded with zeros to `input_ids` (which a processor expanded)."""
        text = []
        for msg in messages:
            content = msg.get("content")
            if isinstance(content, list):
                parts = [
                    item.get("text", "") if isinstance(item, dict) else item
                    for item in content
                    if isinstance(item, str) or (isinstance(item, dict) and item.get("type") == "text")
                ]
                msg = {**msg, "content": " ".join(parts)}
            text.append(msg)
        _, mask = self.get_loss_mask(text, tools=tools)
        if len(input_ids) < len(mask):
            raise ValueError(
                f"input_ids ({len(input_ids)}) is shorter than the text's loss mask ({len(mask)}): the processor "
                "and the tokenizer tokenize differently"
            )
        return input_ids, [0] * (len(input_ids) - len(mask)) + mask

    def get_text_from_loss_mask(self, token_ids: list[int], loss_masks: list[int]) -> list[str]:
        """The decoded text of each run of trained tokens."""
        texts, run = [], []
        for token, mask in zip(token_ids, loss_masks, strict=False):
            if mask == 1:
                run.append(token)
            elif run:
                texts.append(self.tokenizer.decode(run))
                run = []
        if run:
            texts.append(self.tokenizer.decode(run))
        return texts


__all__ = ["MultiTurnLossMaskGenerator", "get_response_lengths"]
