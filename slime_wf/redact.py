"""Masking credentials in URLs before they reach a log, an error, sample metadata or a stored file.

A URL may carry a secret in its userinfo (`https://user:password@host`) or in a query or fragment
parameter (`?token=...`, S3's `X-Amz-Signature=...`, Azure's `sig=...`). `redact_url` masks both
in every URL found inside a piece of text and leaves the rest alone, so an error message stays
readable: `remote_rm https://***@rm.example/score?api_key=***&model=m: HTTP 500`.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
# a parameter whose name contains one of these is treated as a credential (over-masking is cheap)
_SECRET_NAME = re.compile(r"token|key|secret|sig|pass|pwd|auth|credential|session", re.IGNORECASE)
_TRAILING = re.compile(r"[.,:;!?)\]}]*$")
_PARAM = re.compile(r"(?<=[?&#;])([^=&#;?/]+)=([^&#;]*)")


def _mask_param(match: re.Match) -> str:
    name, value = match.group(1), match.group(2)
    return f"{name}={MASK}" if value and _SECRET_NAME.search(name) else match.group(0)


def _redact_one(match: re.Match) -> str:
    url = match.group(0)
    found = _TRAILING.search(url)
    assert found is not None  # a `*` run anchored at `$` matches every string, if only empty
    trailing = found.group(0)  # punctuation of the sentence around the URL
    url = url[: len(url) - len(trailing)]
    scheme, rest = url.split("://", 1)
    end = len(rest)
    for sep in "/?#":
        pos = rest.find(sep)
        if pos != -1:
            end = min(end, pos)
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:  # the last @ ends the userinfo (a password may hold an unescaped one)
        authority = MASK + authority[authority.rfind("@") :]
    if tail:
        tail = _PARAM.sub(_mask_param, tail)
    return f"{scheme}://{authority}{tail}{trailing}"


def redact_url(text: str) -> str:
    """`text` with the credentials of every URL in it masked (userinfo, and query or fragment
    parameters named like a token, key, secret, signature or password)."""
    if not text or "://" not in text:
        return text
    return _URL.sub(_redact_one, text)


def redact_urls_in(value: Any) -> Any:
    """A copy of a JSON-like value (dicts, lists, strings) with `redact_url` applied to every string."""
    if isinstance(value, str):
        return redact_url(value)
    if isinstance(value, dict):
        return {k: redact_urls_in(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_urls_in(v) for v in value]
    return value
