"""The local engine's sampling parameters beyond temperature / top-k / top-p, and `GET /v1/loads`.

Penalties, `min_new_tokens`, `min_p` and `logit_bias` are checked against a reference written here
from SGLang 0.5.23's definitions (`srt/sampling/penaltylib/`, `srt/layers/sampler.py`), on the
logits of a plain full forward pass of the same checkpoint:

- `frequency_penalty` subtracts penalty × (times the token was generated), `presence_penalty`
  subtracts the penalty from every generated token, then `repetition_penalty` divides positive and
  multiplies negative logits of generated tokens; the prompt does not count;
- `min_new_tokens` puts -inf on EOS and `stop_token_ids` until that many tokens were generated;
- `logit_bias` is added last; returned log-probs are taken after all of these (SGLang's are);
- `min_p` drops tokens whose probability (after temperature) is below min_p × the top one.
"""

from __future__ import annotations

import ast
import re
import threading
from pathlib import Path

import pytest
import torch
from test_local_server import call, generate, prompt_of, start_server, stop_server

from slime_wf import servers
from slime_wf.engine_server.schema import load_sglang_file

EOS = 3  # the tiny tokenizer's <|im_end|>


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> Path:
    from helpers.tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("sampling-model"), max_positions=1024)


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):
    proc, url = start_server(
        served_model, tmp_path_factory.mktemp("logs") / "server.log", "--max-running-requests", "4"
    )
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def model(served_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(served_model, dtype=torch.float32).eval()


@torch.inference_mode()
def step_logits(model, prompt: list[int], output: list[int]) -> torch.Tensor:
    """[len(output), vocab]: the raw logits each output token was drawn from (full forward, no cache)."""
    logits = model(input_ids=torch.tensor([prompt + output])).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) + len(output) - 1]


def reference_adjust(logits: torch.Tensor, generated: list[int], p: dict) -> torch.Tensor:
    """SGLang's logit adjustments for one step, given the tokens generated before it."""
    out = logits.clone()
    counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=out.numel()).float()
    out -= p.get("frequency_penalty", 0.0) * counts
    out -= p.get("presence_penalty", 0.0) * (counts > 0).float()
    if len(generated) < p.get("min_new_tokens", 0):
        out[[EOS, *p.get("stop_token_ids", [])]] = float("-inf")
    rep = p.get("repetition_penalty", 1.0)
    seen = counts > 0
    out = torch.where(seen & (out < 0), out * rep, torch.where(seen, out / rep, out))
    for token, bias in p.get("logit_bias", {}).items():
        out[int(token)] += bias
    return out


def served_logprobs(out: dict) -> torch.Tensor:
    return torch.tensor([e[0] for e in out["meta_info"]["output_token_logprobs"]])


def expected_greedy(model, prompt: list[int], out: dict, params: dict) -> tuple[list[int], torch.Tensor]:
    """The reference's greedy tokens and log-probs along the served output."""
    raw = step_logits(model, prompt, out["output_ids"])
    tokens, logprobs = [], []
    for k in range(len(out["output_ids"])):
        adjusted = reference_adjust(raw[k], out["output_ids"][:k], params)
        tokens.append(int(adjusted.argmax()))
        logprobs.append(torch.log_softmax(adjusted, -1)[out["output_ids"][k]])
    return tokens, torch.stack(logprobs)


@pytest.mark.slow
@pytest.mark.parametrize(
    "penalties",
    [
        {"repetition_penalty": 1.8},
        {"repetition_penalty": 0.6},
        {"frequency_penalty": 1.5},
        {"presence_penalty": 2.0},
        {"frequency_penalty": 0.7, "presence_penalty": -0.5, "repetition_penalty": 1.3},
    ],
)
def test_penalties_match_sglangs_definition(server, model, penalties):
    prompt = prompt_of(6, seed=7)
    base = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    body = {"input_ids": prompt, "return_logprob": True, "sampling_params": {**base, **penalties}}
    out = generate(server, body)
    tokens, logprobs = expected_greedy(model, prompt, out, penalties)
    assert out["output_ids"] == tokens
    assert torch.allclose(served_logprobs(out), logprobs, atol=1e-4, rtol=0)
    plain = generate(server, {**body, "sampling_params": base})
    assert plain["output_ids"] != out["output_ids"], "the penalty changed nothing: the check proves nothing"


