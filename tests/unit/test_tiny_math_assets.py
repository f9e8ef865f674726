"""The tiny-math demo's assets (examples/tiny-math/make_assets.py), made with a short warm start."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest

from slime_wf.config import CampaignConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tiny-math"

pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning:megatron.*",
    "ignore::DeprecationWarning:torch.*",
    "ignore::FutureWarning:torch.*",
    "ignore::FutureWarning:megatron.*",
)


def _load_module():
    spec = importlib.util.spec_from_file_location("tiny_math_make_assets", EXAMPLE / "make_assets.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ma = _load_module()
# A warm start just long enough to learn the answer format.
QUICK = ma.Settings(sft_steps=25, sft_batch_size=16, blur_steps=2)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-math")
    report = ma.make_assets(out, QUICK, measure=False)
    return out, report


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_dataset_rows_are_every_sum_with_its_label(assets):
    out, _ = assets
    train, test = read_jsonl(out / "train.jsonl"), read_jsonl(out / "test.jsonl")
    assert (len(train), len(test)) == (80, 20)
    pairs = []
    for row in train + test:
        assert set(row) == {"prompt", "label"}
        a, b = map(int, re.fullmatch(r"what is (\d) \+ (\d) \?", row["prompt"]).groups())
        assert row["label"] == str(a + b)
        pairs.append((a, b))
    assert sorted(pairs) == [(a, b) for a in range(10) for b in range(10)]  # disjoint splits, nothing missing
    assert ma.make_problems(QUICK) == (train, test)  # seeded
    assert ma.make_problems(ma.Settings(seed=1))[1] != test


def test_tokenizer_encodes_prompts_and_answers_exactly(assets):
    from transformers import AutoTokenizer

    out, _ = assets
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    for row in read_jsonl(out / "train.jsonl") + read_jsonl(out / "test.jsonl"):
        ids = tok.encode(ma.chat_prompt(tok, row["prompt"]), add_special_tokens=False)
        assert tok.unk_token_id not in ids, row
    answer = "\\boxed{12}"
    ids = tok.encode(answer + "<|im_end|>", add_special_tokens=False)
    assert tok.convert_ids_to_tokens(ids) == [
        "\\boxed{",
        "1",
        "2",
        "}",
        "<|im_end|>",
    ]  # digits are single tokens
    assert tok.decode(ids, skip_special_tokens=True) == answer  # what the engine sends to the grader
    assert tok.unk_token_id in tok.encode("what is 3 % 4 ?", add_special_tokens=False)  # the check can fail


def test_warm_started_model_loads_and_answers_in_the_boxed_format(assets):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out, _ = assets
    model_dir = out / "model"
    assert AutoConfig.from_pretrained(model_dir).model_type == "qwen3"
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    base, tuned = load_file(out / "base" / "model.safetensors"), load_file(model_dir / "model.safetensors")
    assert base.keys() == tuned.keys() and any(not torch.equal(base[k], tuned[k]) for k in base)

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = read_jsonl(out / "test.jsonl")[:4]
    for row in rows:
        ids = tok(ma.chat_prompt(tok, row["prompt"]), add_special_tokens=False, return_tensors="pt")
        with torch.inference_mode():
            new = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert "\\boxed{" in tok.decode(new[0, ids["input_ids"].shape[1] :]), row
    accuracy = ma.answer_accuracy(model_dir, rows, samples_per_prompt=2)
    assert set(accuracy) == {"sampled", "greedy", "greedy_canonical"}
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())


def test_a_second_run_reuses_every_part(assets):
    out, first = assets
    assert not any(part["skipped"] for part in first.values())
    stamp = (out / "model" / "model.safetensors").stat().st_mtime_ns
    again = ma.make_assets(out, QUICK, measure=False)
    assert all(part["skipped"] for part in again.values())
    assert (out / "model" / "model.safetensors").stat().st_mtime_ns == stamp


def test_settings_invalidate_only_the_parts_that_use_them():
    def digests(settings):
        return {name: ma._digest(settings.part(name)) for name in ("tokenizer", "dataset", "base", "model")}

    default = digests(ma.Settings())
    changed = {
        "blur_steps": {"model"},
        "hidden": {"base", "model"},
        "test_fraction": {"dataset", "model"},
        "seed": {"dataset", "base", "model"},
    }
    for field, parts in changed.items():
        value = getattr(ma.Settings(), field)
        other = digests(ma.Settings(**{field: value + (0.1 if isinstance(value, float) else 1)}))
        assert {name for name in default if default[name] != other[name]} == parts, field


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--hidden", "60", "--heads", "8"], "must be a multiple of --heads"),
        (["--blur-correct-fraction", "1.5"], "must be in [0, 1]"),
        (["--test-fraction", "0"], "must be in (0, 1)"),
    ],
)
def test_bad_settings_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        ma.parse_args(["--out", "x", *argv])
    assert message in capsys.readouterr().err


def test_campaign_reads_the_assets_the_script_makes():
    cfg = CampaignConfig.from_yaml(str(EXAMPLE / "campaign.yaml"))
    assets = Path("examples/tiny-math/assets")
    assert Path(cfg.model.hf_checkpoint) == assets / "model"
    assert Path(cfg.data.prompt_data) == assets / "train.jsonl"
    assert [Path(d.path) for d in cfg.eval.eval_datasets] == [assets / "test.jsonl"]
    assert cfg.reward.rm_type == "math" and cfg.rollout.partial_rollout and cfg.engine.num_engines == 2
    assert cfg.filter.dynamic_sampling_filter_path.endswith("check_reward_nonzero_std")
    assert (cfg.campaign, cfg.storage.store) == ("demo", "runs")
