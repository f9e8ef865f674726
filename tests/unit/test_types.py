import argparse
import json
import math

import pytest

from slime_wf.types import RewardKeyError, Sample


def full_sample() -> Sample:
    return Sample(
        group_index=3,
        index=13,
        prompt=[{"role": "user", "content": "What is 1/3 + é?"}],
        tokens=[1, 2, 3, 4, 5],
        response="0.333…",
        response_length=2,
        label=7,
        reward={"score": -1.0, "acc": False, "pred": "0.3"},
        loss_mask=[0, 1],
        rollout_log_probs=[-0.1234567890123456789, -1e-300],
        weight_versions=["0", "1"],
        status=Sample.Status.ABORTED,
        metadata={"start_rollout_id": 2, "nested": {"x": [1.5, None, True]}},
        remove_sample=True,
        custom_rm_path="pkg.mod.rm",
        generate_function_path="pkg.mod.gen",
        train_metadata={"loss": "sft"},
    )


def test_json_round_trip_is_lossless():
    sample = full_sample()
    text = sample.to_json()
    again = Sample.from_json(text)
    assert again == sample
    assert again.status is Sample.Status.ABORTED
    assert again.rollout_log_probs[0] == sample.rollout_log_probs[0]  # floats exactly
    assert json.loads(text)["status"] == "aborted"


def test_round_trip_keeps_non_finite_floats():
    sample = Sample(rollout_log_probs=[float("-inf"), -0.5], reward=float("nan"))
    again = Sample.from_json(sample.to_json())
    assert again.rollout_log_probs[0] == float("-inf") and math.isnan(again.reward)


def test_to_dict_is_detached():
    sample = full_sample()
    d = sample.to_dict()
    d["tokens"].append(99)
    d["metadata"]["nested"]["x"].append(0)
    assert sample.tokens == [1, 2, 3, 4, 5] and sample.metadata["nested"]["x"] == [1.5, None, True]


def test_from_dict_is_detached():
    d = full_sample().to_dict()
    sample = Sample.from_dict(d)
    sample.tokens.append(99)
    sample.metadata["nested"]["x"].append(0)
    assert d["tokens"] == [1, 2, 3, 4, 5] and d["metadata"]["nested"]["x"] == [1.5, None, True]


def test_from_dict_rejects_unknown_fields_and_statuses():
    with pytest.raises(ValueError, match="unknown field"):
        Sample.from_dict({"promt": "x"})
    with pytest.raises(ValueError, match="status 'done' is not one of"):
        Sample.from_dict({"status": "done"})


def test_non_json_metadata_error_names_the_sample():
    sample = Sample(group_index=1, index=4, metadata={"obj": object()})
    with pytest.raises(TypeError, match="group_index=1 index=4"):
        sample.to_json()


def test_get_reward_value_honours_reward_key():
    plain = argparse.Namespace(reward_key=None)
    keyed = argparse.Namespace(reward_key="score")
    assert Sample(reward=0.5).get_reward_value(plain) == 0.5
    assert Sample(reward={"score": 1.0, "acc": True}).get_reward_value(keyed) == 1.0
    with pytest.raises(RewardKeyError, match="set reward_key"):
        Sample(index=2, reward={"score": 1.0}).get_reward_value(plain)
    with pytest.raises(RewardKeyError, match="reward_key='score' not found"):
        Sample(index=2, reward={"acc": 1.0}).get_reward_value(keyed)


def test_status_values_match_slime():
    assert [s.value for s in Sample.Status] == ["pending", "completed", "truncated", "aborted", "failed"]


def test_update_from_meta_info():
    sample = Sample()
    sample.update_from_meta_info({"weight_version": 3, "finish_reason": {"type": "length", "length": 8}})
    assert sample.status is Sample.Status.TRUNCATED and sample.weight_versions == ["3"]
    sample.update_from_meta_info({"weight_version": "4", "finish_reason": {"type": "stop", "matched": 2}})
    assert sample.status is Sample.Status.COMPLETED and sample.weight_versions == ["3", "4"]
    sample.update_from_meta_info({"finish_reason": {"type": "abort", "message": "Aborted"}})
    assert sample.status is Sample.Status.ABORTED


def test_effective_response_length():
    assert Sample(response_length=4).effective_response_length == 4
    assert Sample(response_length=4, loss_mask=[0, 0, 1, 1]).effective_response_length == 2


def test_update_from_meta_info_records_every_version_of_a_mixed_request():
    sample = Sample(weight_versions=["2"])
    sample.update_from_meta_info(
        {
            "weight_version": "4",
            "weight_versions": [
                {"version": "3", "start": 0, "end": 5},
                {"version": "4", "start": 5, "end": 9},
            ],
            "finish_reason": {"type": "stop", "matched": 0},
        }
    )
    assert sample.weight_versions == ["2", "3", "4"]


def test_clone_is_a_deep_copy():
    """What a clone holds is its own: nested JSON values, sets and other objects, tuples of lists."""
    original = Sample(
        index=3,
        prompt=[{"role": "user", "content": "2+2?"}],
        label="4",
        tokens=[1, 2, 3],
        metadata={"nested": {"a": [1, {"b": 2}]}, "tags": {"x"}, "pair": ([1], 2)},
    )
    clone = original.clone()
    assert clone == original and clone is not original
    clone.prompt[0]["content"] = "changed"
    clone.tokens.append(4)
    clone.metadata["nested"]["a"][1]["b"] = 99
    clone.metadata["tags"].add("y")
    clone.metadata["pair"][0].append(5)
    clone.spec_info.spec_verify_ct += 1
    clone.prefix_cache_info.add({"cached_tokens": 2, "prompt_tokens": 3})
    assert original.prompt[0]["content"] == "2+2?" and original.tokens == [1, 2, 3]
    assert original.metadata == {"nested": {"a": [1, {"b": 2}]}, "tags": {"x"}, "pair": ([1], 2)}
    assert original.spec_info == Sample().spec_info
    assert original.prefix_cache_info == Sample().prefix_cache_info
    assert original.status is clone.status
