"""The parameters of a deployment run, as JSON, from a campaign file and overrides:

    python -m deployments.params --config campaign.yaml --set num_rollout=5 \\
        | prefect deployment run 'train/<campaign>-run-or-resume' --params -

Prefect replaces a deployment's default `config` as a whole when a run passes one, so the run gets
the full, validated config rather than only the changed keys.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from slime_wf.config import CampaignConfig, ConfigError


def run_parameters(config_path: str, overrides: list[str] | None = None) -> dict[str, Any]:
    return {"config": CampaignConfig.from_yaml(config_path, overrides).model_dump(mode="json")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.params",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="campaign YAML file (local or s3://)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)"
    )
    ns = parser.parse_args(argv)
    try:
        print(json.dumps(run_parameters(ns.config, ns.set)))
    except ConfigError as err:
        print(f"deployments.params: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
