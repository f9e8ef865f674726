"""The `slime-wf` command line.

The entry point above every layer (deployments, flows, tasks, the `slime_wf` library), so it lives
outside the library: `slime_wf` never imports it, nor anything of the Prefect layers. It applies
Prefect's settings itself (`flows.prefect_settings`) before a command imports Prefect.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from flows.prefect_settings import configure_prefect_environment
from slime_wf.checkpoint import commands as checkpoint_commands
from slime_wf.config import CampaignConfig, ConfigError, config_reference_markdown
from slime_wf.store import RunStore
from slime_wf.training import hf_parity, trainer_group


def _check_config(ns: argparse.Namespace) -> int:
    cfg = CampaignConfig.from_yaml(ns.config, ns.set)
    print(cfg.to_yaml(), end="")
    print(f"# config hash {cfg.config_hash()}", file=sys.stderr)
    return 0


def _config_reference(ns: argparse.Namespace) -> int:
    if ns.json_schema:
        print(json.dumps(CampaignConfig.model_json_schema(), indent=1))
    else:
        print(config_reference_markdown())
    return 0


def _run_flow(name: str):
    def run(ns: argparse.Namespace) -> int:
        cfg = CampaignConfig.from_yaml(ns.config, ns.set)
        # the Prefect layers are imported only when a flow runs, after Prefect's settings are applied
        configure_prefect_environment()
        from flows import campaign as flows_campaign

        result = getattr(flows_campaign, name)(cfg)
        print(json.dumps(result, indent=1, default=str))
        if name == "train":
            store = RunStore.for_campaign(cfg)
            print(reward_curve(store), file=sys.stderr)
            print(f"run store: {store.uri}", file=sys.stderr)
            api = os.environ.get("PREFECT_API_URL")
            print(
                f"Prefect UI: {api.removesuffix('/api')}"
                if api
                else "Prefect UI: start `prefect server start` and set PREFECT_API_URL to keep flow runs and artifacts "
                "(this run used a temporary server)",
                file=sys.stderr,
            )
        return 0

    return run


def reward_curve(store: RunStore) -> str:
    """The campaign's raw reward per rollout id, and the first 3 against the last 3."""
    rewards = []
    for rid in store.rollout_ids():
        metrics = store.read_json(RunStore.rollout_file(rid, "metrics.json"), default=None)
        if metrics and "rollout/raw_reward" in metrics:
            rewards.append((rid, metrics["rollout/raw_reward"]))
    if not rewards:
        return "no rollout metrics yet"
    lines = ["rollout  raw_reward"] + [f"{rid:7d}  {r:.3f}" for rid, r in rewards]
    if len(rewards) >= 6:
        first = sum(r for _, r in rewards[:3]) / 3
        last = sum(r for _, r in rewards[-3:]) / 3
        lines.append(f"mean of the first 3: {first:.3f}; of the last 3: {last:.3f} ({last - first:+.3f})")
    return "\n".join(lines)


def _add_flow_command(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--config", required=True, help="campaign YAML file (local or s3://)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting (repeatable), e.g. --set campaign=exp2 --set num_rollout=20",
    )
    p.set_defaults(func=_run_flow(name))


def _serve(ns: argparse.Namespace) -> int:
    configure_prefect_environment()
    from deployments.serve import serve

    serve(ns.config, ns.set, cron=ns.cron)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slime-wf", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "check-config", help="validate a campaign config and print it with every default filled in"
    )
    p.add_argument("--config", required=True, help="campaign YAML file (local or s3://)")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)"
    )
    p.set_defaults(func=_check_config)

    _add_flow_command(sub, "train", "run or resume a campaign (the Prefect `train` flow)")
    _add_flow_command(
        sub, "prepare", "download the checkpoint and make its FP8 rollout copy (the `prepare` flow)"
    )
    _add_flow_command(
        sub, "evaluate", "evaluate the last committed policy on eval.eval_datasets (the `evaluate` flow)"
    )

    p = sub.add_parser(
        "serve-deployments", help="register the train/prepare/evaluate deployments and serve them"
    )
    p.add_argument("--config", required=True, help="campaign YAML file: the deployments' default parameters")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (repeatable)"
    )
    p.add_argument("--cron", default=None, help="cron schedule of the train deployment (default: none)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("config-reference", help="print the configuration reference (markdown)")
    p.add_argument("--json-schema", action="store_true", help="print the JSON schema instead")
    p.set_defaults(func=_config_reference)

    p = sub.add_parser(
        "trainer-node",
        help="join a campaign's trainer group from another node (train.actor_num_nodes "
        "> 1): the command the campaign prints",
    )
    trainer_group.add_trainer_node_arguments(p)
    p.set_defaults(func=trainer_group.trainer_node_main)

    p = sub.add_parser("hf-parity", help="check the Megatron model against transformers on an HF checkpoint")
    hf_parity.add_arguments(p)
    p.set_defaults(func=hf_parity.main)

    p = sub.add_parser("download", help="resolve a checkpoint (local, s3://, hub repo id) to a local folder")
    checkpoint_commands.add_download_arguments(p)
    p.set_defaults(func=checkpoint_commands.download)

    p = sub.add_parser(
        "convert-fp8", help="convert a BF16 Hugging Face checkpoint to FP8 (block / channel / tensor)"
    )
    checkpoint_commands.add_convert_fp8_arguments(p)
    p.set_defaults(func=checkpoint_commands.convert_fp8)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return ns.func(ns)
    except ConfigError as err:
        print(f"slime-wf: {err}", file=sys.stderr)
        return 2
