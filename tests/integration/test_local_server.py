"""The local engine server as a real subprocess, checked against SGLang's schema and transformers.

Every request sent and every `/generate` response received goes through SGLang's own msgspec
schema. Greedy tokens and log-probs are compared with a plain full forward pass of the same
checkpoint (no cache, no padding), so batching, padding and cache bugs show up as mismatches.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import make_tiny_model, perturb_checkpoint

from slime_wf import servers
from slime_wf.engine_server.schema import (
    schema_available,
    validate_generate_request,
    validate_generate_response,
    validate_model_info,
)
from slime_wf.servers import free_port

REQUEST_TIMEOUT = 60


# ---- helpers ---------------------------------------------------------------------------------


def call_with_headers(
    url: str, path: str, body: dict | None = None, method: str | None = None, key: str | None = None
) -> tuple[int, object, dict]:
    """(status, decoded body, response headers); `key` goes as `Authorization: Bearer`."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        url + path, data=data, method=method or ("POST" if body is not None else "GET"), headers=headers
    )
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as resp:
            status, raw, got = resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as err:
        status, raw, got = err.code, err.read(), dict(err.headers)
    try:
        return status, json.loads(raw) if raw else None, got
    except json.JSONDecodeError:
        return status, raw.decode(), got


def call(
    url: str, path: str, body: dict | None = None, method: str | None = None, key: str | None = None
) -> tuple[int, object]:
    status, out, _ = call_with_headers(url, path, body, method, key)
    return status, out


def generate(url: str, body: dict) -> dict:
    """POST /generate with a schema-checked body; the 200 response is schema-checked too."""
    if schema_available():
        validate_generate_request(body)
    status, out = call(url, "/generate", body)
    assert status == 200, out
    check_response(out)
    return out


def check_response(out: dict) -> None:
    if schema_available():
        decoded = validate_generate_response(out)
        # The schema falls back to a plain dict for an unknown finish_reason shape: insist on a real one.
        assert not isinstance(decoded.meta_info.finish_reason, dict), out["meta_info"]["finish_reason"]
    meta = out["meta_info"]
    assert meta["completion_tokens"] == len(out["output_ids"])
    if "output_token_logprobs" in meta:
        assert [e[1] for e in meta["output_token_logprobs"]] == out["output_ids"]


def start_server(model_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "slime_wf.engine_server",
        "--model-path",
        str(model_dir),
        "--port",
        str(port),
        "--num-threads",
        "1",
        *extra,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return call(url, "/health_generate")[0] == 200
        except OSError:
            return False

    try:
        servers.wait_until(healthy, "the local server to become healthy", timeout_s=120, process=proc)
    except servers.ProcessExited:
        raise RuntimeError(
            f"local server exited with {proc.returncode}:\n{log.read_text()[-3000:]}"
        ) from None
    except TimeoutError:
        proc.kill()
        raise RuntimeError(f"local server did not become healthy:\n{log.read_text()[-3000:]}") from None
    return proc, url


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def running_requests(url: str, key: str | None = None) -> int:
    return call(url, "/server_info", key=key)[1]["internal_states"][0]["num_running_reqs"]


def waiting_requests(url: str, key: str | None = None) -> int:
    return call(url, "/server_info", key=key)[1]["internal_states"][0]["num_waiting_reqs"]


class InProcessServer:
    """The server's app on a loop thread of this process, so a test can reach into its engine."""

    def __init__(self, engine, *flags: str):
        from slime_wf.engine_server.server import build_app, parse_args

        self.engine = engine
        self.app = build_app(engine, parse_args(["--model-path", engine.model_path, *flags]))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="in-process-server", daemon=True)

    def __enter__(self) -> InProcessServer:
        from aiohttp import web

        async def start():
            self.runner = web.AppRunner(self.app, handler_cancellation=True)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        self.thread.start()
        asyncio.run_coroutine_threadsafe(start(), self.loop).result(REQUEST_TIMEOUT)
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(REQUEST_TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(REQUEST_TIMEOUT)
        self.loop.close()


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    servers.wait_until(predicate, what, timeout_s=timeout, interval_s=0.02)


class Reference:
    """Full-forward log-probs from transformers, no cache and no padding."""

    def __init__(self, model_dir: Path):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    @torch.inference_mode()
    def logprobs(self, prompt: list[int], output: list[int], temperature: float = 1.0) -> torch.Tensor:
        """[len(output), vocab]: the distribution each output token was drawn from."""
        ids = torch.tensor([prompt + output])
        logits = self.model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(output) - 1]
        return torch.log_softmax(logits.float() / temperature, dim=-1)

    def assert_greedy(self, prompt: list[int], out: dict) -> None:
        ref = self.logprobs(prompt, out["output_ids"])
        assert out["output_ids"] == ref.argmax(-1).tolist()
        served = torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])
        expected = ref.gather(1, torch.tensor(out["output_ids"])[:, None])[:, 0]
        assert torch.allclose(served, expected, atol=1e-4, rtol=0), (served - expected).abs().max()


def prompt_of(length: int, seed: int, vocab: int = 40) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (length,), generator=g).tolist()


# ---- fixtures --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("local-server-model"), max_positions=1024)


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    proc, url = start_server(
        served_model, tmp_path_factory.mktemp("logs") / "server.log", "--max-running-requests", "8"
    )
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def reference(served_model) -> Reference:
    return Reference(served_model)


@pytest.fixture
def local_engine(served_model):
    """A started in-process engine (its server, if any, shuts it down; shutting down twice is harmless)."""
    from slime_wf.engine_server.engine import LocalEngine

    engine = LocalEngine(str(served_model), max_running_requests=8)
    engine.start()
    assert engine.ready.wait(REQUEST_TIMEOUT) and engine.load_error is None
    yield engine
    engine.shutdown()


# ---- generation ------------------------------------------------------------------------------


