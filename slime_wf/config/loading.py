"""Loading a campaign config: reading YAML, checking every key against the sections, applying
`key=value` overrides. An unknown key gets a close match ("did you mean 'reward.rm_type'?")."""

from __future__ import annotations

import difflib
import json
from typing import Any

import fsspec
import yaml

from .base import ConfigError
from .sections import SECTIONS


def read_yaml(path: str) -> Any:
    """The parsed YAML of `path` (local or any fsspec URL)."""
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"campaign config {path} does not exist") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"campaign config {path} is not valid YAML: {err}") from None


def checked_data(data: dict[str, Any] | None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A detached copy of `data` with every key checked and the overrides applied, ready to validate."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"a campaign config must be a mapping of sections, got {type(data).__name__}")
    data = json.loads(json.dumps(data, default=str))  # detached copy; overrides must not touch the caller's
    _check_keys(data)
    for item in overrides or []:
        _apply_override(data, item)
    return data


def leaf_sections() -> dict[str, str]:
    """Leaf name -> its section."""
    out: dict[str, str] = {}
    for section, model in SECTIONS.items():
        for leaf in model.model_fields:
            out[leaf] = section
    return out


def _valid_keys() -> list[str]:
    keys = ["campaign", *SECTIONS]
    for section, model in SECTIONS.items():
        keys += [f"{section}.{leaf}" for leaf in model.model_fields]
    return keys


def _unknown_key_error(key: str) -> ConfigError:
    leaves = leaf_sections()
    bare = key.rsplit(".", 1)[-1]
    if bare in leaves and key != f"{leaves[bare]}.{bare}":
        return ConfigError(f"unknown key {key!r}: did you mean '{leaves[bare]}.{bare}'?")
    candidates = _valid_keys() + list(leaves)
    hint = difflib.get_close_matches(key, candidates, n=1, cutoff=0.6) or difflib.get_close_matches(
        bare, list(leaves), n=1, cutoff=0.6
    )
    if hint:
        best = (
            hint[0]
            if "." in hint[0] or hint[0] in ("campaign", *SECTIONS)
            else f"{leaves[hint[0]]}.{hint[0]}"
        )
        return ConfigError(f"unknown key {key!r}: did you mean {best!r}?")
    return ConfigError(f"unknown key {key!r}; valid sections: campaign, {', '.join(SECTIONS)}")


def _check_keys(data: dict[str, Any]) -> None:
    for key, value in data.items():
        if key == "campaign":
            continue
        if key not in SECTIONS:
            raise _unknown_key_error(str(key))
        if value is None:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"section {key!r} must be a mapping of settings, got {value!r}")
        for leaf in value:
            if leaf not in SECTIONS[key].model_fields:
                raise _unknown_key_error(f"{key}.{leaf}")


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. rollout_batch_size=16)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if key == "campaign":
        data["campaign"] = str(value) if value is not None else value
        return
    parts = key.split(".")
    if len(parts) == 1:
        section = leaf_sections().get(key)
        if section is None:
            raise _unknown_key_error(key)
        parts = [section, key]
    if len(parts) != 2 or parts[0] not in SECTIONS or parts[1] not in SECTIONS[parts[0]].model_fields:
        raise _unknown_key_error(key)
    section_data = data.get(parts[0]) or {}
    section_data[parts[1]] = value
    data[parts[0]] = section_data
