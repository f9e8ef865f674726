"""The rollout data source: a dataset cursor plus the partial-rollout buffer.

`RolloutDataSourceWithBuffer(args)` keeps slime's interface (`get_samples`, `add_samples`,
`get_buffer_length`, buffer filters with the signature `(args, rollout_id, buffer, num_samples)`).
Unlike slime, its whole state, buffer included, is a JSON-serializable dict, so a campaign
that restarts continues with exactly the groups it would have drawn next, partially
generated samples and all.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from slime_wf.plugins import load_function
from slime_wf.rollout.dataset import Dataset, checkpoint_context_length, load_tokenizer
from slime_wf.types import Group, Sample

logger = logging.getLogger(__name__)

STATE_VERSION = 1

BufferFilter = Callable[[Any, int | None, list[Group], int], list[Group]]


def pop_first(args: Any, rollout_id: int | None, buffer: list[Group], num_samples: int) -> list[Group]:
    """The default buffer filter: the oldest groups first (FIFO), removed from the buffer."""
    take = min(len(buffer), num_samples)
    groups = buffer[:take]
    del buffer[:take]
    return groups


# What a regenerated sample keeps: what its prompt row gave it. Everything else (tokens, response,
# log-probs, masks, versions, status, reward) goes back to `Sample`'s defaults.
_PROMPT_FIELDS = (
    "group_index",
    "index",
    "prompt",
    "label",
    "metadata",
    "custom_rm_path",
    "generate_function_path",
    "multimodal_inputs",
    "apply_chat_template_kwargs",
)


def weight_version_number(version: str) -> int | None:
    """The rollout id whose training produced weight `version`: -1 for the campaign's initial weights
    ("init"), None for a version this campaign did not name (an engine attached with its own)."""
    if version == "init":
        return -1
    try:
        return int(version)
    except ValueError:
        return None


def weight_staleness(sample: Sample, rollout_id: int) -> int | None:
    """How many versions behind the policy that trains on rollout `rollout_id` (version `rollout_id - 1`)
    the oldest token of `sample` is; None when none of its versions is one this campaign named."""
    numbers = [n for n in map(weight_version_number, sample.weight_versions) if n is not None]
    return None if not numbers else rollout_id - 1 - min(numbers)


def staleness_metrics(samples: list[Sample], rollout_id: int) -> dict[str, float]:
    """`rollout/weight_staleness_mean` and `_max` over the samples of rollout `rollout_id`: 0 when the policy
    before this id's training generated every token (the synchronous loop), 1 under `train_async`, more
    for partial samples continued across several versions."""
    values = [x for x in (weight_staleness(s, rollout_id) for s in samples) if x is not None]
    if not values:
        return {}
    return {
        "rollout/weight_staleness_mean": sum(values) / len(values),
        "rollout/weight_staleness_max": float(max(values)),
    }


def regenerated(sample: Sample) -> Sample:
    """`sample` as its prompt row gave it, before any generation: for a partial sample too stale to go on."""
    data = sample.to_dict()
    return Sample.from_dict({k: data[k] for k in _PROMPT_FIELDS if k in data})


def engine_context_length(args: Any) -> int | None:
    """Prompt plus response tokens the rollout engines accept: SGLang's `--context-length` when
    the campaign launches SGLang with one, else the policy checkpoint's `max_position_embeddings`
    (None when `hf_checkpoint` is not a local folder: nothing to check against)."""
    if getattr(args, "engine_type", None) == "sglang" and not getattr(args, "engine_urls", None):
        server_args = getattr(args, "sglang_server_args", None) or {}
        for key in ("context_length", "context-length"):
            if server_args.get(key):
                return int(server_args[key])
    hf_checkpoint = getattr(args, "hf_checkpoint", None)
    return checkpoint_context_length(hf_checkpoint) if hf_checkpoint else None


def build_dataset(args: Any) -> Dataset | None:
    if not getattr(args, "prompt_data", None):
        return None
    context_length = engine_context_length(args)
    needs_tokenizer = (
        args.apply_chat_template or args.rollout_max_prompt_len is not None or context_length is not None
    )
    tokenizer = load_tokenizer(args.hf_checkpoint) if needs_tokenizer and args.hf_checkpoint else None
    return Dataset(
        args.prompt_data,
        tokenizer=tokenizer,
        max_length=args.rollout_max_prompt_len,
        prompt_key=args.input_key,
        label_key=args.label_key,
        metadata_key=args.metadata_key,
        apply_chat_template=args.apply_chat_template,
        apply_chat_template_kwargs=args.apply_chat_template_kwargs,
        seed=args.rollout_seed,
        skip_bad_rows=args.skip_bad_rows,
        context_length=context_length,
        max_response_len=args.rollout_max_response_len,
        s3_endpoint_url=getattr(args, "s3_endpoint_url", None),
        s3_region=getattr(args, "s3_region", None),
    )


class RolloutDataSourceWithBuffer:
    """Groups of `n_samples_per_prompt` samples: from the buffer first, then from the dataset."""

    def __init__(self, args: Any, dataset: Dataset | None = None):
        self.args = args
        self.dataset = dataset if dataset is not None else build_dataset(args)
        self.epoch_id = 0
        self.sample_offset = 0
        self.sample_group_index = 0
        self.sample_index = 0
        self.buffer: list[Group] = []
        # buffered partial groups restarted from their prompts (`rollout.max_weight_staleness`), since start
        self.stale_regenerated = 0
        if getattr(args, "buffer_filter_path", None):
            self.buffer_filter: BufferFilter = load_function(
                args.buffer_filter_path, num_positional=4, kind="buffer filter"
            )
        else:
            self.buffer_filter = pop_first
        if self.dataset is not None and args.rollout_shuffle:
            self.dataset.shuffle(self.epoch_id)

    # ---- drawing -------------------------------------------------------------------------

    def get_samples(self, num_samples: int, rollout_id: int | None = None) -> list[Group]:
        """`num_samples` groups: buffered groups first (through the buffer filter), then new prompts."""
        groups = self._regenerate_stale(self._from_buffer(num_samples, rollout_id), rollout_id)
        missing = num_samples - len(groups)
        if missing > 0:
            if self.dataset is None:
                raise RuntimeError(
                    f"the buffer holds {len(groups)} group(s) but {num_samples} were requested and there is no "
                    "dataset; set data.prompt_data"
                )
            groups += self._from_dataset(missing)
        return groups

    def _from_buffer(self, num_samples: int, rollout_id: int | None) -> list[Group]:
        if not self.buffer or num_samples <= 0:
            return []
        before = len(self.buffer)
        groups = self.buffer_filter(self.args, rollout_id, self.buffer, num_samples)
        if not isinstance(groups, list) or len(groups) > num_samples:
            raise RuntimeError(
                f"buffer filter {getattr(self.args, 'buffer_filter_path', None) or 'pop_first'} must return a list of "
                f"at most {num_samples} groups, got {type(groups).__name__} of length {len(groups) if isinstance(groups, list) else '?'}"
            )
        if before - len(self.buffer) != len(groups):
            raise RuntimeError(
                f"buffer filter {self.args.buffer_filter_path} returned {len(groups)} groups but removed "
                f"{before - len(self.buffer)} from the buffer; it must remove exactly what it returns"
            )
        return groups

    def _regenerate_stale(self, groups: list[Group], rollout_id: int | None) -> list[Group]:
        """Buffered groups whose oldest token is more than `max_weight_staleness` versions behind the policy
        that will train on them start again from their prompts (the same group, so nothing is lost)."""
        bound = getattr(self.args, "max_weight_staleness", None)
        if bound is None or rollout_id is None:
            return groups
        out = []
        for group in groups:
            staleness = [weight_staleness(s, rollout_id) for s in group]
            if any(x is not None and x > bound for x in staleness):
                self.stale_regenerated += 1
                logger.info(
                    "rollout %d: group %s is %d weight versions behind (max_weight_staleness=%d): regenerated",
                    rollout_id,
                    group[0].group_index,
                    max(x for x in staleness if x is not None),
                    bound,
                )
                group = [regenerated(s) for s in group]
            out.append(group)
        return out

    def _from_dataset(self, num_samples: int) -> list[Group]:
        dataset = self.dataset
        assert dataset is not None  # get_samples reads new prompts only when there is a dataset
        prompts: list[Sample] = []
        while len(prompts) < num_samples:
            if self.sample_offset >= len(dataset):
                self.epoch_id += 1
                self.sample_offset = 0
                if self.args.rollout_shuffle:
                    dataset.shuffle(self.epoch_id)
            take = min(num_samples - len(prompts), len(dataset) - self.sample_offset)
            prompts += dataset.samples[self.sample_offset : self.sample_offset + take]
            self.sample_offset += take

        groups = []
        for prompt in prompts:
            group = []
            for _ in range(self.args.n_samples_per_prompt):
                sample = prompt.clone()
                sample.group_index = self.sample_group_index
                sample.index = self.sample_index
                self.sample_index += 1
                group.append(sample)
            self.sample_group_index += 1
            groups.append(group)
        return groups

    # ---- the buffer ----------------------------------------------------------------------

    def add_samples(self, groups: list[Group]) -> None:
        """Put groups (e.g. partially generated ones) into the buffer."""
        if not groups:
            return
        if not isinstance(groups, list) or not all(isinstance(g, list) for g in groups):
            raise TypeError("add_samples takes a list of groups (lists of Sample)")
        for group in groups:
            if len(group) != self.args.n_samples_per_prompt:
                raise ValueError(
                    f"group {group[0].group_index if group else '?'} has {len(group)} samples; every buffered "
                    f"group must have n_samples_per_prompt={self.args.n_samples_per_prompt}"
                )
        self.buffer.extend(groups)

    def get_buffer_length(self) -> int:
        return len(self.buffer)

    def __len__(self) -> int:
        return 0 if self.dataset is None else len(self.dataset)

    # ---- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Cursor, epoch, counters and the buffer (with partial samples), as plain JSON types."""
        return {
            "version": STATE_VERSION,
            "epoch_id": self.epoch_id,
            "sample_offset": self.sample_offset,
            "sample_group_index": self.sample_group_index,
            "sample_index": self.sample_index,
            "dataset": None
            if self.dataset is None
            else {"path": self.dataset.path, "size": len(self.dataset)},
            "buffer": [[s.to_dict() for s in group] for group in self.buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data source state version {state.get('version')!r} is not {STATE_VERSION}")
        saved = state.get("dataset")
        if saved is not None and self.dataset is not None and saved["size"] != len(self.dataset):
            raise ValueError(
                f"the data source state was saved with {saved['size']} prompts from {saved['path']}, but "
                f"{self.dataset.path} now has {len(self.dataset)}; resuming would skip or repeat prompts. "
                "Restore the original dataset or start a new campaign"
            )
        self.epoch_id = int(state["epoch_id"])
        self.sample_offset = int(state["sample_offset"])
        self.sample_group_index = int(state["sample_group_index"])
        self.sample_index = int(state["sample_index"])
        self.buffer = [[Sample.from_dict(s) for s in group] for group in state["buffer"]]
        if self.dataset is not None and self.args.rollout_shuffle:
            self.dataset.shuffle(self.epoch_id)
