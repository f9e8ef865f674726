"""The engine server: a CPU inference server that speaks SGLang's native HTTP API.

    python -m slime_wf.engine_server --model-path DIR [--host H] [--port P]
        [--dtype auto|float32|bfloat16] [--max-running-requests N] [--max-queued-requests N]
        [--api-key KEY] [--admin-api-key KEY] [--config FILE.yaml] [--num-threads N]
        [--min-gflop-per-thread G]

A separate program: the engine fleet (`rollout/engines.py`) starts it by module name, as it starts
`sglang.launch_server`, and talks to it only over HTTP, so the rollout client has one code path for
both. It never imports the rollout side, the trainer or the trainer's weight sync (an import
contract in pyproject.toml).

Serves any Hugging Face causal-LM checkpoint directory (FP8 block-quantized ones are dequantized
on load) with the request and response shapes of SGLang 0.5.23: `/generate`, `/abort_request`,
`/pause_generation`, `/continue_generation`, `/flush_cache`, `/update_weights_from_disk`,
`/health`, `/health_generate`, `/model_info`, `/server_info`, `GET /v1/loads` (`loads`), the
OpenAI-compatible `/v1/completions`, `/v1/chat/completions` and `/v1/models` (`openai_api`), and
the weight-update group endpoints of the `distributed` weight sync (`weight_update`). Every
`/generate` body is checked against SGLang's own schema when it is installed (unknown
`sampling_params` keys are a 400, as in SGLang). A batched `/generate` (`text` or `input_ids` as
a list of prompts; `sampling_params`, `rid`, `return_logprob` and `top_logprobs_num` one for all or
a list of one per prompt) answers the list of the prompts' responses, as SGLang does. Every SGLang sampling parameter works except
those refused below, penalties, `min_p`, `min_new_tokens`, `logit_bias`, `stop_regex` and
`top_logprobs_num` included (`penalties`, `sampling`); `custom_params` is accepted as opaque data.

Refused with a 400 naming the field, because this engine cannot do them: constrained decoding
(`json_schema`, `regex`, `ebnf`, `structural_tag`, `choice`), `beam_width`, `watermark`,
`n` > 1 (send the prompt n times in a batched request, each with its own rid; the OpenAI
endpoints fan out `n` themselves), `stream` on `/generate`, multimodal data,
LoRA, sessions and custom logit processors. Other differences from SGLang: no prefix cache
(`cached_tokens` is 0, `/flush_cache` has nothing to drop, but like SGLang it answers 400 while
requests run), no input-token log-probs (`logprob_start_len` is accepted and ignored),
`sampling_seed` always applies (SGLang needs `--enable-deterministic-inference`), penalties count
each output token from the next step on (SGLang's `--disable-overlap-schedule` behaviour), and
OpenAI streams arrive in one piece when the request finishes. `--dtype auto` computes in float32.
`--num-threads` sets torch's threads; they sleep between steps (`OMP_WAIT_POLICY=PASSIVE`, unless
the environment sets another policy) rather than spin on cores the campaign's other processes use.
Waking them costs more than a small forward pass gains, so a pass gets one thread per
`--min-gflop-per-thread` (default 0.5) of its arithmetic, at least one (0: always all of them).

Like SGLang: `--max-queued-requests` bounds the requests waiting for a running slot (no bound by
default); one more gets HTTP 503 (SGLang's "The request queue is full.") with `Retry-After`, which
SGLang does not send. `--api-key` guards every endpoint but `/health*`; `--admin-api-key` guards
the management endpoints (abort, pause, continue, flush, weight updates), which then refuse
`--api-key`; a missing or wrong `Authorization: Bearer` key gets 401 `{"error": "Unauthorized"}`.
`--config FILE.yaml` reads flags from a YAML mapping (command-line flags win), as SGLang's does, so
keys need not show in the process list. The server refuses to listen beyond loopback without a key.
A request that fails inside the engine is answered with HTTP 500 (the others go on), as SGLang
answers a request its scheduler aborted with a 5xx status.

Weight updates (`/update_weights_from_disk`) are swapped in between two decode steps: requests
in flight continue on the new weights, and each response's `meta_info.weight_version` is the
version current when it finished (`meta_info.weight_versions` gives the token spans per version).
Without a `weight_version` in the body the version stays, as in SGLang. See `engine`.

Modules, from the wire inwards:

- `server`: the HTTP endpoints, key checks, `main`; `args`: the command line (SGLang's flag names).
- `schema`: SGLang's own `/generate` schema, loaded from the installed wheel (tests of the rollout
  client check its requests with it too).
- `weight_update`: the engine's end of SGLang's weight-update group (`distributed` weight sync),
  built with `slime_wf.weight_group`, the module the trainer's end uses as well.
- `openai_api`: the OpenAI-compatible endpoints, each turned into `/generate` requests;
  `loads`: `GET /v1/loads`.
- `engine`: the continuous-batching scheduler; `sampling`: validated requests and SGLang's
  sampling; `penalties`: penalties, `min_new_tokens` and `logit_bias` on the logits; `response`:
  SGLang-shaped responses; `model`: checkpoint loading, weight swaps and the batched KV cache.
"""
