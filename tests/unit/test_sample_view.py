"""The sample viewer artifact: hostile model output (backticks, pipes, HTML, NEL, U+2028, bidi overrides,
lone surrogates) stays inside its code block and becomes encodable text; long text is cut and says so."""

from __future__ import annotations

import re

from flows.sample_view import RESPONSE_CHARS, clean_text, fenced, inline, samples_markdown, truncate


def rows(response: str, prompt: str = "what is 2+2?", groups: int = 5, per_group: int = 6) -> list[dict]:
    return [
        {
            "group_index": g,
            "index": g * per_group + i,
            "prompt": prompt,
            "response": response,
            "reward": float(i % 2),
            "status": "completed",
            "response_length": 4,
            "label": "4|x",
        }
        for g in range(groups)
        for i in range(per_group)
    ]


HOSTILE = "a ```` b | c <b>d</b>\x85e\u2028f\u2029g\r\nh\ud800i\u202ej\x1bk\u200bl"


def test_hostile_text_stays_in_its_code_block_and_is_encodable():
    md = samples_markdown("demo", 3, rows(HOSTILE))
    md.encode("utf-8")  # a lone surrogate would raise here
    for ch in ("\x85", "\u2028", "\u2029", "\r", "\ud800", "\u202e", "\x1b", "\u200b"):
        assert ch not in md, repr(ch)
    assert "\\ud800" in md and "\\u202e" in md and "\\x1b" in md
    # every response sits in a fence longer than the backtick run inside it, on lines of its own
    blocks = re.findall(r"^(`{5,})text\n(.*?)\n\1$", md, flags=re.S | re.M)
    assert blocks and all("a ```` b | c <b>d</b>\ne\nf\ng\nh" in body for _, body in blocks)


def test_a_few_groups_and_samples_with_rewards_and_statuses():
    md = samples_markdown("demo", 3, rows("\\boxed{4}"))
    assert md.count("### Group ") == 3 and md.count("**Sample ") == 12
    assert "**Sample 1** · reward 1 · completed · 4 tokens" in md
    assert "label: 4\\|x · rewards of its 6 samples: 0, 1, 0, 1, 0, 1" in md
    assert "3 of the 5 trained groups (30 samples)" in md
    assert "No sample was stored" in samples_markdown("demo", 0, [])


def test_long_text_is_cut_and_says_so():
    long = "x" * (RESPONSE_CHARS + 100)
    md = samples_markdown("demo", 0, rows(long, prompt="system " * 500 + "what is 2+2?"))
    assert "x" * RESPONSE_CHARS + "\n[... cut ...]" in md and "x" * (RESPONSE_CHARS + 1) not in md
    assert "[... earlier text cut ...]" in md and "what is 2+2?" in md  # a prompt keeps its end
    assert (
        truncate("\n".join("abc" for _ in range(50)), 10_000, max_lines=3) == "abc\nabc\nabc\n[... cut ...]"
    )
    assert truncate("short", 100) == "short"


def test_fences_headings_and_cells():
    assert fenced("a ``` b").startswith("````text\n") and fenced("plain").startswith("```text\n")
    assert inline("a|b*c\nd") == "a\\|b\\*c d"
    assert inline({"acc": 1}) == '\\{"acc": 1\\}'
    assert clean_text("x\u2028y") == "x\ny"