@pytest.mark.slow
def test_the_prompt_is_not_penalized(server, model):
    """SGLang's penalizers count output tokens only: a prompt made of the unpenalized greedy answer
    leaves the first step's logits as they are."""
    prompt = prompt_of(5, seed=3)
    greedy = {"max_new_tokens": 1, "temperature": 0.0}
    first = generate(server, {"input_ids": prompt, "return_logprob": True, "sampling_params": greedy})
    repeat = prompt + first["output_ids"] * 3
    plain = generate(server, {"input_ids": repeat, "return_logprob": True, "sampling_params": greedy})
    penalized = generate(
        server,
        {
            "input_ids": repeat,
            "return_logprob": True,
            "sampling_params": {**greedy, "repetition_penalty": 2.0, "frequency_penalty": 2.0},
        },
    )
    assert penalized["meta_info"]["output_token_logprobs"] == plain["meta_info"]["output_token_logprobs"]


@pytest.mark.slow
def test_min_new_tokens_holds_back_eos_and_stop_tokens(server, model):
    prompt = prompt_of(4, seed=11)
    push_eos = {"max_new_tokens": 12, "temperature": 0.0, "logit_bias": {str(EOS): 60.0}}
    assert generate(server, {"input_ids": prompt, "sampling_params": push_eos})["output_ids"] == [EOS]

    params = {**push_eos, "min_new_tokens": 5}
    out = generate(server, {"input_ids": prompt, "return_logprob": True, "sampling_params": params})
    assert len(out["output_ids"]) == 6 and out["output_ids"][-1] == EOS
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}
    tokens, logprobs = expected_greedy(model, prompt, out, params)
    assert out["output_ids"] == tokens
    assert torch.allclose(served_logprobs(out), logprobs, atol=1e-4, rtol=0)

    stop = 20
    params = {
        "max_new_tokens": 12,
        "temperature": 0.0,
        "logit_bias": {str(stop): 60.0},
        "stop_token_ids": [stop],
    }
    out = generate(server, {"input_ids": prompt, "sampling_params": {**params, "min_new_tokens": 3}})
    assert len(out["output_ids"]) == 4 and out["output_ids"][-1] == stop
    assert stop not in out["output_ids"][:3]


@pytest.mark.slow
def test_min_p_applies_after_penalties_and_temperature_and_logprobs_stay_untruncated(server, model):
    prompt = prompt_of(5, seed=21)
    temperature, min_p, penalty = 2.0, 0.5, {"repetition_penalty": 1.4}

    def run(params: dict, seed: int) -> tuple[dict, torch.Tensor]:
        body = {
            "input_ids": prompt,
            "return_logprob": True,
            "sampling_params": {
                "max_new_tokens": 12,
                "temperature": temperature,
                "ignore_eos": True,
                "sampling_seed": seed,
                **params,
            },
        }
        out = generate(server, body)
        raw = step_logits(model, prompt, out["output_ids"])
        adjusted = torch.stack(
            [reference_adjust(raw[k], out["output_ids"][:k], params) for k in range(len(raw))]
        )
        return out, torch.softmax(adjusted / temperature, -1)

    below = 0
    for seed in range(4):
        out, probs = run({"min_p": min_p, **penalty}, seed)
        chosen = probs.gather(1, torch.tensor(out["output_ids"])[:, None])[:, 0]
        assert bool((chosen >= min_p * probs.max(-1).values).all()), seed
        assert torch.allclose(served_logprobs(out), chosen.log(), atol=1e-4, rtol=0)
        plain, plain_probs = run(penalty, seed)
        plain_chosen = plain_probs.gather(1, torch.tensor(plain["output_ids"])[:, None])[:, 0]
        below += int((plain_chosen < min_p * plain_probs.max(-1).values).sum())
    assert below > 0, "without min_p no draw fell below the threshold: the check proves nothing"


