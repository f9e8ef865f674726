"""Dynamic-sampling filters: the built-in zero-std filters, loading, legacy bools, drop metrics."""

from __future__ import annotations

import argparse

import pytest
import torch

from slime_wf.plugins import PluginError
from slime_wf.rollout.filter_hub import (
    DropReasonCounter,
    DynamicFilterOutput,
    FilterError,
    call_dynamic_filter,
    check_reward_nonzero_std,
    check_reward_nonzero_std_with_fallback,
    load_dynamic_filter,
    should_drop_dynamic_filter_output,
)
from slime_wf.types import Sample

ARGS = argparse.Namespace(reward_key=None)
PATH = "slime_wf.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std"


def group(*rewards):
    return [Sample(index=i, reward=r) for i, r in enumerate(rewards)]


@pytest.mark.parametrize(
    ("rewards", "keep", "reason"),
    [
        ((1, 0, 1, 1), True, None),
        ((1, 1, 1, 1), False, "zero_std_1"),
        ((0.0, 0.0, 0.0), False, "zero_std_0.0"),
        ((-1.0, -1.0), False, "zero_std_-1.0"),
        ((0.33333, 0.33333), False, "zero_std_0.3"),
        ((1.0, 1.0 + 1e-9), False, "zero_std_1.0"),  # below the 1e-6 threshold
        ((1.0,), False, "zero_std_1.0"),  # one sample has no spread (torch.std gives NaN)
    ],
)
def test_zero_std_filter(rewards, keep, reason):
    out = check_reward_nonzero_std(ARGS, group(*rewards))
    assert (out.keep, out.reason, out.keep_when_insufficient) == (keep, reason, False)
    if len(rewards) > 1:  # the same verdict as slime's torch computation
        assert out.keep == bool(torch.tensor(rewards, dtype=torch.float64).std() > 1e-6)


def test_filter_reads_the_reward_key_and_fallback_variant():
    args = argparse.Namespace(reward_key="score")
    samples = [Sample(index=i, reward={"score": -1.0, "acc": False}) for i in range(4)]
    out = check_reward_nonzero_std_with_fallback(args, samples)
    assert out == DynamicFilterOutput(keep=False, reason="zero_std_-1.0", keep_when_insufficient=True)
    samples[0].reward = {"score": 1.0, "acc": True}
    assert check_reward_nonzero_std_with_fallback(args, samples).keep


def test_loaded_by_path_and_called_through_the_normalizer():
    fn = load_dynamic_filter(PATH)
    assert call_dynamic_filter(fn, ARGS, group(1, 1), path=PATH) == DynamicFilterOutput(False, "zero_std_1")
    assert load_dynamic_filter(None) is None
    assert call_dynamic_filter(None, ARGS, group(1, 1)) == DynamicFilterOutput(keep=True)
    with pytest.raises(PluginError, match="no attribute 'nope'"):
        load_dynamic_filter("slime_wf.rollout.filter_hub.dynamic_sampling_filters.nope")
    with pytest.raises(PluginError, match="wrong signature"):
        load_dynamic_filter("slime_wf.rollout.filter_hub.base_types.load_dynamic_filter")


def legacy_filter(args, samples, **kwargs):
    return samples[0].reward > 0


def torch_filter(args, samples, **kwargs):
    return DynamicFilterOutput(keep=torch.tensor(True))


def wrong_filter(args, samples, **kwargs):
    return "keep"


def test_legacy_bool_and_tensor_outputs_are_accepted():
    assert call_dynamic_filter(legacy_filter, ARGS, group(1)) == DynamicFilterOutput(keep=True)
    assert call_dynamic_filter(legacy_filter, ARGS, group(0)) == DynamicFilterOutput(keep=False)
    out = call_dynamic_filter(torch_filter, ARGS, group(1))
    assert out.keep is True


def test_wrong_return_type_names_the_filter():
    with pytest.raises(FilterError, match=r"'my\.filters\.wrong' returned str 'keep'.*DynamicFilterOutput"):
        call_dynamic_filter(wrong_filter, ARGS, group(1), path="my.filters.wrong")
    with pytest.raises(FilterError, match=r"test_filter_hub\.wrong_filter"):
        call_dynamic_filter(wrong_filter, ARGS, group(1))


def test_drop_reasons_become_metrics():
    counter = DropReasonCounter()
    for rewards in [(1, 1), (0, 0), (0, 0), (1, 0), (0.0, 0.0)]:
        counter.add(check_reward_nonzero_std(ARGS, group(*rewards)))
    counter.add(DynamicFilterOutput(keep=False))
    assert counter.metrics() == {
        "filter/drop_unspecified": 1,
        "filter/drop_zero_std_0": 2,
        "filter/drop_zero_std_0.0": 1,
        "filter/drop_zero_std_1": 1,
    }
    counter.reset()
    assert counter.metrics() == {}


def test_the_rollout_loops_own_drops_share_the_filters_counter():
    counter = DropReasonCounter()
    counter.add(check_reward_nonzero_std(ARGS, group(1, 1)))
    for reason in ("aborted", "surplus", "aborted"):
        counter.drop(reason)
    assert counter.counts() == {"aborted": 2, "zero_std_1": 1, "surplus": 1}  # most frequent first
    assert counter.metrics() == {
        "filter/drop_aborted": 2.0,
        "filter/drop_surplus": 1.0,
        "filter/drop_zero_std_1": 1.0,
    }


def test_keep_when_insufficient_keeps_a_rejected_group_only_when_the_batch_would_run_short():
    plain = check_reward_nonzero_std(ARGS, group(1, 1))
    fallback = check_reward_nonzero_std_with_fallback(ARGS, group(1, 1))
    kept = check_reward_nonzero_std(ARGS, group(1, 0))
    for remaining, target in [(10, 8), (8, 8), (5, 8)]:
        assert should_drop_dynamic_filter_output(
            plain, remaining_batch_size=remaining, target_data_size=target
        )
        assert not should_drop_dynamic_filter_output(
            kept, remaining_batch_size=remaining, target_data_size=target
        )
    assert should_drop_dynamic_filter_output(fallback, remaining_batch_size=9, target_data_size=8)
    assert not should_drop_dynamic_filter_output(fallback, remaining_batch_size=8, target_data_size=8)
    assert not should_drop_dynamic_filter_output(fallback, remaining_batch_size=3, target_data_size=8)