def test_concurrent_greedy_equals_full_forward_reference(server, reference):
    """Prompts of different lengths decoded together match a plain forward pass, tokens and log-probs."""
    lengths = [1, 3, 7, 12, 20, 33, 5, 48, 2, 17]
    bodies = [
        {
            "rid": f"greedy-{i}",
            "input_ids": prompt_of(n, seed=i),
            "sampling_params": {"max_new_tokens": 6 + 3 * (i % 5), "temperature": 0.0, "ignore_eos": True},
            "return_logprob": True,
        }
        for i, n in enumerate(lengths)
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        outs = list(pool.map(lambda b: generate(server, b), bodies))
    for body, out in zip(bodies, outs, strict=True):
        assert out["meta_info"]["id"] == body["rid"]
        assert out["meta_info"]["finish_reason"] == {
            "type": "length",
            "length": body["sampling_params"]["max_new_tokens"],
        }
        assert out["meta_info"]["prompt_tokens"] == len(body["input_ids"])
        reference.assert_greedy(body["input_ids"], out)
    # Greedy decoding is reproducible whatever runs beside it.
    alone = generate(server, bodies[5])
    assert alone["output_ids"] == outs[5]["output_ids"]


def test_text_prompt_equals_its_token_ids(server, served_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served_model)
    text = "what is one plus two"
    params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    by_text = generate(server, {"text": text, "sampling_params": params})
    by_ids = generate(server, {"input_ids": tok.encode(text), "sampling_params": params})
    assert by_text["output_ids"] == by_ids["output_ids"]
    assert by_text["text"] == tok.decode(by_text["output_ids"], skip_special_tokens=True)
    assert by_text["meta_info"]["prompt_tokens"] == len(tok.encode(text))


def test_a_batched_request_answers_each_prompt_in_order(server):
    """SGLang's batched /generate: a list of prompts with per-prompt sampling params and rids (or one
    value for all) answers a list of responses in prompt order, each what the prompt alone gets."""
    prompts = [prompt_of(5, seed=200), prompt_of(7, seed=201), prompt_of(5, seed=200)]
    params = [{"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True} for n in (3, 5, 4)]
    body = {
        "input_ids": prompts,
        "sampling_params": params,
        "rid": ["b0", "b1", "b2"],
        "return_logprob": True,
    }
    if schema_available():
        validate_generate_request(body)
    status, out = call(server, "/generate", body)
    assert status == 200, out
    assert isinstance(out, list) and len(out) == 3
    for item, prompt, p, rid in zip(out, prompts, params, body["rid"], strict=True):
        check_response(item)
        assert item["meta_info"]["id"] == rid
        assert len(item["output_ids"]) == p["max_new_tokens"] == item["meta_info"]["completion_tokens"]
        assert item["meta_info"]["prompt_tokens"] == len(prompt)
        alone = generate(server, {"input_ids": prompt, "sampling_params": p, "return_logprob": True})
        assert alone["output_ids"] == item["output_ids"]
    # one sampling_params object for every prompt
    status, shared = call(server, "/generate", {"input_ids": prompts[:2], "sampling_params": params[0]})
    assert status == 200 and [len(x["output_ids"]) for x in shared] == [3, 3]


def test_sampling_seed_reproducible_and_logprobs_before_truncation(server, reference):
    prompt = prompt_of(9, seed=100)
    params = {"max_new_tokens": 24, "temperature": 0.7, "top_k": 6, "top_p": 0.9, "ignore_eos": True}
    body = {"input_ids": prompt, "return_logprob": True, "sampling_params": {**params, "sampling_seed": 1234}}
    first, second = generate(server, body), generate(server, body)
    assert first["output_ids"] == second["output_ids"]
    assert first["meta_info"]["output_token_logprobs"] == second["meta_info"]["output_token_logprobs"]
    other = generate(server, {**body, "sampling_params": {**params, "sampling_seed": 99}})
    assert other["output_ids"] != first["output_ids"]

    # SGLang's definition: log-softmax(logits / T) over the whole vocabulary, before top-k/top-p.
    ref = reference.logprobs(prompt, first["output_ids"], temperature=0.7)
    served = torch.tensor([e[0] for e in first["meta_info"]["output_token_logprobs"]])
    expected = ref.gather(1, torch.tensor(first["output_ids"])[:, None])[:, 0]
    assert torch.allclose(served, expected, atol=1e-4, rtol=0)
    top6 = ref.topk(6, dim=-1).indices
    assert all(tok in row for tok, row in zip(first["output_ids"], top6.tolist(), strict=True))
    assert first["output_ids"] != ref.argmax(-1).tolist()  # it did sample


def test_stop_string_trimmed_unless_no_stop_trim(server, served_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served_model)
    prompt = prompt_of(6, seed=7)
    params = {"max_new_tokens": 30, "temperature": 0, "ignore_eos": True}
    base = generate(server, {"input_ids": prompt, "sampling_params": params})
    words = [tok.decode([t]) for t in base["output_ids"]]
    k = next(i for i in range(3, len(words)) if words[i] not in words[:i] and words[i].isalpha())
    stop = words[k]

    out = generate(server, {"input_ids": prompt, "sampling_params": {**params, "stop": [stop, "never-seen"]}})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["output_ids"] == base["output_ids"][: k + 1]
    assert out["text"] == tok.decode(base["output_ids"][:k], skip_special_tokens=True) + " "
    assert stop not in out["text"]

    kept = generate(
        server, {"input_ids": prompt, "sampling_params": {**params, "stop": stop, "no_stop_trim": True}}
    )
    assert kept["output_ids"] == out["output_ids"]
    assert kept["text"].endswith(stop)


def test_stop_token_ids_and_max_new_tokens(server):
    prompt = prompt_of(4, seed=8)
    params = {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True}
    base = generate(server, {"input_ids": prompt, "sampling_params": params})
    ids = base["output_ids"]
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])

    stop_params = {"max_new_tokens": 20, "temperature": 0, "stop_token_ids": [ids[k]]}
    out = generate(server, {"input_ids": prompt, "sampling_params": stop_params, "return_logprob": True})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ids[k]}
    assert out["output_ids"] == ids[: k + 1]  # the stop token is returned, its text is not
    assert len(out["meta_info"]["output_token_logprobs"]) == k + 1

    # ignore_eos disables stop tokens too (as in SGLang); max_new_tokens truncates.
    ignored = generate(
        server,
        {"input_ids": prompt, "sampling_params": {**stop_params, "ignore_eos": True, "max_new_tokens": 5}},
    )
    assert ignored["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
    assert ignored["output_ids"] == ids[:5]

    empty = generate(server, {"input_ids": prompt, "sampling_params": {"max_new_tokens": 0}})
    assert empty["output_ids"] == [] and empty["meta_info"]["finish_reason"] == {
        "type": "length",
        "length": 0,
    }


def test_eight_concurrent_mixed_requests_complete(server):
    bodies = []
    for i in range(8):
        params = {
            "max_new_tokens": 5 + 4 * i,
            "temperature": [0.0, 1.0, 0.5, 1.3][i % 4],
            "ignore_eos": i % 2 == 0,
        }
        if i % 3 == 0:
            params |= {"top_p": 0.8, "min_p": 0.05, "sampling_seed": i}
        bodies.append(
            {
                "rid": f"mixed-{i}",
                "input_ids": prompt_of(3 + 5 * i, seed=50 + i),
                "sampling_params": params,
                "return_logprob": i % 2 == 1,
            }
        )
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda b: generate(server, b), bodies))
    for body, out in zip(bodies, outs, strict=True):
        assert out["meta_info"]["id"] == body["rid"]
        assert out["meta_info"]["finish_reason"]["type"] in ("length", "stop")
        assert 1 <= len(out["output_ids"]) <= body["sampling_params"]["max_new_tokens"]
        assert ("output_token_logprobs" in out["meta_info"]) == body["return_logprob"]