@pytest.mark.slow
def test_top_logprobs_are_the_top_of_the_same_distribution(server, model):
    prompt = prompt_of(5, seed=5)
    params = {"max_new_tokens": 6, "temperature": 0.8, "sampling_seed": 3, "ignore_eos": True}
    body = {"input_ids": prompt, "return_logprob": True, "top_logprobs_num": 3, "sampling_params": params}
    out = generate(server, body)
    ref = torch.log_softmax(step_logits(model, prompt, out["output_ids"]) / 0.8, -1)
    for row, expected in zip(out["meta_info"]["output_top_logprobs"], ref, strict=True):
        values, ids = expected.topk(3)
        assert [e[1] for e in row] == ids.tolist()
        assert torch.allclose(torch.tensor([e[0] for e in row]), values, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_stop_regex_ends_at_the_first_match(server, served_model):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(served_model)
    prompt = prompt_of(6, seed=13)
    params = {"max_new_tokens": 16, "temperature": 0.0, "ignore_eos": True}
    full = generate(server, {"input_ids": prompt, "sampling_params": params})["output_ids"]
    word = tokenizer.decode(full[4:5])
    pattern = rf"(?:{re.escape(word)}|zz+)"
    expected = next(k for k in range(1, len(full) + 1) if re.search(pattern, tokenizer.decode(full[:k])))
    out = generate(server, {"input_ids": prompt, "sampling_params": {**params, "stop_regex": [pattern]}})
    assert out["output_ids"] == full[:expected]
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}
    # SGLang trims the matched text only where the pattern occurs literally: a regex stays in.
    assert out["text"] == tokenizer.decode(full[:expected])


