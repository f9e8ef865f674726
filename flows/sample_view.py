"""The sample viewer of a rollout id: a few groups of the trained batch as markdown, for the Prefect UI.

Each group shows its prompt once, then each sample's reward, status, length and response. Model
output is hostile text: it may hold backticks, pipes, HTML, bidirectional overrides, line
separators that are not newlines (NEL, U+2028, U+2029), control characters and lone surrogates
(which cannot be encoded as UTF-8 at all). Prompts and responses therefore go into fenced code
blocks whose fence is longer than any backtick run inside, after every line break is made a plain
newline and every other invisible or unencodable character is written as a visible escape; the
short fields that sit in headings and tables are escaped for markdown as well.
"""

from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

GROUPS = 3  # groups shown per id
SAMPLES_PER_GROUP = 4
PROMPT_CHARS = 600  # the end of a prompt is kept: a chat template puts the question last
RESPONSE_CHARS = 800
MAX_LINES = 30  # per prompt or response

_LINE_BREAKS = re.compile("\r\n|[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~])")


def _visible(ch: str) -> str:
    """A character as shown: itself, or an escape when it is invisible, reorders text, or is a lone surrogate."""
    code = ord(ch)
    if ch in "\n\t":
        return ch
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    category = unicodedata.category(ch)
    if category in ("Cc", "Cf", "Co", "Cn", "Zl", "Zp"):  # controls, bidi and zero-width format characters
        return f"\\u{code:04x}" if code > 0xFF else f"\\x{code:02x}"
    return ch


def clean_text(text: Any) -> str:
    """Line breaks as newlines; invisible, reordering and unencodable characters as visible escapes."""
    if not isinstance(text, str):
        text = json.dumps(text, ensure_ascii=False, default=str)
    text = _LINE_BREAKS.sub("\n", text)
    return "".join(_visible(ch) for ch in text)


def truncate(text: str, limit: int, *, keep_end: bool = False, max_lines: int = MAX_LINES) -> str:
    """At most `limit` characters and `max_lines` lines (the last ones with `keep_end`), saying so when cut."""
    lines = text.split("\n")
    out = "\n".join(lines[-max_lines:] if keep_end else lines[:max_lines])
    out = out[-limit:] if keep_end else out[:limit]
    if out == text:
        return text
    return f"[... earlier text cut ...]\n{out}" if keep_end else f"{out}\n[... cut ...]"


def fenced(text: str) -> str:
    """`text` in a fenced code block that no backtick run inside it can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def inline(value: Any, limit: int = 80) -> str:
    """A short field (a reward, a status, a label) for a heading or a table cell: one line, escaped."""
    text = clean_text(value).replace("\n", " ").replace("\t", " ")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):  # chat messages
        return "\n".join(
            f"[{m.get('role', '?')}] {m.get('content', '')}" if isinstance(m, dict) else str(m)
            for m in prompt
        )
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, default=str)


def _reward(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return inline(value, 40)


def samples_markdown(campaign: str, rollout_id: int, samples: list[dict[str, Any]]) -> str:
    """The viewer of rollout `rollout_id` from its stored samples (samples.jsonl rows)."""
    groups: dict[Any, list[dict[str, Any]]] = {}
    for sample in samples:
        groups.setdefault(sample.get("group_index"), []).append(sample)
    head = (
        f"## {inline(campaign)}, rollout {rollout_id}: samples\n\n"
        f"{min(GROUPS, len(groups))} of the {len(groups)} trained groups ({len(samples)} samples), "
        f"up to {SAMPLES_PER_GROUP} samples each; prompts show their last {PROMPT_CHARS} characters, "
        f"responses their first {RESPONSE_CHARS}."
    )
    parts = [head]
    for index, members in list(groups.items())[:GROUPS]:
        first = members[0]
        rewards = ", ".join(_reward(s.get("reward")) for s in members)
        parts.append(
            f"### Group {inline(index)}\n\nlabel: {inline(first.get('label'))} · rewards of its "
            f"{len(members)} samples: {rewards}\n\n**Prompt**\n\n"
            + fenced(truncate(clean_text(_prompt_text(first.get("prompt"))), PROMPT_CHARS, keep_end=True))
        )
        for sample in members[:SAMPLES_PER_GROUP]:
            parts.append(
                f"**Sample {inline(sample.get('index'))}** · reward {_reward(sample.get('reward'))} · "
                f"{inline(sample.get('status'))} · {inline(sample.get('response_length'))} tokens\n\n"
                + fenced(truncate(clean_text(sample.get("response") or ""), RESPONSE_CHARS))
            )
    if not groups:
        parts.append("No sample was stored for this rollout id.")
    return "\n\n".join(parts) + "\n"
