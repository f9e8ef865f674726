"""The local engine: a continuous-batching scheduler over a transformers causal LM on CPU.

One background thread owns the model. Each iteration it applies control actions (weight swaps,
pauses), drops aborted requests, prefills the newly admitted requests (one forward pass per prompt
length, each distinct prompt computed once, so no padded query rows), adds them to the running
batch, and runs one batched decode step. A forward pass runs on as many of torch's threads as its
arithmetic is worth (`model.ThreadBudget`: a small decode on one). Requests finish between steps
and leave the batch; callers wait on a `concurrent.futures.Future` that resolves to the
SGLang-shaped `/generate` response.

Faults stay with the request that caused them: a request whose prefill raises is answered with
an error and the others are prefilled; when a batched decode step raises, the KV cache is put
back as it was before the step and each row is decoded on its own, so only the row that fails
again gets an error. Every admitted request is answered, and its rid released, whatever happens.
The error answer is an abort with `status_code` 500, which the server turns into HTTP 500 as
SGLang does.

The waiting queue is bounded by `max_queued_requests` (SGLang's `--max-queued-requests`; None, as in
SGLang, means no bound): `submit` raises `QueueFull` when it would be exceeded.

Weight versions: a weight update is applied between two decode steps. Requests in flight keep
their KV cache (computed with the old weights) and continue on the new weights. Like SGLang, a
response reports `meta_info.weight_versions` (the spans of output tokens each version produced)
and `meta_info.weight_version`, the version of the last span: the version current when the
request finished, unless it was aborted before producing a token on the new weights (then the
version that produced its last token).

Size: one module over 400 lines because it is one scheduler loop read top to bottom (admission,
shared prefill, batched decode, fault isolation per request, weight swaps between steps), whose
steps share the batch and its KV cache; the model side (loading, the cache) is in `model.py` and
sampling in `sampling.py`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
import re
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slime_wf.engine_server.model import (
    BatchKV,
    ThreadBudget,
    check_state_dict,
    copy_weights_,
    load_model,
    new_cache,
    read_state_dict,
)
from slime_wf.engine_server.penalties import LogitAdjuster
from slime_wf.engine_server.response import error_response, generate_response, waiting_abort_response
from slime_wf.engine_server.sampling import InvalidRequest, Request, Uniforms, sample

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

HEALTH_CHECK_RID_PREFIX = "HEALTH_CHECK"


class QueueFull(RuntimeError):
    """The waiting queue holds `max_queued_requests` requests already (SGLang answers HTTP 503)."""


@dataclasses.dataclass(eq=False)  # identity: list.remove must not compare tensors field by field
class _Active:
    req: Request
    uniforms: Uniforms | None  # its own draws (sampling_seed), else the engine's stream
    adjuster: LogitAdjuster | None = None  # penalties, min_new_tokens, logit_bias
    output_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[float, int]] | None] = dataclasses.field(default_factory=list)
    version_events: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    abort_message: str | None = None
    stop_tail: int = 0  # tokens to decode when looking for stop strings


class LocalEngine:
    def __init__(
        self,
        model_path: str,
        tokenizer_path: str | None = None,
        dtype: torch.dtype = torch.float32,
        max_running_requests: int = 64,
        weight_version: str = "default",
        max_queued_requests: int | None = None,
        min_gflop_per_thread: float = 0.5,
    ):
        self.model_path = str(model_path)
        self.min_gflop_per_thread = min_gflop_per_thread
        self.tokenizer_path = str(tokenizer_path or model_path)
        self.dtype = dtype
        self.max_running_requests = max_running_requests
        self.max_queued_requests = max_queued_requests
        self.weight_version = weight_version
        self.model: PreTrainedModel | None = None  # both set by _load, on the scheduler thread
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.last_step_time = 0.0
        self._cond = threading.Condition()
        self._waiting: collections.deque[Request] = collections.deque()
        self._batch: list[_Active] = []  # row order of self._kv
        self._admitting: list[_Active] = []
        self._actions: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._active_rids: dict[str, Request] = {}
        self._paused = False
        self._stopping = False
        self._default_uniforms = Uniforms(
            torch.Generator().manual_seed(int.from_bytes(uuid.uuid4().bytes[:8], "little"))
        )
        self._thread = threading.Thread(target=self._run, name="local-engine", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Load the model and start the scheduler thread (returns at once; `ready` is set when serving)."""
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _load(self) -> None:
        from transformers import AutoTokenizer, GenerationConfig

        logger.info("loading %s (%s)", self.model_path, self.dtype)
        self.tokenizer = tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        self.model = model = load_model(self.model_path, self.dtype)
        config = model.config.get_text_config()
        self.vocab_size = int(config.vocab_size)
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 1 << 20)
        self.num_layers = int(config.num_hidden_layers)
        eos: set[int] = set()
        for source in [config.eos_token_id, tokenizer.eos_token_id]:
            eos.update([source] if isinstance(source, int) else (source or []))
        try:
            gen_eos = GenerationConfig.from_pretrained(self.model_path).eos_token_id
            eos.update([gen_eos] if isinstance(gen_eos, int) else (gen_eos or []))
        except OSError:
            pass  # no generation_config.json
        self.eos_token_ids = eos
        self._kv = BatchKV(self.num_layers)
        # read on this thread, which runs every forward pass: torch's thread count is the server's --num-threads
        self._budget = ThreadBudget(model, torch.get_num_threads(), self.min_gflop_per_thread)
        self._threads_now = self._budget.max_threads
        logger.info(
            "model ready: vocab %d, context %d, eos %s", self.vocab_size, self.context_length, sorted(eos)
        )

    # ---- requests (any thread) -------------------------------------------------------------

    def submit(self, req: Request) -> concurrent.futures.Future:
        with self._cond:
            if req.rid in self._active_rids:
                raise InvalidRequest(f"Duplicate request ID detected: {req.rid}")
            if self._queue_full():
                raise QueueFull("The request queue is full.")
            if self._stopping:  # the scheduler is gone or going: nothing would ever answer it
                req.future.set_result(waiting_abort_response(req, self.weight_version))
                return req.future
            self._active_rids[req.rid] = req
            self._waiting.append(req)
            self._cond.notify_all()
        return req.future

    def _queue_full(self) -> bool:
        """Whether one more request would wait beyond the bound. Requests that the scheduler will admit
        into free running slots at its next step are not waiting, so they do not count."""
        if self.max_queued_requests is None:
            return False
        free = (
            0 if self._paused else max(0, self.max_running_requests - len(self._batch) - len(self._admitting))
        )
        return len(self._waiting) + 1 > self.max_queued_requests + free

    def abort(self, rid: str = "", abort_all: bool = False, only: Request | None = None) -> int:
        """Abort requests whose rid starts with `rid` (SGLang's rule), all, or `only` that one request.

        Queued ones finish at once; running ones finish at the next step boundary with their partial
        output. An empty `rid` without `abort_all` aborts nothing (it would prefix-match every
        request; SGLang ignores it with a warning). Returns how many were hit.
        """
        if only is None and not abort_all and not rid:
            logger.warning("Ignore abort_request with empty rid and abort_all=False")
            return 0

        def hit(req: Request) -> bool:
            return req is only if only is not None else abort_all or req.rid.startswith(rid)

        count = 0
        with self._cond:
            for req in [r for r in self._waiting if hit(r)]:
                self._waiting.remove(req)
                self._release_rid(req)
                req.future.set_result(waiting_abort_response(req, self.weight_version))
                count += 1
            for active in self._batch + self._admitting:
                if hit(active.req):
                    active.abort_message = active.abort_message or "Aborted"
                    count += 1
            self._cond.notify_all()
        return count

    def _release_rid(self, req: Request) -> None:
        if self._active_rids.get(req.rid) is req:
            del self._active_rids[req.rid]

    def pause(self, mode: str = "abort", timeout: float = 60.0) -> None:
        """Stop scheduling: running requests keep their state (mode abort: all requests are aborted first)."""
        if mode not in ("abort", "retract", "in_place"):
            raise InvalidRequest(
                f"pause_generation mode {mode!r} is not one of 'abort', 'retract', 'in_place'"
            )
        with self._cond:
            self._paused = True
        if mode == "abort":
            self.abort(abort_all=True)
        self.run_in_loop(lambda: None, timeout)  # returns once no step is in progress

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def num_requests(self) -> tuple[int, int]:
        """(running, waiting)."""
        with self._cond:
            return len(self._batch) + len(self._admitting), len(self._waiting)

    def token_load(self) -> tuple[list[int], list[int]]:
        """Tokens each running request holds (prompt + output) and each waiting prompt's length."""
        with self._cond:
            running = [len(a.req.input_ids) + len(a.output_ids) for a in self._batch + self._admitting]
            return running, [len(r.input_ids) for r in self._waiting]

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing runs (and, unless paused, nothing waits), as SGLang's flush_cache requires."""
        deadline = time.monotonic() + timeout
        while True:
            running, waiting = self.num_requests()
            if running == 0 and (waiting == 0 or self._paused):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)

    def run_in_loop(self, fn: Callable[[], Any], timeout: float = 600.0) -> Any:
        """Run `fn` on the scheduler thread between two steps and return its result."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine's scheduler thread is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self._actions.append((fn, fut))
            self._cond.notify_all()
        return fut.result(timeout)

    def update_weights_from_disk(
        self, model_path: str, weight_version: str | None = None, abort_all_requests: bool = False
    ) -> tuple[bool, str, int]:
        """Load a checkpoint of the same architecture and swap it in between decode steps.

        Reading and checking happen on the calling thread while generation goes on; a checkpoint
        that does not fit leaves the old weights serving. Returns (success, message, num_paused_requests).
        """
        if not self.ready.is_set():
            return False, "the model is still loading", 0
        try:
            if not Path(model_path).is_dir():
                raise FileNotFoundError(f"model_path {model_path!r} is not a directory")
            if self.model is None:
                raise RuntimeError(f"the model failed to load: {self.load_error}")
            checked = check_state_dict(self.model, read_state_dict(model_path))
        except Exception as err:  # any failure to read leaves the old weights in place
            logger.warning("weight update from %s failed: %s", model_path, err)
            return (
                False,
                f"Failed to update weights from {model_path}: {err}. The old weights keep serving.",
                0,
            )
        if abort_all_requests:
            self.abort(abort_all=True)
        num_paused = self.swap_weights(checked, weight_version, model_path=str(model_path))
        message = f"Succeeded to update model weights from {model_path}."
        if weight_version is not None:
            message += f" Weight version updated to {weight_version}."
        logger.info(message)
        return True, message, num_paused

    def swap_weights(
        self, checked: dict[str, torch.Tensor], weight_version: str | None, model_path: str | None = None
    ) -> int:
        """Copy checked tensors (`check_state_dict`) into the model between two decode steps and move to
        `weight_version` (None: the version stays); returns the number of requests in flight."""

        def swap() -> int:
            assert self.model is not None  # the scheduler thread runs actions only after _load succeeded
            copy_weights_(self.model, checked)
            running = self._batch + self._admitting
            if weight_version is not None and weight_version != self.weight_version:
                for active in running:
                    if active.output_ids:
                        active.version_events.append((self.weight_version, len(active.output_ids)))
                self.weight_version = weight_version
            if model_path is not None:
                self.model_path = model_path
            return len(running)

        return self.run_in_loop(swap)

    # ---- scheduler thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._load()
        except BaseException as err:
            self.load_error = err
            logger.error("failed to load %s: %s", self.model_path, err)
            self.ready.set()
            return
        self.ready.set()
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._iteration()
                except Exception as err:
                    # Faults of one request are caught where it runs; this is the last resort for a
                    # fault outside any one request: answer every request in flight and go on.
                    logger.error("engine step failed: %s\n%s", err, traceback.format_exc())
                    self._fail_all(f"engine error: {type(err).__name__}: {err}")
        # torch's thread count is process-wide: leave it as found, for a host that runs the engine in-process
        torch.set_num_threads(self._budget.max_threads)
        self._answer_leftovers()

    def _answer_leftovers(self) -> None:
        """At shutdown, nobody is left waiting: queued and running requests are answered as aborted."""
        with self._cond:
            for _fn, fut in self._actions:
                fut.set_exception(RuntimeError("the engine shut down"))
            self._actions.clear()
            running, self._batch, self._admitting = self._batch + self._admitting, [], []
            waiting = list(self._waiting)
            self._waiting.clear()
        for req in waiting:
            with self._cond:
                self._release_rid(req)
            if not req.future.done():
                req.future.set_result(waiting_abort_response(req, self.weight_version))
        for active in running:
            self._finish(active, _abort_reason("The engine shut down."))

    def _iteration(self) -> None:
        with self._cond:
            while (
                not self._stopping
                and not self._actions
                and not self._has_abort()
                and (self._paused or not (self._waiting or self._batch))
            ):
                self._cond.wait(timeout=1.0)
            actions, self._actions = self._actions, []
            if not self._paused:
                while self._waiting and len(self._batch) + len(self._admitting) < self.max_running_requests:
                    req = self._waiting.popleft()
                    adjuster = LogitAdjuster.build(req.params, self.vocab_size, self.eos_token_ids)
                    self._admitting.append(_Active(req, req.params.make_uniforms(), adjuster))
        for fn, fut in actions:
            try:
                fut.set_result(fn())
            except Exception as err:
                fut.set_exception(err)
        self._drop_aborted()
        if self._admitting:
            self._prefill_admitted()
        if self._batch and not self._paused:
            self._decode_step()

    def _has_abort(self) -> bool:
        return any(a.abort_message for a in self._batch + self._admitting)

    def _drop_aborted(self) -> None:
        for active in [a for a in self._admitting if a.abort_message]:
            assert active.abort_message is not None  # picked for it, and an abort message is never cleared
            self._leave_admitting([active])
            self._finish(active, _abort_reason(active.abort_message))
        if any(a.abort_message for a in self._batch):
            keep = []
            for row, active in enumerate(self._batch):
                if active.abort_message:
                    self._finish(active, _abort_reason(active.abort_message))
                else:
                    keep.append(row)
            self._set_batch(keep)

    def _leave_admitting(self, actives: list[_Active]) -> None:
        gone = {id(a) for a in actives}
        with self._cond:
            self._admitting = [a for a in self._admitting if id(a) not in gone]

    def _prefill_admitted(self) -> None:
        """Prefill the admitted requests, one forward pass per prompt length.

        A prompt sent n times (GRPO's n samples of a prompt) is computed once and every request samples
        its own first token from it: a batch of one per request made prefill most of a short rollout's
        engine time. When a shared forward pass fails, each of its requests is prefilled on its own, so
        one that fails is answered with an error alone.

        Prefilled requests stay in `_admitting` until they join the batch, so that a fault in between
        still finds (and answers) them."""
        rows, joined = [], []
        by_length: dict[int, list[_Active]] = {}
        for active in list(self._admitting):
            if self._finished_before_prefill(active):
                self._leave_admitting([active])
            else:
                by_length.setdefault(len(active.req.input_ids), []).append(active)
        for group in by_length.values():
            try:
                prefilled = self._prefill_shared(group)
            except Exception:
                prefilled = [(active, self._prefill_alone(active)) for active in group]
            for active, row in prefilled:  # row: (cache, its row), or None
                if row is None:
                    self._leave_admitting([active])
                else:
                    rows.append(row)
                    joined.append(active)
        if joined:
            self._kv.add(rows)
            gone = {id(a) for a in joined}
            with self._cond:
                self._admitting = [a for a in self._admitting if id(a) not in gone]
                self._batch.extend(joined)

    def _finished_before_prefill(self, active: _Active) -> bool:
        req = active.req
        if req.params.max_new_tokens == 0:
            self._finish(active, {"type": "length", "length": 0})
            return True
        if req.params.stop:
            active.stop_tail = max(len(s) for s in req.params.stop) + 2
        return False

    def _forward(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        """The model's forward pass over `input_ids`, on the threads its size is worth (`ThreadBudget`)."""
        assert self.model is not None  # the scheduler thread steps only after _load succeeded
        threads = self._budget.threads(input_ids.numel())
        if threads != self._threads_now:
            torch.set_num_threads(threads)
            self._threads_now = threads
        return self.model(input_ids=input_ids, **kwargs)

    def _prefill_shared(self, group: list[_Active]) -> list[tuple[_Active, Any]]:
        """One forward pass over the distinct prompts of `group` (all of one length); each request's first
        token, and its row of the shared cache (`(cache, row)`) or None when it already finished.

        The first tokens are sampled in one call; when that fails, each request samples on its own, so
        that only one that fails again is answered with an error."""
        rows: dict[tuple[int, ...], int] = {}
        for active in group:
            rows.setdefault(tuple(active.req.input_ids), len(rows))
        cache = new_cache(self.num_layers)
        out = self._forward(torch.tensor(list(rows)), cache=cache, use_cache=True, logits_to_keep=1)
        last = out.logits[:, -1, :].float()
        row_of = [rows[tuple(active.req.input_ids)] for active in group]
        failed: set[int] = set()
        try:
            # index_select copies: logit adjusters write into their row
            self._append_tokens(group, last.index_select(0, torch.tensor(row_of)))
        except Exception:
            for active, row in zip(group, row_of, strict=True):
                if active.output_ids:
                    continue  # sampled before the fault
                try:
                    self._append_tokens([active], last[row : row + 1].clone())
                except Exception as err:
                    self._fail(active, err, "prefill")
                    failed.add(id(active))
        return [
            (
                active,
                None if id(active) in failed or self._check_finished_safely(active) else (cache, row),
            )
            for active, row in zip(group, row_of, strict=True)
        ]

    def _prefill_alone(self, active: _Active):
        """`active`'s own prefill: its single-row cache as `(cache, 0)`, or None when it finished or failed
        (answered)."""
        try:
            return self._prefill(active)
        except Exception as err:
            self._fail(active, err, "prefill")
            return None

    def _prefill(self, active: _Active):
        """The request's first token; returns its single-row cache as `(cache, 0)`, or None when it already
        finished."""
        req = active.req
        cache = new_cache(self.num_layers)
        out = self._forward(torch.tensor([req.input_ids]), cache=cache, use_cache=True, logits_to_keep=1)
        self._append_tokens([active], out.logits[:, -1, :].float())
        return None if self._check_finished_safely(active) else (cache, 0)

    def _decode_step(self) -> None:
        snapshot = self._kv.snapshot()
        try:
            mask, positions = self._kv.step_inputs()
            input_ids = torch.tensor([[a.output_ids[-1]] for a in self._batch])
            out = self._forward(
                input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=self._kv.cache,
                use_cache=True,
                logits_to_keep=1,
            )
            self._kv.advance()
            self._append_tokens(self._batch, out.logits[:, -1, :].float())
        except Exception as err:
            self._kv.restore(snapshot)
            logger.warning(
                "a decode step of %d request(s) failed (%s: %s); decoding each on its own to find the one that fails",
                len(self._batch),
                type(err).__name__,
                err,
            )
            self._decode_rows_alone()
            return
        keep = [row for row, active in enumerate(self._batch) if not self._check_finished_safely(active)]
        self._set_batch(keep)
        self.last_step_time = time.monotonic()

    def _decode_rows_alone(self) -> None:
        """One decode step per row, each on a copy of its own cache: a row that fails again is answered
        with an error, the others take their step and form a new batch."""
        rows, survivors = [], []
        for row, active in enumerate(self._batch):
            try:
                cache, length = self._kv.row_cache(row)
                out = self._forward(
                    torch.tensor([[active.output_ids[-1]]]),
                    position_ids=torch.tensor([[length]]),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                self._append_tokens([active], out.logits[:, -1, :].float())
            except Exception as err:
                self._fail(active, err, "decode")
                continue
            if not self._check_finished_safely(active):
                rows.append((cache, 0))
                survivors.append(active)
        kv = BatchKV(self.num_layers)
        kv.add(rows)
        self._kv = kv
        with self._cond:
            self._batch = survivors
        self.last_step_time = time.monotonic()

    def _append_tokens(self, actives: list[_Active], logits: torch.Tensor) -> None:
        for row, active in enumerate(actives):
            if active.adjuster is not None:
                active.adjuster.apply_(logits[row])
        tokens, logprobs, tops = sample(
            logits,
            [a.req.params for a in actives],
            [a.uniforms or self._default_uniforms for a in actives],
            [a.req.top_logprobs_num if a.req.return_logprob else 0 for a in actives],
        )
        for active, tok, lp, top in zip(actives, tokens, logprobs, tops, strict=True):
            active.output_ids.append(tok)
            active.logprobs.append(lp)
            active.top_logprobs.append(top)
            if active.adjuster is not None:
                active.adjuster.observe(tok)

    def _set_batch(self, keep: list[int]) -> None:
        if len(keep) == len(self._batch):
            return
        self._kv.keep(keep)
        with self._cond:
            self._batch = [self._batch[i] for i in keep]

    def _check_finished_safely(self, active: _Active) -> bool:
        """`_check_finished`, with a fault (say, in detokenizing for stop strings) failing this request only."""
        try:
            return self._check_finished(active)
        except Exception as err:
            self._fail(active, err, "the stop check")
            return True

    def _check_finished(self, active: _Active) -> bool:
        """SGLang's order: stop string, stop regex, then EOS / stop token (unless ignore_eos), then length."""
        p, out = active.req.params, active.output_ids
        reason: dict[str, Any] | None = None
        if p.stop:
            assert self.tokenizer is not None  # the scheduler thread steps only after _load succeeded
            tail = self.tokenizer.decode(out[-active.stop_tail :])
            matched = next((s for s in p.stop if s in tail), None)
            if matched is not None:
                reason = {"type": "stop", "matched": matched}
        if reason is None and p.stop_regex:
            assert self.tokenizer is not None  # the scheduler thread steps only after _load succeeded
            text = str(self.tokenizer.decode(out[-p.stop_regex_tail :]))
            matched = next((r for r in p.stop_regex if re.search(r, text)), None)
            if matched is not None:
                reason = {"type": "stop", "matched": matched}  # SGLang's FINISHED_MATCHED_REGEX
        if (
            reason is None
            and not p.ignore_eos
            and (out[-1] in p.stop_token_ids or out[-1] in self.eos_token_ids)
        ):
            reason = {"type": "stop", "matched": out[-1]}
        if reason is None and len(out) >= p.max_new_tokens:
            reason = {"type": "length", "length": p.max_new_tokens}
        if reason is None:
            return False
        self._finish(active, reason)
        return True

    def _fail(self, active: _Active, err: Exception, stage: str) -> None:
        logger.error("request %s failed in %s: %s\n%s", active.req.rid, stage, err, traceback.format_exc())
        self._finish(
            active,
            _internal_error(f"The engine failed in {stage} of this request: {type(err).__name__}: {err}"),
        )

    def _fail_all(self, message: str) -> None:
        with self._cond:
            actives, self._batch, self._admitting = self._batch + self._admitting, [], []
        for active in actives:
            self._finish(active, _internal_error(message))
        self._kv = BatchKV(self.num_layers)

    def _finish(self, active: _Active, finish_reason: dict) -> None:
        """Answer the request and release its rid; never raises, so every request gets its answer."""
        try:
            response = generate_response(
                active.req,
                self.tokenizer,
                active.output_ids,
                active.logprobs,
                finish_reason,
                active.version_events,
                self.weight_version,
                active.top_logprobs,
            )
        except Exception as err:
            logger.error(
                "building the response of %s failed: %s\n%s", active.req.rid, err, traceback.format_exc()
            )
            response = error_response(
                active.req,
                active.output_ids,
                _internal_error(
                    f"The engine failed to build this request's response: {type(err).__name__}: {err}"
                ),
                self.weight_version,
            )
        with self._cond:
            self._release_rid(active.req)
        if not active.req.future.done():
            active.req.future.set_result(response)


def _abort_reason(message: str) -> dict:
    return {"type": "abort", "message": message, "status_code": None, "err_type": None}


def _internal_error(message: str) -> dict:
    """SGLang's finish reason for a request the engine failed: its server answers it with this HTTP status."""
    return {"type": "abort", "message": message, "status_code": 500, "err_type": "InternalServerError"}