# ---- abort and pause -------------------------------------------------------------------------


def _generate_in_thread(url: str, body: dict) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run():
        box["out"] = generate(url, body)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def test_abort_returns_partial_output(server):
    long = {"max_new_tokens": 1000, "temperature": 0, "ignore_eos": True}
    thread, box = _generate_in_thread(
        server,
        {"rid": "to-abort-1", "input_ids": prompt_of(5, 1), "sampling_params": long, "return_logprob": True},
    )
    wait_until(lambda: running_requests(server) == 1, what="the request to run")
    # Paused mid-generation, the request cannot finish before the abort reaches it. A running request
    # was admitted before the pause, and its admission step prefills it, so it has a token by now.
    assert call(server, "/pause_generation", {"mode": "in_place"})[0] == 200
    try:
        status, _ = call(server, "/abort_request", {"rid": "to-abort"})  # rids match by prefix, as in SGLang
        assert status == 200
        thread.join(REQUEST_TIMEOUT)
    finally:
        call(server, "/continue_generation", {})
    out = box["out"]
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < out["meta_info"]["completion_tokens"] < 1000
    assert len(out["meta_info"]["output_token_logprobs"]) == len(out["output_ids"])


def test_client_disconnect_aborts_its_request(server):
    body = {
        "rid": "gone",
        "input_ids": prompt_of(5, 9),
        "sampling_params": {"max_new_tokens": 1000, "temperature": 0, "ignore_eos": True},
    }
    req = urllib.request.Request(
        server + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    errors: list[Exception] = []

    def give_up_after_a_second():
        try:
            urllib.request.urlopen(req, timeout=1.0)
        except OSError as err:
            errors.append(err)

    client = threading.Thread(target=give_up_after_a_second, daemon=True)
    client.start()
    wait_until(lambda: running_requests(server) == 1, what="the request to run")
    # Paused, the request cannot finish on its own: only the disconnect can end it.
    assert call(server, "/pause_generation", {"mode": "in_place"})[0] == 200
    try:
        client.join(10)
        assert errors, "the client should have timed out"
        wait_until(
            lambda: running_requests(server) == 0, timeout=10, what="the abandoned request to be aborted"
        )
    finally:
        call(server, "/continue_generation", {})
    # Its rid is free again.
    assert generate(server, {**body, "sampling_params": {"max_new_tokens": 2}})["meta_info"]["id"] == "gone"


def test_pause_keeps_requests_waiting_until_continue(server):
    status, body = call(server, "/pause_generation", {"mode": "in_place"})
    assert status == 200 and body["status"] == "ok"
    try:
        thread, box = _generate_in_thread(
            server, {"input_ids": prompt_of(4, 2), "sampling_params": {"max_new_tokens": 4}}
        )
        wait_until(lambda: waiting_requests(server) == 1, what="the request to be queued")
        assert running_requests(server) == 0 and "out" not in box  # queued while paused
        assert call(server, "/health_generate")[0] == 200  # a paused server is healthy
    finally:
        assert call(server, "/continue_generation", {})[0] == 200
    thread.join(REQUEST_TIMEOUT)
    assert len(box["out"]["output_ids"]) >= 1


def test_pause_abort_mode_aborts_in_flight_and_queued(server):
    long = {"max_new_tokens": 1000, "temperature": 0, "ignore_eos": True}
    running, running_box = _generate_in_thread(
        server, {"input_ids": prompt_of(5, 3), "sampling_params": long}
    )
    wait_until(lambda: running_requests(server) == 1, what="the request to run")
    assert call(server, "/pause_generation", {"mode": "abort"})[0] == 200
    try:
        queued, queued_box = _generate_in_thread(
            server, {"rid": "queued", "input_ids": [5, 6], "sampling_params": long}
        )
        wait_until(lambda: waiting_requests(server) == 1, what="the request to be queued")
        assert call(server, "/abort_request", {"rid": "", "abort_all": True})[0] == 200
        queued.join(REQUEST_TIMEOUT)
        assert queued_box["out"]["meta_info"]["finish_reason"] == {
            "type": "abort",
            "message": "Abort in waiting queue",
        }
    finally:
        call(server, "/continue_generation", {})
    running.join(REQUEST_TIMEOUT)
    assert running_box["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert call(server, "/flush_cache", {})[0] == 200  # idle again


# ---- bad requests and info -------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"input_ids": [5, 6], "sampling_params": {"max_new_token": 3}}, "unknown field `max_new_token`"),
        ({"input_ids": [5, 6], "sampling_params": {"max_new_tokens": "3"}}, "invalid type"),
        ({"input_ids": [5, 100000]}, "outside the vocabulary"),
        ({"input_ids": [5, -1]}, "outside the vocabulary"),
        ({"input_ids": [5, 6], "text": "the cat"}, "not both or neither"),
        ({"sampling_params": {"max_new_tokens": 3}}, "not both or neither"),
        ({"input_ids": [5], "sampling_params": {"max_new_tokens": -1}}, "max_new_tokens must be at least 0"),
        ({"input_ids": [5] * 1024}, "longer than the model's context length"),
        ({"input_ids": [5] * 1000, "sampling_params": {"max_new_tokens": 100}}, "maximum context length"),
        ({"input_ids": [5], "sampling_params": {"n": 2}}, "one sample per request"),
        ({"input_ids": [5], "sampling_params": {"top_p": 0.0}}, "top_p must be in (0, 1]"),
        ({"input_ids": [5], "sampling_params": {"temperature": -1.0}}, "temperature must be"),
        ({"input_ids": [5], "sampling_params": {"regex": "[0-9]+"}}, "needs a grammar backend"),
        ({"input_ids": [[5], [6]], "rid": ["a"]}, "1 entries for a batch of 2 prompts"),
        ({"input_ids": [[5], []]}, "prompt is empty"),
        ({"input_ids": [[5], [5, 100000]]}, "outside the vocabulary"),
        ({"input_ids": [5], "stream": True}, "stream=true is not supported"),
        ({"input_ids": []}, "prompt is empty"),
    ],
)
def test_bad_requests_get_400(server, body, needle):
    status, out = call(server, "/generate", body)
    assert status == 400, out
    message = out["error"] if isinstance(out["error"], str) else out["error"]["message"]
    assert needle in message


