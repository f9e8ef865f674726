"""What every part of the campaign config shares: the section base model, `ConfigError`, the
check of fields that name an environment variable, and the text of a validation error."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, ValidationError

from slime_wf.redact import redact_url

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_var_name(value: str | None) -> str | None:
    """Fields ending in _env name an environment variable, so that the secret stays out of the config."""
    if value is not None and not ENV_NAME.fullmatch(value):
        raise ValueError(
            "must be the name of an environment variable (letters, digits and _), not the secret itself; "
            "export the secret under that name where the campaign runs"
        )
    return value


class ConfigError(ValueError):
    """A campaign configuration that cannot be used; the message says what to change."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def format_validation_error(err: ValidationError, what: str = "campaign config") -> str:
    """One line per problem: the setting's dotted location, its value (credentials in URLs
    masked) and what is wrong."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "config"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "missing":
            lines.append(f"{loc}: required setting is missing")
        elif loc == "config":
            lines.append(msg)
        elif (
            "input" not in e or isinstance(e["input"], dict) or loc.endswith("_env")
        ):  # _env: maybe a pasted secret
            lines.append(f"{loc}: {msg}")
        else:
            lines.append(f"{loc} = {redact_url(repr(e['input']))}: {msg}")
    return f"invalid {what}:\n  " + "\n  ".join(lines)
