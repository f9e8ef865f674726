"""A soak run: what real content and real faults do to a long campaign, in one test.

A random (untrained) tiny model over a byte-level tokenizer generates arbitrary Unicode (NEL, U+2028,
control characters, invalid UTF-8 as U+FFFD); the prompts carry the same characters. Rollouts are
served from an FP8 copy by two engines, with over-sampling, the zero-std filter and partial rollout
with off-policy masking. The campaign runs 40 rollout ids and is killed with SIGKILL three times at
moments spread over its progress, then resumed to the end. Afterwards the campaign invariant holds,
no engine outlives the campaign, and scratch stayed bounded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from helpers.campaign_killer import (
    all_json_parses,
    committed,
    folder_bytes,
    kill_when,
    rollout_stored,
    start_train,
    wait_no_processes,
)
from helpers.tiny_models import HOSTILE_CHARS, make_byte_tokenizer, make_tiny_model

from slime_wf.campaign import check_campaign_invariant
from slime_wf.store import RunStore

# Progress, not time, decides each kill; the limit only stops a hung run (one slow core takes ~3x longer).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

NUM_ROLLOUT = 40
KEEP_WEIGHT_EXPORTS = 2

REWARD_MODULE = '''
async def spread_reward(args, sample):
    """A reward with spread on random text: the parity of the number of distinct characters."""
    return float(len(set(sample.response)) % 2)
'''


def _assets(root: Path) -> Path:
    make_byte_tokenizer(root / "tokenizer")
    make_tiny_model(root / "model", layers=2, hidden=64, max_positions=256, tokenizer_dir=root / "tokenizer")
    rows = []
    for i in range(24):
        hostile = HOSTILE_CHARS[i % len(HOSTILE_CHARS)]
        rows.append(
            {
                "prompt": f"question {i}{hostile}what is {i} plus {i}?\u2028answer:",
                "label": f"{2 * i}{hostile}",
                "metadata": {"source": f"web{hostile}page", "note": "line\u0085break"},
            }
        )
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "soak_rewards.py").write_text(REWARD_MODULE)
    config = {
        "campaign": "soak",
        "model": {
            "hf_checkpoint": str(root / "model"),
            "cache_dir": str(root / "cache"),
            "rollout_fp8": True,
        },
        "data": {"prompt_data": str(root / "prompts.jsonl"), "rollout_shuffle": True},
        "rollout": {
            "num_rollout": NUM_ROLLOUT,
            "rollout_batch_size": 2,
            "n_samples_per_prompt": 4,
            "over_sampling_batch_size": 3,
            "rollout_max_response_len": 12,
            "partial_rollout": True,
            "mask_offpolicy_in_partial_rollout": True,
        },
        "reward": {"custom_rm_path": "soak_rewards.spread_reward"},
        "filter": {
            "dynamic_sampling_filter_path": "slime_wf.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std",
        },
        "engine": {"num_engines": 2, "local_engine_threads": 1},
        "train": {"lr": 1e-4, "micro_batch_size": 4},
        "storage": {
            "store": str(root / "store"),
            "scratch_dir": str(root / "scratch"),
            "keep_weight_exports": KEEP_WEIGHT_EXPORTS,
        },
    }
    path = root / "campaign.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=False))
    return path


def test_soak_forty_ids_three_kills_hostile_content(tmp_path, prefect_server):
    config = _assets(tmp_path)
    store = RunStore(str(tmp_path / "store" / "soak"))
    scratch = tmp_path / "scratch" / "soak"
    peak = {"scratch": 0}

    def sampled(condition):
        def check() -> bool:
            peak["scratch"] = max(peak["scratch"], folder_bytes(scratch))
            return condition()

        return check

    moments = [
        ("rollout 8 committed", lambda: committed(store) >= 8),
        ("rollout 20 stored", lambda: rollout_stored(store, 20)),
        ("rollout 31 committed", lambda: committed(store) >= 31),
    ]
    start = time.monotonic()
    kills = []
    for what, condition in moments:
        proc = start_train(config, prefect_server)
        assert kill_when(proc, sampled(condition), what), (
            f"the campaign ended before {what!r}: "
            + ((tmp_path / "train.log").read_text(errors="replace")[-3000:])
        )
        kills.append((what, committed(store)))
        all_json_parses(tmp_path / "store")
    proc = start_train(config, prefect_server)
    assert not kill_when(proc, sampled(lambda: False), "the end of the campaign")
    assert proc.returncode == 0, (tmp_path / "train.log").read_text(errors="replace")[-4000:]
    wall = time.monotonic() - start

    assert committed(store) == NUM_ROLLOUT - 1
    report = check_campaign_invariant(store)
    assert report["committed"] == NUM_ROLLOUT - 1
    assert report["trained"] == 2 * NUM_ROLLOUT
    assert all_json_parses(tmp_path / "store") > 0

    # The hostile characters went through generation, the store and training.
    responses = "".join(
        row["response"]
        for rid in range(NUM_ROLLOUT)
        for row in store.read_jsonl(RunStore.rollout_file(rid, "samples.jsonl"))
    )
    # Each of them breaks a line for str.splitlines. Which ones a random policy emits, and how often, is
    # chance (a run's responses held U+2029 38 times and NEL not once), so the check asks for several.
    emitted = {c for c in HOSTILE_CHARS if c in responses}
    assert len(emitted) >= 3, f"the random model emitted only {sorted(emitted)} of the line breakers"
    prompts = {row["prompt"] for row in store.read_jsonl(RunStore.rollout_file(0, "samples.jsonl"))}
    assert any("\u2028" in p for p in prompts)

    wait_no_processes(str(tmp_path / "model"))
    wait_no_processes(str(tmp_path / "cache"))

    # Scratch holds the newest weight exports and the engines' logs: bounded, whatever the number of ids.
    exports = sorted((scratch / "weights").iterdir())
    assert len(exports) <= KEEP_WEIGHT_EXPORTS, exports
    one_export = folder_bytes(exports[-1])
    logs = folder_bytes(scratch / "logs")
    bound = (KEEP_WEIGHT_EXPORTS + 2) * one_export + 2 * logs + (1 << 20)
    print(
        f"soak: {NUM_ROLLOUT} ids, {len(kills)} kills at {kills}, groups accounted {report}, "
        f"peak scratch {peak['scratch'] / 2**20:.1f} MiB (bound {bound / 2**20:.1f} MiB), wall {wall:.0f} s"
    )
    assert peak["scratch"] <= bound