def test_health_and_info(server, served_model):
    assert call(server, "/health")[0] == 200
    assert call(server, "/health_generate")[0] == 200
    status, info = call(server, "/model_info")
    assert status == 200 and info["model_path"] == str(served_model) and info["is_generation"] is True
    assert info["weight_version"] == "default"
    if schema_available():
        validate_model_info(info)
    status, server_info = call(server, "/server_info")
    assert status == 200 and server_info["max_running_requests"] == 8


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_engine_serves_other_architectures(arch, tmp_path):
    """The engine in-process (no HTTP) on Qwen2 / Llama checkpoints: concurrent greedy equals the reference."""
    from slime_wf.engine_server.engine import LocalEngine
    from slime_wf.engine_server.sampling import Request, SamplingParams

    model_dir = make_tiny_model(tmp_path / arch, arch=arch, seed=3)
    engine = LocalEngine(str(model_dir))
    engine.start()
    try:
        assert engine.ready.wait(60) and engine.load_error is None
        prompts = [prompt_of(n, seed=n) for n in (2, 9, 25)]
        params = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
        futures = [
            engine.submit(
                Request(
                    rid=f"{arch}-{i}",
                    input_ids=p,
                    return_logprob=True,
                    params=SamplingParams.from_request(params, engine.vocab_size),
                )
            )
            for i, p in enumerate(prompts)
        ]
        reference = Reference(model_dir)
        for prompt, fut in zip(prompts, futures, strict=True):
            out = fut.result(timeout=REQUEST_TIMEOUT)
            check_response(out)
            reference.assert_greedy(prompt, out)
    finally:
        engine.shutdown()


# ---- weight updates (own server: they change what is served) ---------------------------------


@pytest.fixture(scope="module")
def updatable(served_model, tmp_path_factory):
    proc, url = start_server(
        served_model, tmp_path_factory.mktemp("logs") / "update.log", "--weight-version", "v1"
    )
    yield url
    stop_server(proc)


@pytest.mark.slow
def test_update_weights_from_disk_changes_outputs_and_version(updatable, served_model, tmp_path):
    new_dir = perturb_checkpoint(served_model, tmp_path / "v2")
    body = {
        "input_ids": prompt_of(7, seed=3),
        "return_logprob": True,
        "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True},
    }
    before = generate(updatable, body)
    assert before["meta_info"]["weight_version"] == "v1"

    status, res = call(
        updatable, "/update_weights_from_disk", {"model_path": str(new_dir), "weight_version": "v2"}
    )
    assert status == 200 and res["success"] is True and res["num_paused_requests"] == 0, res
    info = call(updatable, "/model_info")[1]
    assert info["weight_version"] == "v2" and info["model_path"] == str(new_dir)
    after = generate(updatable, body)
    assert after["meta_info"]["weight_version"] == "v2"
    assert after["output_ids"] != before["output_ids"]
    Reference(new_dir).assert_greedy(body["input_ids"], after)

    # A bad path or a checkpoint of another shape fails cleanly and v2 keeps serving.
    status, res = call(
        updatable, "/update_weights_from_disk", {"model_path": str(tmp_path / "nope"), "weight_version": "v3"}
    )
    assert status == 400 and res["success"] is False and "nope" in res["message"]
    wider = make_tiny_model(tmp_path / "wider", hidden=96)
    status, res = call(
        updatable, "/update_weights_from_disk", {"model_path": str(wider), "weight_version": "v3"}
    )
    assert status == 400 and res["success"] is False and "shape" in res["message"]
    assert call(updatable, "/model_info")[1]["weight_version"] == "v2"
    again = generate(updatable, body)
    assert again["output_ids"] == after["output_ids"] and again["meta_info"]["weight_version"] == "v2"


