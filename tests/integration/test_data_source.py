import json

import pytest

from slime_wf.config import CampaignConfig
from slime_wf.plugins import PluginError
from slime_wf.rollout.data_source import RolloutDataSourceWithBuffer, engine_context_length, pop_first
from slime_wf.rollout.dataset import DataError
from slime_wf.store import RunStore
from slime_wf.types import Sample


@pytest.fixture
def dataset_path(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "label": i}) + "\n" for i in range(7)))
    return str(path)


def make_args(dataset_path, *overrides):
    return CampaignConfig.from_dict(
        {"data": {"prompt_data": dataset_path}, "rollout": {"n_samples_per_prompt": 3}}, list(overrides)
    ).args()


def labels(groups):
    return [g[0].label for g in groups]


def test_groups_have_n_copies_and_monotonic_indices_across_epochs(dataset_path):
    ds = RolloutDataSourceWithBuffer(make_args(dataset_path))
    assert len(ds) == 7
    first = ds.get_samples(5)
    second = ds.get_samples(5)  # crosses into epoch 1
    assert labels(first) == [0, 1, 2, 3, 4] and labels(second) == [5, 6, 0, 1, 2]
    assert ds.epoch_id == 1 and ds.sample_offset == 3
    groups = first + second
    assert [g[0].group_index for g in groups] == list(range(10))
    assert [s.index for g in groups for s in g] == list(range(30))
    for g in groups:
        assert len(g) == 3 and len({id(s) for s in g}) == 3  # independent copies
        assert all(s.prompt == g[0].prompt and s.group_index == g[0].group_index for s in g)
    groups[0][0].metadata["x"] = 1
    assert groups[0][1].metadata == {} and ds.dataset[0].metadata == {}


def test_request_larger_than_dataset_spans_epochs(dataset_path):
    ds = RolloutDataSourceWithBuffer(make_args(dataset_path))
    assert labels(ds.get_samples(16)) == [0, 1, 2, 3, 4, 5, 6] * 2 + [0, 1]
    assert ds.epoch_id == 2


def test_shuffle_per_epoch_is_seeded(dataset_path):
    a = RolloutDataSourceWithBuffer(make_args(dataset_path, "rollout_shuffle=true", "rollout_seed=3"))
    b = RolloutDataSourceWithBuffer(make_args(dataset_path, "rollout_shuffle=true", "rollout_seed=3"))
    epoch0, epoch1 = labels(a.get_samples(7)), labels(a.get_samples(7))
    assert sorted(epoch0) == sorted(epoch1) == list(range(7)) and epoch0 != epoch1
    assert labels(b.get_samples(14)) == epoch0 + epoch1


def test_buffer_first_then_dataset(dataset_path):
    ds = RolloutDataSourceWithBuffer(make_args(dataset_path))
    drawn = ds.get_samples(3)
    ds.add_samples([drawn[2], drawn[0]])
    assert ds.get_buffer_length() == 2
    got = ds.get_samples(3)
    assert [g[0].group_index for g in got] == [2, 0, 3]  # FIFO from the buffer, then a new prompt
    assert ds.get_buffer_length() == 0


def test_add_samples_checks_group_size(dataset_path):
    ds = RolloutDataSourceWithBuffer(make_args(dataset_path))
    group = ds.get_samples(1)[0]
    with pytest.raises(
        ValueError, match="has 2 samples; every buffered group must have n_samples_per_prompt=3"
    ):
        ds.add_samples([group[:2]])
    with pytest.raises(TypeError):
        ds.add_samples(group)


def test_pop_first_removes_what_it_returns():
    buffer = [[Sample(group_index=i)] for i in range(5)]
    out = pop_first(None, 0, buffer, 3)
    assert [g[0].group_index for g in out] == [0, 1, 2] and [g[0].group_index for g in buffer] == [3, 4]
    assert pop_first(None, 0, buffer, 10) and buffer == []


def newest_first(args, rollout_id, buffer, num_samples):
    buffer.sort(key=lambda g: g[0].group_index)
    out = buffer[-num_samples:][::-1]
    del buffer[-num_samples:]
    return out


def keeps_everything(args, rollout_id, buffer, num_samples):
    return buffer[:num_samples]


def test_buffer_filter_path(dataset_path):
    ds = RolloutDataSourceWithBuffer(make_args(dataset_path, f"buffer_filter_path={__name__}.newest_first"))
    ds.add_samples(ds.get_samples(4))
    assert [g[0].group_index for g in ds.get_samples(2)] == [3, 2]


def test_buffer_filter_that_does_not_remove_is_rejected(dataset_path):
    ds = RolloutDataSourceWithBuffer(
        make_args(dataset_path, f"buffer_filter_path={__name__}.keeps_everything")
    )
    ds.add_samples(ds.get_samples(2))
    with pytest.raises(RuntimeError, match="must remove exactly what it returns"):
        ds.get_samples(2)


def test_bad_buffer_filter_path(dataset_path):
    with pytest.raises(PluginError, match="buffer filter 'json.dumps' has the wrong signature"):
        RolloutDataSourceWithBuffer(make_args(dataset_path, "buffer_filter_path=json.dumps"))
    with pytest.raises(PluginError, match="module 'nope' not found"):
        RolloutDataSourceWithBuffer(make_args(dataset_path, "buffer_filter_path=nope.filter"))


