"""A tiny campaign on disk for the end-to-end tests: model, prompts, a reward module and the config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from helpers.tiny_models import make_tiny_model

REWARD_MODULE = '''
async def word_reward(args, sample):
    """A toy reward with spread: the share of response words that are number words."""
    words = sample.response.split()
    return sum(w in {"one", "two", "three", "yes"} for w in words) / max(1, len(words))
'''


def make_assets(root: Path) -> Path:
    """Writes `model/`, `prompts.jsonl` and the reward module `tiny_rewards.py` (put `root` on sys.path
    or PYTHONPATH so `tiny_rewards.word_reward` loads)."""
    make_tiny_model(root / "model", layers=2, hidden=64)
    words = "one two three four five six seven eight nine ten".split()
    (root / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": f"what is {w} plus {w}", "label": "2"}) + "\n" for w in words)
    )
    (root / "tiny_rewards.py").write_text(REWARD_MODULE)
    return root


def campaign_dict(root: Path, store: str, campaign: str, **rollout: Any) -> dict[str, Any]:
    """The campaign config over `make_assets(root)`; `rollout` overrides the rollout section."""
    return {
        "campaign": campaign,
        "model": {"hf_checkpoint": str(root / "model"), "cache_dir": str(root / "cache")},
        "data": {"prompt_data": str(root / "prompts.jsonl")},
        "rollout": {
            "num_rollout": 2,
            "rollout_batch_size": 2,
            "n_samples_per_prompt": 2,
            "over_sampling_batch_size": 3,
            "rollout_max_response_len": 12,
            "partial_rollout": True,
            **rollout,
        },
        "reward": {"custom_rm_path": "tiny_rewards.word_reward"},
        "engine": {"num_engines": 1, "local_engine_threads": 1},
        "train": {"lr": 1e-3, "micro_batch_size": 2},
        "storage": {"store": store, "scratch_dir": str(root / "scratch")},
    }
