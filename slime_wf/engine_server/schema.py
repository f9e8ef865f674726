"""SGLang's own JSON contract for `/generate`, loaded from the installed `sglang` package.

SGLang ships its HTTP schema as generated msgspec structs in `sglang/api/v1/api_types.py`.
Importing `sglang` runs its `__init__`, which needs the GPU runtime; loading that one file by
path needs only `msgspec`. The local engine server checks every `/generate` body with it (as
SGLang's server does), and contract tests check requests and responses on both sides.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_MODULE_NAME = "_slime_wf_sglang_api_types"


class SchemaUnavailableError(RuntimeError):
    """SGLang's schema file (or msgspec) is not installed."""


class ContractError(ValueError):
    """A body violates SGLang's JSON contract; the text says which field and how."""


@functools.cache
def _find_api_types() -> Path | None:
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "api" / "v1" / "api_types.py"
        if path.is_file():
            return path
    return None


@functools.cache
def load_api_types() -> ModuleType:
    """The `sglang.api.v1.api_types` module, loaded by file path without running `sglang/__init__.py`."""
    path = _find_api_types()
    if path is None:
        raise SchemaUnavailableError(
            "SGLang's schema (sglang/api/v1/api_types.py) is not installed; "
            "install it without its GPU dependencies: pip install --no-deps sglang==0.5.23 msgspec"
        )
    try:
        import msgspec  # noqa: F401
    except ImportError as err:
        raise SchemaUnavailableError("SGLang's schema needs msgspec: pip install msgspec") from err
    spec = importlib.util.spec_from_file_location(_MODULE_NAME, path)
    assert spec is not None and spec.loader is not None  # a path ending in .py gets a source file loader
    module = importlib.util.module_from_spec(spec)
    # Not registered in sys.modules: the generated `from_json_value` decoders need no type resolution
    # (only msgspec's own typed decoders would look the module's annotations up there).
    spec.loader.exec_module(module)
    return module


def load_sglang_file(relative: str, source_only: bool = False) -> ModuleType | str:
    """One file of the installed `sglang` package (e.g. `srt/utils/auth.py`), loaded by path like the
    schema, or its text with `source_only`: contract tests compare the local server with SGLang's own
    rules. Only files that import nothing of SGLang's GPU runtime load this way."""
    spec = importlib.util.find_spec("sglang")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(root) / relative for root in roots if (Path(root) / relative).is_file()), None)
    if path is None:
        raise SchemaUnavailableError(
            f"sglang/{relative} is not installed; install SGLang without its GPU dependencies: "
            "pip install --no-deps sglang==0.5.23 msgspec"
        )
    if source_only:
        return path.read_text()
    name = "_slime_wf_sglang_" + relative.removesuffix(".py").replace("/", "_")
    file_spec = importlib.util.spec_from_file_location(name, path)
    assert (
        file_spec is not None and file_spec.loader is not None
    )  # a path ending in .py gets a source file loader
    module = importlib.util.module_from_spec(file_spec)
    # `@dataclass` looks a class's module up in sys.modules while the class is created (postponed
    # annotations), so the module is registered while it runs and removed afterwards.
    sys.modules[name] = module
    try:
        file_spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def schema_available() -> bool:
    """Whether SGLang's schema can be loaded here."""
    try:
        load_api_types()
    except SchemaUnavailableError:
        return False
    return True


def _decode(type_name: str, body: Any, what: str) -> Any:
    api = load_api_types()
    try:
        return getattr(api, type_name).from_json_value(body)
    except api.JsonContractError as err:
        raise ContractError(f"{what} violates SGLang's schema ({type_name}): {err}") from err


def generate_request_error(body: Any) -> str | None:
    """SGLang's own 400 text for a `/generate` body, or None when the body passes (or no schema is installed)."""
    if not schema_available():
        return None
    api = load_api_types()
    try:
        api.GenerateRequest.from_json_value(body)
    except api.JsonContractError as err:
        return str(err)
    return None


def validate_generate_request(body: Any) -> Any:
    """Decode a `/generate` request body with SGLang's schema; raises `ContractError` with the reason."""
    return _decode("GenerateRequest", body, "/generate request body")


def validate_generate_response(body: Any) -> Any:
    """Decode a `/generate` response body (one object, not a batch list) with SGLang's schema."""
    return _decode("GenerateResponse", body, "/generate response body")


def validate_model_info(body: Any) -> Any:
    """Decode a `/model_info` response with SGLang's schema."""
    return _decode("GetModelInfoResponse", body, "/model_info response body")