@pytest.mark.slow
def test_update_mid_generation_reports_version_spans(updatable, served_model, tmp_path):
    new_dir = perturb_checkpoint(served_model, tmp_path / "v9", seed=9)
    long = {"max_new_tokens": 900, "temperature": 0, "ignore_eos": True}
    thread, box = _generate_in_thread(
        updatable, {"rid": "spanning", "input_ids": prompt_of(3, 4), "sampling_params": long}
    )
    wait_until(lambda: running_requests(updatable) == 1, what="the request to run")
    # Paused, the request is surely mid-generation when the new weights arrive (prefilled: see the abort test).
    assert call(updatable, "/pause_generation", {"mode": "in_place"})[0] == 200
    try:
        status, res = call(
            updatable, "/update_weights_from_disk", {"model_path": str(new_dir), "weight_version": "v9"}
        )
        assert status == 200 and res["success"] and res["num_paused_requests"] == 1, res
    finally:
        call(updatable, "/continue_generation", {})
    thread.join(REQUEST_TIMEOUT)
    meta = box["out"]["meta_info"]
    assert meta["finish_reason"] == {"type": "length", "length": 900}
    assert meta["weight_version"] == "v9"  # the version current when it finished
    old, new = meta["weight_versions"]
    assert old["version"] != "v9" and new["version"] == "v9"
    assert old["start"] == 0 < old["end"] == new["start"] < new["end"] == 900


@pytest.mark.slow
def test_fp8_checkpoint_is_served_with_fp8_rounded_weights(served_model, tmp_path):
    """The FP8 copy is dequantized on load: outputs match a reference built from the dequantized weights."""
    from slime_wf.checkpoint.fp8_convert import convert_checkpoint
    from slime_wf.engine_server.model import check_state_dict, copy_weights_, read_state_dict

    fp8_dir = tmp_path / "fp8"
    convert_checkpoint(str(served_model), str(fp8_dir), strategy="block", block_size=[32, 32], progress=False)
    reference = Reference(served_model)
    exact = {k: v.clone() for k, v in reference.model.state_dict().items()}
    copy_weights_(reference.model, check_state_dict(reference.model, read_state_dict(fp8_dir)))
    assert any(
        not torch.equal(exact[k], v) for k, v in reference.model.state_dict().items()
    )  # really rounded

    proc, url = start_server(fp8_dir, tmp_path / "fp8.log")
    try:
        body = {
            "input_ids": prompt_of(11, seed=5),
            "return_logprob": True,
            "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True},
        }
        reference.assert_greedy(body["input_ids"], generate(url, body))
    finally:
        stop_server(proc)


def test_abort_with_empty_rid_aborts_nothing(server):
    """SGLang ignores `/abort_request` with an empty rid and abort_all false (the rid would prefix-match all)."""
    params = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}
    thread, box = _generate_in_thread(
        server, {"rid": "keep-going", "input_ids": prompt_of(5, 11), "sampling_params": params}
    )
    wait_until(lambda: running_requests(server) == 1, what="the request to run")
    # Paused, the request is still running when the aborts arrive; only an abort could end it early.
    assert call(server, "/pause_generation", {"mode": "in_place"})[0] == 200
    try:
        assert call(server, "/abort_request", {})[0] == 200
        assert call(server, "/abort_request", {"rid": "", "abort_all": False})[0] == 200
    finally:
        assert call(server, "/continue_generation", {})[0] == 200
    thread.join(REQUEST_TIMEOUT)
    assert box["out"]["meta_info"]["finish_reason"] == {"type": "length", "length": 40}


# ---- faults, queue bound, keys ---------------------------------------------------------------

POISON_TOKEN = 2  # prompt_of draws from [4, 40): only the prompt built to fail holds it
FAULT_POSITION = 60  # the other prompts and outputs here stay far below this position


def inject_faults(monkeypatch, model) -> None:
    """Make the model raise in the prefill of a prompt holding POISON_TOKEN and in any decode step that
    holds a row at FAULT_POSITION or beyond: the faults of one request, as a bad input would cause."""
    forward = model.forward

    def faulty_forward(*args, input_ids=None, position_ids=None, **kwargs):
        if input_ids.shape[1] > 1 and bool((input_ids == POISON_TOKEN).any()):
            raise RuntimeError("injected prefill fault")
        if (
            input_ids.shape[1] == 1
            and position_ids is not None
            and bool((position_ids >= FAULT_POSITION).any())
        ):
            raise RuntimeError("injected decode fault")
        return forward(*args, input_ids=input_ids, position_ids=position_ids, **kwargs)

    monkeypatch.setattr(model, "forward", faulty_forward)


def test_fault_in_one_request_fails_only_that_request(local_engine, reference, monkeypatch):
    """A request that breaks prefill and one that breaks a batched decode step get HTTP 500; the requests
    decoded beside them finish exactly as a plain forward pass says, and the failed rids are free again."""
    inject_faults(monkeypatch, local_engine.model)
    greedy = {"temperature": 0, "ignore_eos": True}
    good = [
        {
            "rid": f"good-{i}",
            "input_ids": prompt_of(3 + 2 * i, seed=200 + i),
            "return_logprob": True,
            "sampling_params": {**greedy, "max_new_tokens": 12 + i},
        }
        for i in range(4)
    ]
    bad_prefill = {
        "rid": "bad-prefill",
        "input_ids": [5, POISON_TOKEN, 6],
        "sampling_params": {**greedy, "max_new_tokens": 8},
    }
    bad_decode = {
        "rid": "bad-decode",
        "input_ids": prompt_of(FAULT_POSITION - 4, seed=300),
        "sampling_params": {**greedy, "max_new_tokens": 16},
    }
    bodies = [*good[:2], bad_prefill, good[2], bad_decode, good[3]]
    with InProcessServer(local_engine) as srv:
        # Paused, all of them are admitted in one step and decoded in one batch.
        assert call(srv.url, "/pause_generation", {"mode": "in_place"})[0] == 200
        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(call, srv.url, "/generate", body) for body in bodies]
            wait_until(lambda: waiting_requests(srv.url) == len(bodies), what="every request to be queued")
            assert call(srv.url, "/continue_generation", {})[0] == 200
            answers = {
                body["rid"]: f.result(REQUEST_TIMEOUT) for body, f in zip(bodies, futures, strict=True)
            }

        for body in good:
            status, out = answers[body["rid"]]
            assert status == 200, out
            check_response(out)
            assert out["meta_info"]["finish_reason"] == {
                "type": "length",
                "length": body["sampling_params"]["max_new_tokens"],
            }
            reference.assert_greedy(body["input_ids"], out)
        for rid, fault in (
            ("bad-prefill", "injected prefill fault"),
            ("bad-decode", "injected decode fault"),
        ):
            status, out = answers[rid]
            assert status == 500, out
            assert out["code"] == 500 and fault in out["message"], out  # SGLang's ErrorResponse

        # Every request was answered and released: nothing runs, nothing waits, the rids are free.
        assert (running_requests(srv.url), waiting_requests(srv.url)) == (0, 0)
        assert local_engine._active_rids == {}
        again = generate(
            srv.url, {"rid": "bad-decode", "input_ids": [7, 8], "sampling_params": {"max_new_tokens": 3}}
        )
        assert again["meta_info"]["id"] == "bad-decode"


