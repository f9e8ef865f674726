"""The tiny-math-tools example (examples/tiny-math-tools): a multi-turn calculator environment whose
plugin files are written for slime, trained in a short campaign on CPU.

What "trains correctly" means here: every sample's tokens, loss mask and engine log-probs line up;
the calculator's tokens are in the response with loss mask 0; and the trainer's log-probs of the
policy's own tokens match the engine's on the first rollout (same weights), which would not hold if
a tool token were trained on (its stored log-prob is 0.0) or the lists were shifted.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from slime_wf.campaign import Campaign
from slime_wf.config import CampaignConfig
from slime_wf.store import RunStore

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings(
        "ignore::DeprecationWarning:megatron.*",
        "ignore::DeprecationWarning:torch.*",
        "ignore::FutureWarning:torch.*",
        "ignore::FutureWarning:megatron.*",
    ),
]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "tiny-math-tools"


def _make_assets_module():
    spec = importlib.util.spec_from_file_location(
        "tiny_math_make_assets", ROOT / "examples/tiny-math/make_assets.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The tiny-math tokenizer, prompts and untrained model: its answers are mostly wrong, so most
    samples take the calculator's turn."""
    ma = _make_assets_module()
    out = tmp_path_factory.mktemp("tiny-math-tools")
    settings = ma.Settings()
    ma.build_tokenizer(out / "tokenizer")
    train, _test = ma.make_problems(settings)
    ma.write_jsonl(out / "train.jsonl", train)
    ma.make_base_model(out / "model", out / "tokenizer", settings)
    return out


@pytest.fixture(autouse=True)
def _example_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE))


def test_calculator_campaign_trains_on_the_policy_tokens_only(assets, tmp_path):
    cfg = CampaignConfig.from_yaml(
        str(EXAMPLE / "campaign.yaml"),
        [
            f"hf_checkpoint={assets / 'model'}",
            f"prompt_data={assets / 'train.jsonl'}",
            f"cache_dir={tmp_path / 'cache'}",
            f"store={tmp_path / 'store'}",
            f"scratch_dir={tmp_path / 'scratch'}",
            "num_rollout=2",
            "rollout_batch_size=2",
            "n_samples_per_prompt=4",
            "over_sampling_batch_size=2",
            "num_engines=1",
            "local_engine_threads=1",
            "micro_batch_size=8",
            "save_interval=2",
            # an untrained policy gets mostly zero rewards: let such groups fill the batch
            "dynamic_sampling_filter_path=slime.rollout.filter_hub.dynamic_sampling_filters."
            "check_reward_nonzero_std_with_fallback",
        ],
    )
    with Campaign(cfg) as campaign:
        manifest = campaign.run()
    assert manifest["last_completed_rollout_id"] == 1
    store = RunStore.for_campaign(cfg)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets / "model")
    tool_turns = 0
    for rid in (0, 1):
        for s in store.read_jsonl(RunStore.rollout_file(rid, "samples.jsonl")):
            n = s["response_length"]
            assert len(s["loss_mask"]) == len(s["rollout_log_probs"]) == n > 0
            prompt_len = len(s["tokens"]) - n
            assert tokenizer.decode(s["tokens"][prompt_len:]) == s["response"]
            masked = [t for t, m in zip(s["tokens"][prompt_len:], s["loss_mask"], strict=True) if m == 0]
            if s["metadata"]["turns"] == 2:
                tool_turns += 1
                question = re.search(r"what is (\d) \+ (\d) \?", tokenizer.decode(s["tokens"][:prompt_len]))
                a, b = map(int, question.groups())
                # the calculator's turn, and only it, is masked; its log-probs are the 0.0 placeholders
                assert (
                    tokenizer.decode(masked)
                    == f"<|im_end|>\n<|im_start|>user\n{a} + {b} = {a + b}<|im_end|>\n<|im_start|>assistant\n"
                )
                assert all(
                    lp == 0.0 for lp, m in zip(s["rollout_log_probs"], s["loss_mask"], strict=True) if m == 0
                )
            else:
                assert masked == []
            assert s["reward"] in (0.0, 0.5, 1.0)
    assert tool_turns > 0
    metrics = store.read_json(RunStore.rollout_file(0, "metrics.json"))
    diff = next(v for k, v in metrics.items() if k.endswith("rollout_logprob_abs_diff"))
    assert diff < 1e-3, {k: v for k, v in metrics.items() if "rollout_" in k}
