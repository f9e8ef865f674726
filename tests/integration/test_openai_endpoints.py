"""The local engine's OpenAI-compatible endpoints, driven by the `openai` client and checked against
SGLang 0.5.23's own pydantic protocol (`srt/entrypoints/openai/protocol.py`), and against the
native `/generate` answer for the same tokens (so the mapping of every field is checked too)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import urllib.request
from pathlib import Path

import pytest
from test_local_server import REQUEST_TIMEOUT, call, generate, start_server, stop_server

pytestmark = pytest.mark.slow

MESSAGES = [
    {"role": "system", "content": "answer the question"},
    {"role": "user", "content": "what is one plus two"},
]


@pytest.fixture(scope="module")
def protocol() -> types.ModuleType:
    """SGLang's OpenAI protocol module, loaded by path. Its one import of SGLang's runtime (a helper that
    turns a JSON schema into a string) is replaced by its pure-Python equivalent."""
    spec = importlib.util.find_spec("sglang")
    if spec is None:
        pytest.skip("sglang (its schema) is not installed")
    roots = list(spec.submodule_search_locations or [])
    path = next(Path(r) / "srt/entrypoints/openai/protocol.py" for r in roots)
    source = path.read_text()
    line = "from sglang.utils import convert_json_schema_to_str"
    assert source.count(line) == 1, "SGLang's protocol imports changed: revisit this loader"
    source = source.replace(
        line,
        "def convert_json_schema_to_str(s):\n    import json\n    return s if isinstance(s, str) else json.dumps(s)\n",
    )
    module = types.ModuleType("_sglang_openai_protocol")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module  # pydantic resolves the postponed annotations through it
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> Path:
    from helpers.tiny_models import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("openai-model"), max_positions=1024)
    # The checkpoint recommends greedy decoding: chat requests that set no sampling parameters use it.
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "top_k": 1}))
    return model


@pytest.fixture(scope="module")
def tokenizer(served_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(served_model)


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    proc, url = start_server(served_model, tmp_path_factory.mktemp("logs") / "server.log")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0)


def post(url: str, path: str, body: dict) -> dict:
    status, out = call(url, path, body)
    assert status == 200, out
    return out


def sse_events(url: str, path: str, body: dict) -> list:
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        lines = [line.decode().strip() for line in resp]
    data = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def test_completions_match_generate_and_sglangs_schema(server, client, protocol, tokenizer):
    body = {
        "model": "default",
        "prompt": "what is one plus two",
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": 2,
    }
    protocol.CompletionRequest.model_validate(body)
    raw = post(server, "/v1/completions", body)
    protocol.CompletionResponse.model_validate(raw)
    native = generate(
        server,
        {
            "text": body["prompt"],
            "sampling_params": {"max_new_tokens": 6, "temperature": 0},
            "return_logprob": True,
            "top_logprobs_num": 2,
            "return_text_in_logprobs": True,
        },
    )
    meta = native["meta_info"]
    (choice,) = raw["choices"]
    assert choice["text"] == native["text"]
    assert choice["logprobs"]["token_logprobs"] == [e[0] for e in meta["output_token_logprobs"]]
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in native["output_ids"]]
    assert choice["logprobs"]["top_logprobs"] == [
        {e[2]: e[0] for e in row} for row in meta["output_top_logprobs"]
    ]
    assert choice["finish_reason"] == meta["finish_reason"]["type"]
    assert raw["usage"]["prompt_tokens"] == len(tokenizer.encode(body["prompt"]))
    assert raw["usage"]["completion_tokens"] == len(native["output_ids"])
    assert raw["metadata"]["weight_version"] == meta["weight_version"]

    answer = client.completions.create(**body)
    assert answer.choices[0].text == native["text"]
    assert answer.choices[0].logprobs.token_logprobs == choice["logprobs"]["token_logprobs"]
    assert answer.usage.total_tokens == raw["usage"]["total_tokens"]


def test_chat_renders_the_chat_template_and_returns_logprobs(server, client, protocol, tokenizer):
    body = {
        "model": "tiny",
        "messages": MESSAGES,
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 2,
    }
    protocol.ChatCompletionRequest.model_validate(body)
    raw = post(server, "/v1/chat/completions", body)
    protocol.ChatCompletionResponse.model_validate(raw)
    ids = tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    native = generate(
        server,
        {
            "input_ids": list(ids),
            "sampling_params": {"max_new_tokens": 6, "temperature": 0},
            "return_logprob": True,
            "top_logprobs_num": 2,
            "return_text_in_logprobs": True,
        },
    )
    meta = native["meta_info"]
    (choice,) = raw["choices"]
    assert raw["model"] == "tiny" and raw["object"] == "chat.completion"
    assert choice["message"] == {"role": "assistant", "content": native["text"], "reasoning_content": None}
    content = choice["logprobs"]["content"]
    assert [c["logprob"] for c in content] == [e[0] for e in meta["output_token_logprobs"]]
    assert [c["token"] for c in content] == [tokenizer.decode([t]) for t in native["output_ids"]]
    assert all(c["bytes"] == list(c["token"].encode()) for c in content)
    assert [[t["logprob"] for t in c["top_logprobs"]] for c in content] == [
        [e[0] for e in row] for row in meta["output_top_logprobs"]
    ]
    assert raw["usage"]["prompt_tokens"] == len(ids)

    answer = client.chat.completions.create(**body)
    assert answer.choices[0].message.content == native["text"]
    assert [c.logprob for c in answer.choices[0].logprobs.content] == [c["logprob"] for c in content]


def test_chat_takes_unset_sampling_parameters_from_generation_config(server, tokenizer):
    """SGLang's default `--sampling-defaults model`: this checkpoint's generation_config.json says top_k 1."""
    ids = tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    greedy = generate(server, {"input_ids": list(ids), "sampling_params": {"max_new_tokens": 8, "top_k": 1}})
    body = {"messages": MESSAGES, "max_tokens": 8}
    answers = {
        post(server, "/v1/chat/completions", body)["choices"][0]["message"]["content"] for _ in range(3)
    }
    assert answers == {greedy["text"]}
    sampled = {"messages": MESSAGES, "max_tokens": 8, "top_k": -1, "ignore_eos": True}
    texts = {
        post(server, "/v1/chat/completions", {**sampled, "seed": seed})["choices"][0]["message"]["content"]
        for seed in range(4)
    }
    assert len(texts) > 1, "a request's own top_k must win over the checkpoint's"


def test_streams_carry_the_same_answer_in_sglangs_chunk_shapes(server, client, protocol):
    chat = {
        "model": "default",
        "messages": MESSAGES,
        "max_tokens": 5,
        "temperature": 0,
        "stream_options": {"include_usage": True},
    }
    whole = post(server, "/v1/chat/completions", chat)
    events = sse_events(server, "/v1/chat/completions", {**chat, "stream": True})
    for event in events:
        protocol.ChatCompletionStreamResponse.model_validate(event)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 5

    chunks = list(client.chat.completions.create(**chat, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text

    completion = {"model": "default", "prompt": "one plus", "max_tokens": 4, "temperature": 0}
    events = sse_events(server, "/v1/completions", {**completion, "stream": True})
    for event in events:
        protocol.CompletionStreamResponse.model_validate(event)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**completion, stream=True))
    assert streamed == post(server, "/v1/completions", completion)["choices"][0]["text"]


def test_n_samples_and_prompt_lists_fan_out_into_choices(server, tokenizer):
    prompts = ["what is one", tokenizer.encode("two plus two")]
    body = {"prompt": prompts, "n": 2, "max_tokens": 4, "temperature": 1.0, "ignore_eos": True}
    raw = post(server, "/v1/completions", body)
    assert [c["index"] for c in raw["choices"]] == [0, 1, 2, 3]
    assert raw["usage"]["prompt_tokens"] == len(tokenizer.encode(prompts[0])) + len(prompts[1])
    assert raw["usage"]["completion_tokens"] == 16

    seeded = {"prompt": "what is one", "max_tokens": 6, "temperature": 1.0, "seed": 7, "ignore_eos": True}
    first, second = (post(server, "/v1/completions", seeded)["choices"][0]["text"] for _ in range(2))
    assert first == second
    chat = post(server, "/v1/chat/completions", {"messages": MESSAGES, "n": 3, "max_tokens": 3})
    assert len(chat["choices"]) == 3


def test_sglang_sampling_extras_pass_through(server, tokenizer):
    """SGLang's extra request fields reach the sampler: the chat answer equals `/generate` with the same
    parameters on the rendered prompt."""
    extras = {"repetition_penalty": 1.7, "frequency_penalty": 0.5, "min_p": 0.1, "top_k": 5, "min_tokens": 3}
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0.9, "seed": 11, **extras}
    raw = post(server, "/v1/chat/completions", {**body, "return_token_ids": True})
    ids = tokenizer.apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    sampling = {
        "max_new_tokens": 8,
        "temperature": 0.9,
        "sampling_seed": 11,
        "min_new_tokens": 3,
        **{k: v for k, v in extras.items() if k != "min_tokens"},
    }
    native = generate(server, {"input_ids": list(ids), "sampling_params": sampling})
    assert raw["choices"][0]["message"]["content"] == native["text"]
    plain = post(
        server,
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": 8, "temperature": 0.9, "seed": 11},
    )
    assert plain["choices"][0]["message"]["content"] != native["text"], "the extras changed nothing"


def test_refusals_are_openai_errors(server, client, protocol):
    import openai

    cases = [
        ("/v1/completions", {"prompt": "one", "echo": True, "logprobs": 1}, "prompt's log-probs"),
        ("/v1/completions", {"prompt": ""}, "Prompt cannot be empty"),
        ("/v1/completions", {"prompt": "one", "regex": "[0-9]"}, "needs a grammar backend"),
        (
            "/v1/chat/completions",
            {"messages": MESSAGES, "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "'image_url' are not supported",
        ),
    ]
    for path, body, needle in cases:
        status, out = call(server, path, body)
        assert status == 400, (body, out)
        protocol.ErrorResponse.model_validate(out)
        assert needle in out["message"], out
    with pytest.raises(openai.BadRequestError, match="prompt's log-probs"):
        client.completions.create(model="default", prompt="one", echo=True, logprobs=1)


def test_models_lists_the_served_checkpoint(server, client, protocol, served_model):
    status, out = call(server, "/v1/models")
    assert status == 200
    listing = protocol.ModelList.model_validate(out)
    assert [card.id for card in listing.data] == [str(served_model)]
    assert listing.data[0].max_model_len == 1024
    assert [m.id for m in client.models.list()] == [str(served_model)]


def test_openai_endpoints_work_through_sglang_router(server, tmp_path):
    """sglang-router forwards `/v1/*` to a worker: agent frameworks can point at the router."""
    import subprocess

    import openai

    from slime_wf import servers
    from slime_wf.servers import free_port

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--worker-urls",
        server,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--policy",
        "round_robin",
        "--prometheus-host",
        "127.0.0.1",
        "--prometheus-port",
        str(free_port()),
    ]
    log = tmp_path / "router.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    router = f"http://127.0.0.1:{port}"
    try:

        def answers() -> bool:
            try:
                return call(router, "/v1/models")[0] == 200
            except OSError:
                return False

        servers.wait_until(answers, "the router to forward /v1/models", timeout_s=60, process=proc)
        client = openai.OpenAI(
            base_url=router + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0
        )
        body = {"model": "default", "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "logprobs": True}
        direct = post(server, "/v1/chat/completions", body)
        routed = client.chat.completions.create(**body)
        assert routed.choices[0].message.content == direct["choices"][0]["message"]["content"]
        assert [c.logprob for c in routed.choices[0].logprobs.content] == [
            c["logprob"] for c in direct["choices"][0]["logprobs"]["content"]
        ]
        streamed = client.chat.completions.create(**body, stream=True)
        assert (
            "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
            == routed.choices[0].message.content
        )
        completion = client.completions.create(
            model="default", prompt="one plus", max_tokens=4, temperature=0
        )
        assert (
            completion.choices[0].text
            == post(server, "/v1/completions", {"prompt": "one plus", "max_tokens": 4, "temperature": 0})[
                "choices"
            ][0]["text"]
        )
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