def test_prompts_sent_n_times_are_prefilled_once_per_length(local_engine, reference, monkeypatch):
    """GRPO sends each prompt n times: admitted together, the prompts of one length share one prefill
    forward pass, each prompt computed once; every request still samples with its own seed and decodes
    exactly as a plain forward pass says."""
    prefills = []
    forward = local_engine.model.forward

    def counting_forward(*args, input_ids=None, **kwargs):
        if input_ids.shape[1] > 1:
            prefills.append(tuple(input_ids.shape))
        return forward(*args, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(local_engine.model, "forward", counting_forward)
    short, other, longer = prompt_of(5, seed=400), prompt_of(5, seed=401), prompt_of(9, seed=402)
    greedy = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 6}
    bodies = [
        {"rid": f"{name}-{i}", "input_ids": prompt, "return_logprob": True, "sampling_params": greedy}
        for name, prompt in (("short", short), ("other", other), ("longer", longer))
        for i in range(2)
    ]
    sampled = [
        {
            "rid": f"seeded-{i}",
            "input_ids": short,
            "sampling_params": {
                "temperature": 1.0,
                "max_new_tokens": 6,
                "ignore_eos": True,
                "sampling_seed": i,
            },
        }
        for i in range(2)
    ]
    from slime_wf.engine_server.requests import build_request

    def submit(body: dict):
        return local_engine.submit(build_request(body, local_engine))

    # Paused, all of them are admitted in one step.
    local_engine.pause("in_place")
    futures = [submit(body) for body in bodies + sampled]
    local_engine.resume()
    outs = [f.result(REQUEST_TIMEOUT) for f in futures]

    # one pass for the two distinct prompts of length 5, one for the prompt of length 9
    assert sorted(prefills) == [(1, 9), (2, 5)]
    for body, out in zip(bodies, outs[: len(bodies)], strict=True):
        reference.assert_greedy(body["input_ids"], out)
    # each seeded request alone draws what it drew beside the others
    alone = [submit({**body, "rid": body["rid"] + "-alone"}).result(REQUEST_TIMEOUT) for body in sampled]
    assert [out["output_ids"] for out in outs[len(bodies) :]] == [out["output_ids"] for out in alone]
    assert alone[0]["output_ids"] != alone[1]["output_ids"]


def test_large_prompt_is_tokenized_off_the_event_loop(local_engine, monkeypatch):
    """While a multi-megabyte text prompt is being tokenized, /health and /server_info still answer."""
    started, release = threading.Event(), threading.Event()
    encode = local_engine.tokenizer.encode

    def held_encode(text, *args, **kwargs):
        started.set()
        release.wait(REQUEST_TIMEOUT)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(local_engine.tokenizer, "encode", held_encode)
    text = "the cat and the dog " * 150_000  # 3 MB
    with InProcessServer(local_engine) as srv:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(
                call, srv.url, "/generate", {"text": text, "sampling_params": {"max_new_tokens": 1}}
            )
            try:
                assert started.wait(REQUEST_TIMEOUT), "the prompt never reached the tokenizer"
                assert call(srv.url, "/health")[0] == 200
                assert call(srv.url, "/server_info")[0] == 200
                assert not pending.done()  # still held in the tokenizer
            finally:
                release.set()
            status, out = pending.result(REQUEST_TIMEOUT)
    assert status == 400 and "context length" in out["error"]["message"]


API_KEY, ADMIN_KEY = "test-api-key", "test-admin-key"


@pytest.fixture(scope="module")
def guarded(served_model, tmp_path_factory):
    """A server with both keys and room for one running and one queued request."""
    log = tmp_path_factory.mktemp("logs") / "guarded.log"
    proc, url = start_server(
        served_model,
        log,
        "--api-key",
        API_KEY,
        "--admin-api-key",
        ADMIN_KEY,
        "--max-running-requests",
        "1",
        "--max-queued-requests",
        "1",
    )
    yield url
    stop_server(proc)


