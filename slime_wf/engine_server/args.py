"""The local engine server's command line: its flags (SGLang's names), `--config FILE.yaml` as
SGLang reads it, and the checks that refuse a setting before anything loads."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import sys
from pathlib import Path
from typing import cast


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        argv = _merge_config(parser, argv)
    return parser.parse_args(argv)


def _merge_config(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """SGLang's `--config FILE.yaml`: a mapping of flag names (dashes or underscores) to values, put
    before the command-line flags so that the command line wins."""
    import yaml

    at = argv.index("--config")
    if at == len(argv) - 1:
        parser.error("--config needs a YAML file")
    path = Path(argv[at + 1])
    if path.suffix.lower() not in (".yaml", ".yml"):
        parser.error(f"--config {path}: the file must be YAML (.yaml or .yml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        parser.error(f"--config {path}: cannot read it: {err}")
    if not isinstance(data, dict):
        parser.error(f"--config {path}: the file must hold a mapping of flag names to values")
    known = {opt for action in parser._actions for opt in action.option_strings}
    merged: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if flag not in known or flag == "--config":
            parser.error(f"--config {path}: {key!r} is not a flag of this server (see --help)")
        if value is True:
            merged.append(flag)
        elif value is not None and value is not False:
            merged.append(f"{flag}={value}")  # one token: a value that starts with "-" is not read as a flag
    return merged + argv[:at] + argv[at + 2 :]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slime_wf.engine_server",
        description="Serve a Hugging Face causal LM on CPU with SGLang's native HTTP API.",
    )
    parser.add_argument("--model-path", required=True, help="Hugging Face checkpoint directory")
    parser.add_argument("--tokenizer-path", default=None, help="tokenizer directory (default: --model-path)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto = float32 on CPU",
    )
    parser.add_argument(
        "--max-running-requests", type=int, default=64, help="requests decoded together at most"
    )
    parser.add_argument(
        "--max-queued-requests",
        type=int,
        default=None,
        help="requests waiting for a running slot at most; one more gets HTTP 503 with Retry-After "
        "(default: no bound, as in SGLang)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="bearer key every endpoint but /health* requires (SGLang's flag; pass it with --config to keep "
        "it out of the process list)",
    )
    parser.add_argument(
        "--admin-api-key",
        default=None,
        help="bearer key the management endpoints (abort, pause, continue, flush, weight updates) require; "
        "they then refuse --api-key (SGLang's flag)",
    )
    parser.add_argument(
        "--config", default=None, help="YAML file of flags (command-line flags win), as in SGLang"
    )
    parser.add_argument(
        "--num-threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    parser.add_argument(
        "--min-gflop-per-thread",
        type=float,
        default=0.5,
        help="a forward pass gets one of the --num-threads per this many GFLOP of its arithmetic, at least one: "
        "waking sleeping threads costs more than a small pass gains from them (0: always all)",
    )
    parser.add_argument("--weight-version", default="default", help="initial weight_version reported")
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--parent-pid",
        type=int,
        default=None,
        help="exit when this process (the launcher) is gone, even after kill -9, so no engine outlives its campaign",
    )
    return parser


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (an unresolvable name is not)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    # A host lookup answers in the IP families only, whose socket addresses start with the address string.
    addresses = [cast(str, info[4][0]) for info in infos]
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def check_args(args: argparse.Namespace) -> None:
    """Refuse settings that cannot work or would open the engine to the network; the message says what to do."""
    if args.max_running_requests < 1:
        raise SystemExit("--max-running-requests must be at least 1")
    if args.min_gflop_per_thread < 0:
        raise SystemExit("--min-gflop-per-thread must be 0 or more (0: every forward pass gets all threads)")
    if args.max_queued_requests is not None and args.max_queued_requests < 1:
        raise SystemExit("--max-queued-requests must be at least 1 (leave it out for no bound)")
    if not (args.api_key or args.admin_api_key) and not is_loopback(args.host):
        raise SystemExit(
            f"refusing to listen on --host {args.host}, which is not a loopback address, without a key: anyone "
            "who can reach it could generate, abort, pause or load weights from any folder. Pass --api-key "
            "and --admin-api-key (or put them in a --config YAML file), or listen on 127.0.0.1."
        )
