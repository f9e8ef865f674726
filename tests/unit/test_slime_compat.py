"""slime's plugin-facing surface under slime-wf: the `slime` import alias, slime's whole `Sample`,
filter results read by shape, and the helpers plugins import (misc, mask_utils)."""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from slime_wf.plugins import install_slime_alias, load_function
from slime_wf.rollout.filter_hub import DynamicFilterOutput, FilterError, call_dynamic_filter
from slime_wf.types import Sample

ROOT = Path(__file__).resolve().parents[2]

# slime's Sample (slime/utils/types.py): every field a plugin may read or set
SLIME_SAMPLE_FIELDS = {
    "group_index", "index", "rollout_id", "prompt", "tokens", "multimodal_inputs", "multimodal_train_inputs",
    "multimodal_train_input_id", "apply_chat_template_kwargs", "response", "response_length", "label", "reward",
    "loss_mask", "weight_versions", "rollout_log_probs", "rollout_top_p_token_ids", "rollout_top_p_token_offsets",
    "rollout_routed_experts", "remove_sample", "teacher_log_probs", "status", "metadata", "generate_function_path",
    "custom_rm_path", "train_metadata", "session_id", "non_generation_time", "spec_info", "prefix_cache_info",
}  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _alias():
    assert install_slime_alias()


def test_slime_modules_are_slime_wf_modules_under_a_second_name():
    import slime.rollout.filter_hub.base_types as slime_filters
    import slime.utils.types as slime_types

    import slime_wf.compat.utils.types

    assert slime_types is slime_wf.compat.utils.types
    assert sys.modules["slime.utils.types"] is sys.modules["slime_wf.compat.utils.types"]
    assert slime_types.Sample is Sample  # isinstance(sample, slime's Sample) holds for the project's samples
    assert isinstance(Sample(), slime_types.Sample)
    assert slime_filters.DynamicFilterOutput is DynamicFilterOutput


def test_the_plugin_facing_surface_imports():
    from slime.rollout.data_source import pop_first  # noqa: F401
    from slime.rollout.filter_hub.dynamic_sampling_filters import check_reward_nonzero_std  # noqa: F401
    from slime.rollout.rm_hub import async_rm, batched_async_rm, grade_answer_verl  # noqa: F401
    from slime.rollout.rm_hub.math_dapo_utils import compute_score  # noqa: F401
    from slime.rollout.rm_hub.math_utils import extract_answer  # noqa: F401
    from slime.rollout.sglang_rollout import (  # noqa: F401
        GenerateState,
        abort,
        eval_rollout,
        generate,
        generate_and_rm,
        generate_and_rm_group,
    )
    from slime.utils.http_utils import get, post  # noqa: F401
    from slime.utils.mask_utils import MultiTurnLossMaskGenerator  # noqa: F401
    from slime.utils.misc import SingletonMeta  # noqa: F401
    from slime.utils.processing_utils import load_tokenizer  # noqa: F401

    assert grade_answer_verl("so \\boxed{7}", "7")
    with pytest.raises(ModuleNotFoundError, match="slime.ray"):
        importlib.import_module("slime.ray")


def test_config_paths_starting_with_slime_load():
    fn = load_function("slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std")
    from slime_wf.rollout.filter_hub import check_reward_nonzero_std

    assert fn is check_reward_nonzero_std
    from slime.utils.misc import load_function as slime_load_function

    assert (
        slime_load_function("slime.rollout.data_source.pop_first").__module__
        == "slime_wf.rollout.data_source"
    )