@pytest.mark.slow
def test_custom_params_are_opaque_data(server):
    """slime sends custom_params={"return_top_p_token_ids": true} whenever rollout_top_p < 1."""
    params = {"max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "sampling_seed": 5}
    body = {"input_ids": prompt_of(4, seed=2), "return_logprob": True, "sampling_params": params}
    plain = generate(server, body)
    custom = {**params, "custom_params": {"return_top_p_token_ids": True, "note": [1, "x", None]}}
    with_custom = generate(server, {**body, "sampling_params": custom})
    assert with_custom["output_ids"] == plain["output_ids"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sampling, needle",
    [
        ({"json_schema": '{"type": "object"}'}, "is refused: constrained decoding needs a grammar backend"),
        ({"regex": "[0-9]+"}, "needs a grammar backend"),
        ({"ebnf": 'root ::= "a"'}, "needs a grammar backend"),
        ({"structural_tag": "{}"}, "needs a grammar backend"),
        ({"choice": ["a", "b"]}, "needs a grammar backend"),
        ({"beam_width": 2}, "does not implement beam search"),
        ({"stop_regex": "(unclosed"}, "is not a valid regular expression"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be in (0, 2]"),
        ({"frequency_penalty": 2.5}, "frequency_penalty must be in [-2, 2]"),
        ({"presence_penalty": -3.0}, "presence_penalty must be in [-2, 2]"),
        ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens must be in [0, max_new_tokens(4)]"),
        ({"logit_bias": {"100000": 1.0}}, "logit_bias must has keys in"),
        ({"min_p": 1.5}, "min_p must be in [0, 1]"),
    ],
)
def test_what_the_engine_cannot_do_is_refused_with_400(server, sampling, needle):
    status, out = call(server, "/generate", {"input_ids": [5, 6], "sampling_params": sampling})
    assert status == 400, out
    message = out["error"] if isinstance(out["error"], str) else out["error"]["message"]
    assert needle in message


# ---- GET /v1/loads ---------------------------------------------------------------------------


def sglang_load_snapshot_fields() -> tuple[list[str], dict[str, list[str]]]:
    """SGLang's `LoadSnapshot` core field names and the fields of its section structs, read from its source."""
    tree = ast.parse(load_sglang_file("srt/managers/load_snapshot.py", source_only=True))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

    def fields(name: str) -> list[str]:
        return [
            n.target.id
            for n in classes[name].body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and not n.target.id.isupper()
        ]

    sections = {"memory", "speculative", "lora", "disaggregation", "queues"}
    core = [f for f in fields("LoadSnapshot") if f not in sections]
    return core, {"disaggregation": fields("DisaggregationMetrics"), "queues": fields("QueueMetrics")}


def num_requests_from_load(load) -> int:
    """What slime's abort loop reads (`slime/backends/sglang_utils/server_control.py`)."""
    if isinstance(load, list):
        return sum(num_requests_from_load(item) for item in load)
    if not isinstance(load, dict):
        return 0
    if "loads" in load:
        return num_requests_from_load(load["loads"])
    running, waiting = load.get("num_running_reqs"), load.get("num_waiting_reqs")
    return (running if isinstance(running, int) else 0) + (waiting if isinstance(waiting, int) else 0)


def loads(url: str, query: str = "") -> dict:
    status, body = call(url, "/v1/loads" + query)
    assert status == 200, body
    return body


@pytest.mark.slow
def test_v1_loads_has_sglangs_shape(server):
    core, sections = sglang_load_snapshot_fields()
    body = loads(server)
    assert set(body) == {"timestamp", "version", "accelerator", "num_accelerators", "loads"}
    (load,) = body["loads"]
    assert list(load)[: len(core)] == core
    for field, names in sections.items():
        assert list(load[field]) == names
    only_core = loads(server, "?include=core")["loads"][0]
    assert list(only_core) == core
    assert loads(server, "?dp_rank=1")["loads"] == []
    status, out = call(server, "/v1/loads?include=everything")
    assert status == 400 and "Invalid include sections" in out["message"]
    status, text = call(server, "/v1/loads?format=prometheus")
    assert status == 200 and 'sglang_num_running_reqs{dp_rank="0"} 0' in text


@pytest.mark.slow
def test_v1_loads_counts_running_and_waiting_until_aborted(server):
    """slime's abort loop: abort everything, then poll /v1/loads?include=core until it reads 0."""
    long = {"max_new_tokens": 900, "temperature": 0.0, "ignore_eos": True}
    assert call(server, "/pause_generation", {"mode": "in_place"})[0] == 200
    answers: list = []
    threads = [
        threading.Thread(
            target=lambda i=i: answers.append(
                call(
                    server, "/generate", {"rid": f"load-{i}", "input_ids": [5, 6, 7], "sampling_params": long}
                )
            )
        )
        for i in range(2)
    ]
    for t in threads:
        t.start()
    servers.wait_until(
        lambda: loads(server, "?include=core")["loads"][0]["num_waiting_reqs"] == 2,
        "two waiting requests",
        timeout_s=30,
        interval_s=0.02,
    )
    assert loads(server)["loads"][0]["queues"]["waiting"] == 2
    assert call(server, "/continue_generation", {})[0] == 200
    servers.wait_until(
        lambda: loads(server, "?include=core")["loads"][0]["num_running_reqs"] == 2,
        "two running requests",
        timeout_s=30,
        interval_s=0.02,
    )
    running = loads(server, "?include=core")
    assert num_requests_from_load(running) == 2
    assert running["loads"][0]["num_used_tokens"] >= 2 * 3
    assert call(server, "/abort_request", {"abort_all": True})[0] == 200
    servers.wait_until(
        lambda: num_requests_from_load(loads(server, "?include=core")) == 0,
        "idle",
        timeout_s=30,
        interval_s=0.02,
    )
    for t in threads:
        t.join(30)
    assert [a[1]["meta_info"]["finish_reason"]["type"] for a in answers] == ["abort", "abort"]