def test_full_queue_answers_503_with_retry_after_and_the_session_retries(guarded):
    from slime_wf.rollout.engine_client import EngineSession

    params = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    body = {"input_ids": prompt_of(4, seed=20), "sampling_params": params}
    assert call(guarded, "/pause_generation", {"mode": "in_place"}, key=ADMIN_KEY)[0] == 200
    try:
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(call, guarded, "/generate", body, None, API_KEY)
            wait_until(lambda: waiting_requests(guarded, API_KEY) == 1, what="the first request to be queued")
            # Paused, no slot frees up: the queue holds its one request, so the next one is refused.
            status, out, headers = call_with_headers(guarded, "/generate", body, key=API_KEY)
            assert status == 503, out
            assert out == {
                "object": "error",
                "message": "The request queue is full.",
                "type": "503",
                "param": None,
                "code": 503,
            }
            assert int(headers["Retry-After"]) >= 1
            assert call(guarded, "/continue_generation", {}, key=ADMIN_KEY)[0] == 200
            status, first = queued.result(REQUEST_TIMEOUT)
        assert status == 200, first
    finally:
        call(guarded, "/continue_generation", {}, key=ADMIN_KEY)

    async def through_the_session() -> tuple[list[dict], EngineSession]:
        async with EngineSession(
            [guarded], api_key=API_KEY, admin_api_key=ADMIN_KEY, busy_retries=100
        ) as session:
            await session.for_each_engine(lambda c: c.pause_generation("in_place"))
            try:
                tasks = [
                    asyncio.create_task(session.generate({**body, "rid": f"busy-{i}"})) for i in range(6)
                ]
                # Every request but the queued one has been refused at least once before anything runs.
                while session.busy_answers < 5:
                    await asyncio.sleep(0.02)
                assert not any(t.done() for t in tasks)
            finally:
                await session.for_each_engine(lambda c: c.continue_generation())
            return [out for out, _url in await asyncio.gather(*tasks)], session

    outs, session = asyncio.run(through_the_session())
    assert [o["meta_info"]["id"] for o in outs] == [f"busy-{i}" for i in range(6)]
    assert all(o["output_ids"] == first["output_ids"] for o in outs)
    assert not session.down


def test_keys_follow_sglang(guarded, served_model):
    """`--api-key` guards generation and info, `--admin-api-key` the management endpoints (which refuse the
    API key), `/health*` stays open; a missing or wrong key gets 401 `{"error": "Unauthorized"}`."""
    body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}}
    for path in ("/health", "/health_generate"):
        assert call(guarded, path)[0] == 200
    for key in (None, "wrong", ADMIN_KEY):
        assert call(guarded, "/generate", body, key=key) == (401, {"error": "Unauthorized"})
        assert call(guarded, "/model_info", key=key)[0] == 401
        assert call(guarded, "/server_info", key=key)[0] == 401
    assert call(guarded, "/generate", body, key=API_KEY)[0] == 200
    assert call(guarded, "/model_info", key=API_KEY)[0] == 200

    admin_calls = [
        ("/abort_request", {"rid": "nothing-like-this"}),
        ("/pause_generation", {"mode": "in_place"}),
        ("/continue_generation", {}),
        ("/flush_cache", {}),
        ("/update_weights_from_disk", {"model_path": str(served_model)}),
    ]
    for path, payload in admin_calls:
        for key in (None, "wrong", API_KEY):
            assert call(guarded, path, payload, key=key) == (401, {"error": "Unauthorized"}), (path, key)
    for path, payload in admin_calls:
        status, out = call(guarded, path, payload, key=ADMIN_KEY)
        assert status == 200, (path, out)