def test_without_dataset_only_the_buffer_serves():
    args = CampaignConfig.from_dict({"rollout": {"n_samples_per_prompt": 1}}).args()
    ds = RolloutDataSourceWithBuffer(args)
    ds.add_samples([[Sample(group_index=0)]])
    assert len(ds.get_samples(1)) == 1
    with pytest.raises(RuntimeError, match="set data.prompt_data"):
        ds.get_samples(1)


def partially_generate(group, n_tokens):
    for s in group:
        s.tokens = [1, 2] + list(range(10, 10 + n_tokens))
        s.response = "x" * n_tokens
        s.response_length = n_tokens
        s.loss_mask = [1] * n_tokens
        s.rollout_log_probs = [-0.5 - 1e-9 * i for i in range(n_tokens)]
        s.weight_versions = ["4"]
        s.status = Sample.Status.ABORTED
        s.metadata["start_rollout_id"] = 4


@pytest.mark.parametrize("shuffle", [False, True])
def test_restored_state_continues_exactly(dataset_path, store_root, shuffle):
    """A data source restored from its (stored) state returns exactly what the original would have returned next."""
    args = make_args(dataset_path, f"rollout_shuffle={str(shuffle).lower()}")
    original = RolloutDataSourceWithBuffer(args)
    original.get_samples(6)
    unfinished = original.get_samples(3)
    partially_generate(unfinished[0], 3)
    partially_generate(unfinished[2], 5)
    original.add_samples(unfinished)

    store = RunStore(store_root)
    store.write_json("rollouts/000004/data_source.json", original.state_dict())
    restored = RolloutDataSourceWithBuffer(args)
    restored.load_state_dict(store.read_json("rollouts/000004/data_source.json"))
    assert restored.get_buffer_length() == 3

    for n in (2, 4, 9):
        want, got = original.get_samples(n, rollout_id=5), restored.get_samples(n, rollout_id=5)
        assert [[s.to_dict() for s in g] for g in got] == [[s.to_dict() for s in g] for g in want]
    assert restored.state_dict() == original.state_dict()


def test_state_is_plain_json(dataset_path):
    ds = RolloutDataSourceWithBuffer(make_args(dataset_path))
    ds.add_samples(ds.get_samples(2))
    state = ds.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["dataset"]["size"] == 7 and len(state["buffer"]) == 2 and state["sample_index"] == 6


def test_state_from_a_different_dataset_is_refused(dataset_path, tmp_path):
    state = RolloutDataSourceWithBuffer(make_args(dataset_path)).state_dict()
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"prompt": "p", "label": 0}) + "\n")
    with pytest.raises(ValueError, match="saved with 7 prompts .* now has 1"):
        RolloutDataSourceWithBuffer(make_args(str(other))).load_state_dict(state)


@pytest.fixture
def checkpoint_with_context_32(tmp_path):
    """A checkpoint folder with a tokenizer and a config of max_position_embeddings=32 (no weights needed)."""
    from helpers.tiny_models import make_tiny_tokenizer, tiny_config

    out = make_tiny_tokenizer(tmp_path / "ckpt")
    tiny_config(
        "qwen3", vocab_size=128, layers=1, hidden=32, max_positions=32, eos_token_id=3
    ).save_pretrained(out)
    return str(out)


def test_context_length_comes_from_the_checkpoint_or_sglang_flag(dataset_path, checkpoint_with_context_32):
    base = [f"hf_checkpoint={checkpoint_with_context_32}"]
    assert engine_context_length(make_args(dataset_path, *base)) == 32
    sglang = [*base, "engine_type=sglang", 'sglang_server_args={"context-length": 24}']
    assert engine_context_length(make_args(dataset_path, *sglang)) == 24
    external = [
        *sglang,
        'engine_urls=["http://127.0.0.1:1"]',
    ]  # an external server's flags are not ours to read
    assert engine_context_length(make_args(dataset_path, *external)) == 32
    assert engine_context_length(make_args(dataset_path)) is None


def test_prompts_over_the_engine_context_are_rejected_at_load(tmp_path, checkpoint_with_context_32):
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(tmp_path / name)

    rows = [
        {"prompt": "what is 1 plus 2", "label": 0},
        {"prompt": "one two " * 10, "label": 1},
        {"prompt": "", "label": 2},
        {"prompt": "yes", "label": 3},
    ]
    args = [f"hf_checkpoint={checkpoint_with_context_32}", "rollout_max_response_len=16"]
    with pytest.raises(
        DataError,
        match=r"long.jsonl:2: the prompt has 20 tokens; .* 36, over the engine's "
        r"context length of 32 tokens",
    ):
        RolloutDataSourceWithBuffer(make_args(write("long.jsonl", [rows[0], rows[1], rows[3]]), *args))
    path = write("prompts.jsonl", rows)
    ds = RolloutDataSourceWithBuffer(make_args(str(path), *args, "skip_bad_rows=true"))
    assert labels(ds.get_samples(2)) == [0, 3]
    assert ds.dataset.stats.skipped_over_context == 1 and ds.dataset.stats.skipped_empty_prompts == 1
    # a shorter response leaves room for the long prompt
    assert (
        len(
            RolloutDataSourceWithBuffer(
                make_args(str(path), *args, "rollout_max_response_len=12", "skip_bad_rows=true")
            )
        )
        == 3
    )
