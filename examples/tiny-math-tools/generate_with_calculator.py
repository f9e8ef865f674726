"""A multi-turn tool environment for the tiny-math task: answer, check with a calculator, answer again.

Written as a slime plugin (custom_generate_function_path), with slime's imports: slime-wf resolves
them to its own implementations, so this file runs unchanged under slime and under slime-wf.

Each turn the policy answers `\\boxed{N}`. The environment then calls its calculator tool on the
question; when the answer is wrong, the calculator's result comes back as a user turn
(`3 + 4 = 7`) and the policy answers again, up to MAX_TURNS answers. An answer cut off at
max_new_tokens (each turn has that budget) counts as a wrong one. The tool's tokens are
appended with `trainable=False`: loss mask 0 and log-prob 0.0, so they carry no loss and every
per-token list stays aligned with the response tokens.
"""

import re

from slime.rollout.sglang_rollout import GenerateState
from slime.utils.http_utils import post
from slime.utils.types import Sample

MAX_TURNS = 2
QUESTION = re.compile(r"what is (\d+) \+ (\d+) \?")
BOXED = re.compile(r"\\boxed\{(\d*)\}")


def calculator(expression: str) -> str:
    """The tool: evaluates `a + b` over non-negative integers."""
    left, _, right = expression.partition("+")
    return str(int(left) + int(right))


def final_answer(text: str) -> str | None:
    answers = BOXED.findall(text)
    return answers[-1] if answers else None


async def generate(args, sample: Sample, sampling_params) -> Sample:
    state = GenerateState(args)
    url = f"http://{args.sglang_router_ip}:{args.sglang_router_port}/generate"

    prompt = sample.prompt
    if isinstance(prompt, list):
        prompt = state.tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    question = QUESTION.search(prompt)
    # A continued partial sample starts over: its earlier turns came from older weights.
    sample.tokens = state.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sample.response, sample.response_length = "", 0
    sample.loss_mask, sample.rollout_log_probs = None, None

    turns = 0
    for turn in range(MAX_TURNS):
        payload = {"input_ids": sample.tokens, "sampling_params": sampling_params, "return_logprob": True}
        output = await post(url, payload)
        meta = output["meta_info"]
        if meta["finish_reason"]["type"] == "abort":
            sample.status = Sample.Status.ABORTED
            return sample
        pairs = meta["output_token_logprobs"]
        sample.append_response_tokens(
            args,
            tokens=[item[1] for item in pairs],
            log_probs=[item[0] for item in pairs],
            trainable=True,
            meta_info=meta,
            text=output["text"],
        )
        turns = turn + 1
        if question is None or turn == MAX_TURNS - 1:
            break
        expression = f"{question.group(1)} + {question.group(2)}"
        result = calculator(expression)
        if final_answer(output["text"]) == result:
            break
        observation = (
            f"<|im_end|>\n<|im_start|>user\n{expression} = {result}<|im_end|>\n<|im_start|>assistant\n"
        )
        observation_ids = state.tokenizer(observation, add_special_tokens=False)["input_ids"]
        sample.append_response_tokens(args, tokens=observation_ids, trainable=False, text=observation)

    sample.metadata["turns"] = turns
    return sample