def test_an_installed_slime_is_never_shadowed(tmp_path):
    (tmp_path / "slime" / "utils").mkdir(parents=True)
    (tmp_path / "slime" / "__init__.py").write_text("REAL = True\n")
    (tmp_path / "slime" / "utils" / "__init__.py").write_text("")
    code = textwrap.dedent(
        """
        from slime_wf.plugins import install_slime_alias
        import slime
        print(install_slime_alias(), slime.REAL)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": ""},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["False", "True"]


def test_sample_has_every_slime_field_and_method():
    names = {f.name for f in dataclasses.fields(Sample)}
    assert SLIME_SAMPLE_FIELDS <= names
    for method in ("append_response_tokens", "get_reward_value", "to_dict", "from_dict", "clone"):
        assert callable(getattr(Sample, method))
    assert Sample.SpecInfo().spec_accept_rate == 0.0 and Sample.PrefixCacheInfo().prefix_cache_hit_rate == 0.0


def test_every_field_survives_json():
    s = Sample(
        group_index=3, index=7, rollout_id=7, prompt=[{"role": "user", "content": "hi"}], tokens=[1, 2, 3, 4],
        multimodal_inputs={"images": None}, multimodal_train_inputs={"pixel_values": [[0.5]]},
        multimodal_train_input_id="m1", multimodal_generation_inputs={"x": 1},
        apply_chat_template_kwargs={"enable_thinking": False}, response="ab", response_length=2, label="7",
        reward={"score": 1.0}, loss_mask=[1, 0], weight_versions=["2"], rollout_log_probs=[-0.5, 0.0],
        rollout_top_p_token_ids=[4, 9, 4], rollout_top_p_token_offsets=[0, 2, 3],
        rollout_routed_experts=[[[1, 2]], [[0, 3]], [[2, 2]]], remove_sample=True, teacher_log_probs=[-0.1, -0.2],
        status=Sample.Status.TRUNCATED, metadata={"turns": 2}, generate_function_path="m.gen", custom_rm_path="m.rm",
        train_metadata={"loss": "sft"}, session_id="abc", non_generation_time=1.5,
        spec_info=Sample.SpecInfo(1, 2, 3, 4), prefix_cache_info=Sample.PrefixCacheInfo(5, 6),
    )  # fmt: skip
    back = Sample.from_json(json.dumps(json.loads(s.to_json())))
    assert back == s
    assert Sample.from_dict({"prompt": "old record without the new fields"}).spec_info == Sample.SpecInfo()


def test_tensors_a_plugin_assigns_are_stored_as_lists():
    s = Sample(tokens=[1], rollout_top_p_token_ids=torch.tensor([3, 4], dtype=torch.int32))
    s.multimodal_train_inputs = {"pixel_values": torch.ones(1, 2)}
    d = json.loads(s.to_json())
    assert d["rollout_top_p_token_ids"] == [3, 4]
    assert d["multimodal_train_inputs"] == {"pixel_values": [[1.0, 1.0]]}


def _b64(values):
    return base64.b64encode(np.asarray(values, dtype="<i4").tobytes()).decode()


def test_append_response_tokens_keeps_tool_tokens_out_of_the_loss():
    s = Sample(index=0, tokens=[10, 11])
    meta = {
        "finish_reason": {"type": "stop"},
        "weight_version": "4",
        "prompt_tokens": 2,
        "cached_tokens": 1,
        "top_p_token_ids": _b64([5, 6, 7]),
        "top_p_token_offsets": _b64([0, 2, 3]),
    }
    s.append_response_tokens(None, tokens=[5, 7], log_probs=[-0.1, -0.2], meta_info=meta, text="ab")
    s.append_response_tokens(None, tokens=torch.tensor([20, 21, 22]), trainable=False, text="obs")
    meta2 = {"finish_reason": {"type": "length", "length": 1}, "weight_version": "4"}
    meta2 |= {"top_p_token_ids": [8], "top_p_token_offsets": [0, 1]}
    s.append_response_tokens(None, tokens=[8], log_probs=[-0.3], meta_info=meta2, text="c")
    assert s.tokens == [10, 11, 5, 7, 20, 21, 22, 8]
    assert (s.response, s.response_length) == ("abobsc", 6)
    assert s.loss_mask == [1, 1, 0, 0, 0, 1]
    assert s.rollout_log_probs == pytest.approx([-0.1, -0.2, 0.0, 0.0, 0.0, -0.3])
    # the tool's tokens kept no top-p ids: empty spans
    assert s.rollout_top_p_token_ids == [5, 6, 7, 8]
    assert s.rollout_top_p_token_offsets == [0, 2, 3, 3, 3, 3, 4]
    assert s.status == Sample.Status.TRUNCATED and s.weight_versions == ["4", "4"]
    assert s.prefix_cache_info.to_dict() == {"cached_tokens": 1, "total_prompt_tokens": 2}
    assert s.effective_response_length == 3


def test_append_response_tokens_refuses_misaligned_input():
    s = Sample(tokens=[1])
    with pytest.raises(ValueError, match="need the engine's log-probs"):
        s.append_response_tokens(tokens=[2])
    with pytest.raises(ValueError, match="take no log_probs"):
        s.append_response_tokens(tokens=[2], log_probs=[0.0], trainable=False)
    with pytest.raises(ValueError, match="log_probs has 2 entries but tokens has 1"):
        s.append_response_tokens(tokens=[2], log_probs=[0.0, 0.1])
    with pytest.raises(ValueError, match="top-p token offsets have 2 entries for 2 generated tokens"):
        s.append_response_tokens(
            tokens=[2, 3],
            log_probs=[0.0, 0.1],
            meta_info={"top_p_token_ids": [2], "top_p_token_offsets": [0, 1]},
        )


def test_routed_experts_are_decoded_and_continued():
    args = type("Args", (), {"num_layers": 1, "moe_router_topk": 2})()
    s = Sample(tokens=[1, 2])
    s.append_response_tokens(
        args, tokens=[3], log_probs=[0.0], meta_info={"routed_experts": _b64([0, 1, 2, 3])}
    )
    assert s.rollout_routed_experts == [[[0, 1]], [[2, 3]]]
    meta = {"routed_experts": [4, 5], "routed_experts_start_len": 2}
    s.append_response_tokens(args, tokens=[4], log_probs=[0.0], meta_info=meta)
    assert s.rollout_routed_experts == [[[0, 1]], [[2, 3]], [[4, 5]]]


@dataclasses.dataclass
class SlimeDynamicFilterOutput:  # slime's own class, as slime's filter_hub defines it
    keep: bool
    reason: str | None = None
    keep_when_insufficient: bool = False


@pytest.mark.parametrize(
    ("result", "expected"),
    [
        (SlimeDynamicFilterOutput(keep=torch.tensor(True)), DynamicFilterOutput(True)),
        (SlimeDynamicFilterOutput(torch.tensor(0.0) > 1e-6, "zero_std_0.0", True), DynamicFilterOutput(False, "zero_std_0.0", True)),
        ({"keep": np.bool_(False), "reason": "r"}, DynamicFilterOutput(False, "r")),
        (np.bool_(True), DynamicFilterOutput(True)),
        (False, DynamicFilterOutput(False)),
        (DynamicFilterOutput(keep=torch.tensor(False), reason="x"), DynamicFilterOutput(False, "x")),
    ],
)  # fmt: skip
def test_a_filter_result_is_read_by_shape(result, expected):
    assert call_dynamic_filter(lambda args, samples: result, None, []) == expected


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (SlimeDynamicFilterOutput(keep=torch.tensor([True, False])), "keep must be a bool or a 0-d"),
        ({"reason": "no keep"}, "something with `keep`"),
        (SlimeDynamicFilterOutput(keep=True, reason=3), "reason=3"),
        ("keep", "returned str"),
    ],
)
def test_a_filter_result_of_another_shape_names_the_filter(result, message):
    with pytest.raises(FilterError, match=message):
        call_dynamic_filter(lambda args, samples: result, None, [], path="my.filters.f")


def test_singleton_meta_and_generate_state_outside_a_rollout():
    from slime.rollout.sglang_rollout import GenerateState
    from slime.utils.misc import SingletonMeta

    class One(metaclass=SingletonMeta):
        pass

    assert One() is One()
    with pytest.raises(RuntimeError, match="only inside a slime-wf rollout"):
        GenerateState(None)


@pytest.fixture(scope="module")
def chat_tokenizer(tmp_path_factory):
    spec = importlib.util.spec_from_file_location(
        "tiny_math_make_assets", ROOT / "examples/tiny-math/make_assets.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(module.build_tokenizer(tmp_path_factory.mktemp("tok")))


def test_multi_turn_loss_mask_trains_on_the_assistant_only(chat_tokenizer):
    from slime.utils.mask_utils import MultiTurnLossMaskGenerator, get_response_lengths

    messages = [
        {"role": "user", "content": "what is 3 + 4 ?"},
        {"role": "assistant", "content": "\\boxed{8}"},
        {"role": "user", "content": "3 + 4 = 7"},
        {"role": "assistant", "content": "\\boxed{7}"},
        {"role": "user", "content": "what is 1 + 1 ?"},
        {"role": "assistant", "content": "\\boxed{2}", "step_loss_mask": 0},
    ]
    gen = MultiTurnLossMaskGenerator(chat_tokenizer, tokenizer_type="qwen3")
    ids, mask = gen.get_loss_mask(messages)
    assert ids == list(chat_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    assert gen.get_text_from_loss_mask(ids, mask) == ["\\boxed{8}<|im_end|>\n", "\\boxed{7}<|im_end|>\n"]
    assert get_response_lengths([mask]) == [len(mask) - mask.index(1)]


def test_run_outside_a_rollout_uses_a_new_loop():
    from slime.utils.async_utils import run

    async def seven():
        return 7

    assert run(seven()) == 7