def test_engine_session_sends_the_admin_key_on_control_calls(guarded, served_model):
    from slime_wf.rollout.engine_client import EngineRejected, EngineSession

    async def control(session: EngineSession) -> None:
        await session.for_each_engine(lambda c: c.pause_generation("in_place"))
        await session.for_each_engine(lambda c: c.continue_generation())
        await session.abort_all()
        await session.for_each_engine(lambda c: c.flush_cache())
        await session.for_each_engine(lambda c: c.update_weights_from_disk(str(served_model), "default"))

    async def run(**keys) -> None:
        async with EngineSession([guarded], **keys) as session:
            out, _ = await session.generate({"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 2}})
            assert len(out["output_ids"]) == 2
            await control(session)

    asyncio.run(run(api_key=API_KEY, admin_api_key=ADMIN_KEY))
    with pytest.raises(EngineRejected, match="admin key") as refused:
        asyncio.run(run(api_key=API_KEY))
    assert refused.value.status == 401


def test_auth_matches_sglangs_own_decision():
    """Our auth rule equals SGLang's `decide_request_auth`, with each endpoint's level read from SGLang's server."""
    from slime_wf.engine_server.schema import SchemaUnavailableError, load_sglang_file
    from slime_wf.engine_server.server import ADMIN_PATHS, auth_refusal, build_app, parse_args

    try:
        auth = load_sglang_file("srt/utils/auth.py")
        server_source = load_sglang_file("srt/entrypoints/http_server.py", source_only=True)
    except SchemaUnavailableError as err:
        pytest.skip(str(err))
    admin_in_sglang = set()
    for match in re.finditer(
        r'@app\.(?:get|post|api_route)\(\s*"([^"]+)"[^\n]*\n@auth_level\(AuthLevel\.(\w+)\)', server_source
    ):
        if match.group(2) == "ADMIN_OPTIONAL":
            admin_in_sglang.add(match.group(1))

    class _Engine:
        model_path = "unused"

    app = build_app(_Engine(), parse_args(["--model-path", "unused"]))
    served = {r.resource.canonical for r in app.router.routes()}
    assert ADMIN_PATHS == served & admin_in_sglang
    for path in served:
        level = auth.AuthLevel.ADMIN_OPTIONAL if path in admin_in_sglang else auth.AuthLevel.NORMAL
        for api_key in (None, "k"):
            for admin_key in (None, "a"):
                for header in (None, "Bearer k", "Bearer a", "bearer a", "Basic a", "Bearer wrong", "Bearer"):
                    theirs = auth.decide_request_auth(
                        method="POST",
                        path=path,
                        authorization_header=header,
                        api_key=api_key,
                        admin_api_key=admin_key,
                        auth_level=level,
                    )
                    ours = auth_refusal("POST", path, header, api_key, admin_key)
                    expected = None if theirs.allowed else theirs.error_status_code
                    assert ours == expected, (path, api_key, admin_key, header)


def test_sglang_files_load_by_path_without_entering_sys_modules():
    """SGLang's schema and its auth rules load by file path, work, and leave sys.modules as it was."""
    from slime_wf.engine_server import schema

    if not schema_available():
        pytest.skip("SGLang's schema (sglang --no-deps) is not installed")
    schema.load_api_types.cache_clear()  # load it afresh here, whatever loaded it before
    api = schema.load_api_types()
    auth = schema.load_sglang_file("srt/utils/auth.py")
    assert [name for name in sys.modules if name.startswith("_slime_wf_sglang")] == []
    assert (
        api.GenerateRequest.from_json_value({"text": "hi", "sampling_params": {"max_new_tokens": 2}}).text
        == "hi"
    )
    decision = auth.decide_request_auth(
        method="POST",
        path="/generate",
        authorization_header=None,
        api_key="k",
        admin_api_key=None,
        auth_level=auth.AuthLevel.NORMAL,
    )
    assert not decision.allowed and decision.error_status_code == 401


def test_refuses_a_non_loopback_host_without_a_key(tmp_path):
    from slime_wf.engine_server.args import check_args, parse_args
    from slime_wf.engine_server.server import main

    with pytest.raises(SystemExit, match="--api-key") as refused:
        main(["--model-path", str(tmp_path / "never-loaded"), "--host", "0.0.0.0"])
    assert "0.0.0.0" in str(refused.value)
    for host in ("127.0.0.1", "::1", "localhost"):
        check_args(parse_args(["--model-path", "m", "--host", host]))
    for flag in ("--api-key", "--admin-api-key"):
        check_args(parse_args(["--model-path", "m", "--host", "0.0.0.0", flag, "k"]))


def test_config_file_gives_flags_and_the_command_line_wins(tmp_path):
    from slime_wf.engine_server.args import parse_args

    config = tmp_path / "engine.yaml"
    config.write_text(
        "api-key: from-file\nadmin_api_key: -starts-like-a-flag\nmax-queued-requests: 7\nport: 1234\n"
    )
    args = parse_args(["--model-path", "m", "--config", str(config), "--port", "4321"])
    assert (args.api_key, args.admin_api_key, args.max_queued_requests, args.port) == (
        "from-file",
        "-starts-like-a-flag",
        7,
        4321,
    )
    (tmp_path / "bad.yaml").write_text("no_such_flag: 1\n")
    with pytest.raises(SystemExit):
        parse_args(["--model-path", "m", "--config", str(tmp_path / "bad.yaml")])


def test_a_first_token_that_fails_to_sample_fails_only_its_request(local_engine, reference, monkeypatch):
    """The first tokens of a shared prefill are sampled together; when one request's logit adjuster
    raises there, that request alone is answered with an error and the others of its prompt finish as a
    plain forward pass says."""
    from slime_wf.engine_server.penalties import LogitAdjuster
    from slime_wf.engine_server.requests import build_request

    apply_ = LogitAdjuster.apply_

    def failing_apply_(self, logits):
        if self.params.presence_penalty == 0.5:  # only the request built to fail has this penalty
            raise RuntimeError("injected sampling fault")
        return apply_(self, logits)

    monkeypatch.setattr(LogitAdjuster, "apply_", failing_apply_)
    prompt = prompt_of(6, seed=410)
    greedy = {"temperature": 0, "ignore_eos": True, "max_new_tokens": 5}
    bodies = [
        {"rid": "bad-sample", "input_ids": prompt, "sampling_params": {**greedy, "presence_penalty": 0.5}},
        *(
            {"rid": f"good-{i}", "input_ids": prompt, "return_logprob": True, "sampling_params": greedy}
            for i in range(2)
        ),
    ]
    local_engine.pause("in_place")  # all three admitted in one step: one shared prefill
    futures = [local_engine.submit(build_request(body, local_engine)) for body in bodies]
    local_engine.resume()
    bad, *good = [f.result(REQUEST_TIMEOUT) for f in futures]

    assert bad["meta_info"]["finish_reason"]["status_code"] == 500
    assert "injected sampling fault" in bad["meta_info"]["finish_reason"]["message"]
    for out in good:
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}
        reference.assert_greedy(prompt, out)
    assert local_engine._active_rids == {}


def test_the_engine_threads_sleep_between_steps_unless_told_otherwise():
    """`python -m slime_wf.engine_server` sets OMP_WAIT_POLICY=PASSIVE before torch loads OpenMP (spinning
    engine threads took the cores of the campaign's other processes), and keeps a value the caller set."""
    probe = "import os, slime_wf.engine_server.__main__, torch; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    for given, seen in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        run_env = env if given is None else {**env, "OMP_WAIT_POLICY": given}
        out = subprocess.run(
            [sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip() == seen


def test_a_forward_pass_gets_the_threads_its_size_is_worth(served_model):
    """A prompt's prefill of 16 tokens gets both threads where 8 tokens' arithmetic earns one, a one-token
    decode step gets one; `min_gflop_per_thread` 0 gives every pass all threads; the engine leaves torch's
    process-wide thread count as it found it."""
    from slime_wf.engine_server.engine import LocalEngine
    from slime_wf.engine_server.model import ThreadBudget, load_model
    from slime_wf.engine_server.sampling import Request, SamplingParams

    flop_per_token = ThreadBudget(load_model(served_model, torch.float32), 2, 0).flop_per_token
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for min_gflop, expected in ((flop_per_token * 8 / 1e9, [2, 1, 1]), (0.0, [2, 2, 2])):
            engine = LocalEngine(str(served_model), min_gflop_per_thread=min_gflop)
            engine.start()
            try:
                assert engine.ready.wait(60) and engine.load_error is None
                assert engine.model is not None
                seen: list[tuple[int, int]] = []  # (tokens, threads) per forward pass

                def record(_module, _args, kwargs, seen=seen):
                    seen.append((kwargs["input_ids"].numel(), torch.get_num_threads()))

                engine.model.register_forward_pre_hook(record, with_kwargs=True)
                params = SamplingParams.from_request(
                    {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}, engine.vocab_size
                )
                req = Request(rid="threads", input_ids=prompt_of(16, seed=5), params=params)
                engine.submit(req).result(timeout=REQUEST_TIMEOUT)
            finally:
                engine.shutdown()
            assert [tokens for tokens, _ in seen] == [16, 1, 1]
            assert [threads for _, threads in seen] == expected, min_gflop
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
