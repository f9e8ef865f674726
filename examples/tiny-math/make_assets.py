"""The ingredients of the tiny-math demo campaign: tokenizer, dataset, and a warm-started tiny Qwen3.

    python examples/tiny-math/make_assets.py --out examples/tiny-math/assets

writes, under --out:

    tokenizer/      a word-level tokenizer with a chat template (digits are single tokens)
    train.jsonl     single-digit additions {"prompt": "what is 3 + 4 ?", "label": "7"}: the RL prompts
    test.jsonl      the additions held out of RL (evaluation prompts)
    base/           the randomly initialized Qwen3 checkpoint
    model/          base/ after a supervised warm start through the project's Megatron trainer
                    (loss_type sft_loss): the policy the campaign starts from
    model-fp8/      model/ cast to block-wise FP8 (SGLang's format) by the converter behind
                    `slime-wf convert-fp8`: the rollout checkpoint of campaign-fp8-slime.yaml,
                    standing in for a published FP8 checkpoint such as Qwen/Qwen3-4B-FP8
    assets.json     the settings each part was made with, and what the warm start reached

How the warm start leaves room for RL, in two phases through the same trainer:

1. `sft_steps` steps on correct answers: the model learns the answer format and every sum;
2. `blur_steps` steps at a low learning rate on answers that are right only `blur_correct_fraction`
   of the time (otherwise a random wrong sum): its answers spread out, so that sampling at
   temperature 1 it is right about 40% of the time, and greedy about 70%.

GRPO's lesson is then clear and quick (sharpen the answers back), and groups of 8 samples mostly
hold right and wrong answers, which is what the dynamic filter keeps. Stopping phase 1 early
instead gives a model that has not learned the sums yet, from which RL with a binary reward learns
far more slowly. Both phases cover all 100 sums; test.jsonl holds sums that RL never trains on, so
an evaluation on it shows whether what RL learned carries over to prompts it did not see.

Everything is seeded; a part is skipped when its outputs exist and were made with the same
settings (its record in assets.json), so running the script twice costs nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("tiny_math.assets")

SPECIAL_TOKENS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
BOXED = "\\boxed{"
# Each pre-token is one of these: `\boxed{`, a word, one digit, one whitespace char, one other char.
PRE_TOKEN_PATTERN = r"\\boxed\{|[A-Za-z]+|\d|\s|[^\sA-Za-z\d]"
WORDS = "what is user assistant system answer the plus minus times".split()
SYMBOLS = [" ", "\n", BOXED, "{", "}", "\\", "+", "-", "*", "=", "?", ".", ",", ":"]
FP8_BLOCK_SIZE = (128, 128)  # slime-wf convert-fp8's default, as in published block-FP8 checkpoints
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything the assets depend on; a change re-makes the parts that use it."""

    seed: int = 0
    max_operand: int = 9  # problems are a + b with 0 <= a, b <= max_operand
    test_fraction: float = 0.2
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    sft_batch_size: int = 64
    sft_steps: int = 400  # phase 1: correct answers only
    sft_lr: float = 3e-3
    blur_steps: int = 45  # phase 2: answers correct only `blur_correct_fraction` of the time
    blur_lr: float = 3e-4
    blur_correct_fraction: float = 0.3

    def part(self, name: str) -> dict[str, Any]:
        """The settings a part depends on (its own and those of the parts it is made from)."""
        fields = {
            "tokenizer": [],
            "dataset": ["seed", "max_operand", "test_fraction"],
            "base": ["seed", "layers", "hidden", "heads"],
        }
        fields["model"] = [
            *fields["dataset"],
            *fields["base"],
            "sft_batch_size",
            "sft_steps",
            "sft_lr",
            "blur_steps",
            "blur_lr",
            "blur_correct_fraction",
        ]
        fields["model_fp8"] = fields["model"]
        extra = {"fp8": ["block", *FP8_BLOCK_SIZE]} if name == "model_fp8" else {}
        return {"version": 2, **{k: getattr(self, k) for k in fields[name]}, **extra}


def _digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


# ---- tokenizer ---------------------------------------------------------------------------------


def build_tokenizer(out_dir: str | Path) -> Path:
    """A word-level tokenizer whose decode gives back the encoded text exactly (a `Fuse` decoder:
    whitespace is made of tokens of its own), so `\\boxed{12}` survives the engine's detokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [*SPECIAL_TOKENS, *SYMBOLS, *WORDS, *"0123456789"]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRE_TOKEN_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


# ---- dataset -----------------------------------------------------------------------------------


def make_problems(settings: Settings) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(train rows, test rows): every a + b, split at random (seeded) into RL and held-out prompts."""
    n = settings.max_operand
    rows = [
        {"prompt": f"what is {a} + {b} ?", "label": str(a + b)} for a in range(n + 1) for b in range(n + 1)
    ]
    random.Random(settings.seed).shuffle(rows)
    n_test = round(len(rows) * settings.test_fraction)
    return rows[n_test:], rows[:n_test]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


# ---- model -------------------------------------------------------------------------------------


def make_base_model(out_dir: str | Path, tokenizer_dir: str | Path, settings: Settings) -> Path:
    """A randomly initialized Qwen3 checkpoint (float32 safetensors) with the tokenizer beside it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen3Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden,
        intermediate_size=settings.hidden * 2,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=max(1, settings.heads // 2),
        head_dim=settings.hidden // settings.heads,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    )
    torch.manual_seed(settings.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def chat_prompt(tokenizer: Any, question: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )


def answer_text(answer: str) -> str:
    return f"{BOXED}{answer}}}"


def sft_batch(
    tokenizer: Any,
    rows: list[dict[str, str]],
    settings: Settings,
    rng: random.Random,
    correct_fraction: float = 1.0,
) -> list:
    """`sft_batch_size` training samples: prompt, then `\\boxed{sum}<|im_end|>` with the right sum
    `correct_fraction` of the time and a random wrong one otherwise."""
    from slime_wf.types import Sample

    largest = 2 * settings.max_operand
    samples = []
    for i in range(settings.sft_batch_size):
        row = rng.choice(rows)
        answer = row["label"]
        if rng.random() >= correct_fraction:
            answer = str(rng.choice([s for s in range(largest + 1) if str(s) != row["label"]]))
        prompt_ids = tokenizer.encode(chat_prompt(tokenizer, row["prompt"]), add_special_tokens=False)
        response_ids = tokenizer.encode(answer_text(answer) + tokenizer.eos_token, add_special_tokens=False)
        samples.append(
            Sample(
                group_index=i,
                index=i,
                prompt=row["prompt"],
                label=row["label"],
                tokens=prompt_ids + response_ids,
                response_length=len(response_ids),
                loss_mask=[1] * len(response_ids),
                reward=0.0,
            )
        )
    return samples


def sft(
    hf_dir: str | Path,
    out_dir: str | Path,
    rows: list[dict[str, str]],
    settings: Settings,
    *,
    steps: int,
    lr: float,
    correct_fraction: float,
    seed: int,
    desc: str,
) -> list[float]:
    """`steps` steps of supervised training of the HF checkpoint `hf_dir` with the project's Megatron
    trainer (loss_type sft_loss, constant lr after a short warmup), exported as an HF checkpoint to
    `out_dir`. Returns the loss of every step."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from slime_wf.training.trainer import Trainer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    args = {
        "loss_type": "sft_loss",
        "rollout_batch_size": settings.sft_batch_size,  # one trainer.train call = one optimizer step
        "n_samples_per_prompt": 1,
        "num_rollout": steps,
        "micro_batch_size": settings.sft_batch_size,
        "lr": lr,
        "lr_warmup_iters": min(10, steps // 2),
        "adam_beta2": 0.99,
        "weight_decay": 0.0,
        "params_dtype": "float32",
        "seed": seed,
    }
    rng = random.Random(seed)
    losses = []
    with Trainer(args, hf_dir) as trainer:
        for step in tqdm(range(steps), desc=desc, leave=False):
            batch = sft_batch(tokenizer, rows, settings, rng, correct_fraction)
            losses.append(float(trainer.train(batch, rollout_id=step)["loss"]))
        trainer.export_hf(out_dir)
    return losses


def warm_start(
    base_dir: str | Path, out_dir: str | Path, rows: list[dict[str, str]], settings: Settings
) -> dict:
    """The two-phase warm start (see the module docstring): correct answers, then blurred ones."""
    out_dir = Path(out_dir)
    sharp_dir = out_dir.with_name(out_dir.name + ".sharp-tmp")
    try:
        sharp = sft(
            base_dir,
            sharp_dir,
            rows,
            settings,
            steps=settings.sft_steps,
            lr=settings.sft_lr,
            correct_fraction=1.0,
            seed=settings.seed + 1,
            desc="warm start 1/2 (correct answers)",
        )
        blur = []
        if settings.blur_steps:
            blur = sft(
                sharp_dir,
                out_dir,
                rows,
                settings,
                steps=settings.blur_steps,
                lr=settings.blur_lr,
                correct_fraction=settings.blur_correct_fraction,
                seed=settings.seed + 2,
                desc="warm start 2/2 (blurred answers)",
            )
        else:
            sharp_dir.rename(out_dir)
    finally:
        shutil.rmtree(sharp_dir, ignore_errors=True)
    return {
        "sft_loss_first": sharp[0],
        "sft_loss_last": sharp[-1],
        "blur_loss_last": blur[-1] if blur else None,
    }


def answer_accuracy(
    model_dir: str | Path,
    rows: list[dict[str, str]],
    *,
    samples_per_prompt: int = 8,
    seed: int = 0,
    max_new_tokens: int = 8,
) -> dict[str, float]:
    """How often the model at `model_dir` answers `rows` right, graded like the campaign (rm_type math):
    `sampled` at temperature 1 (`samples_per_prompt` answers per prompt: the expected raw reward of a
    rollout before filtering), `greedy`, and `greedy_canonical`, the share of greedy answers that are
    exactly `\\boxed{sum}` then EOS."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from slime_wf.rollout.rm_hub.rules import grade

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [chat_prompt(tokenizer, row["prompt"]) for row in rows]
    batch = tokenizer(prompts, add_special_tokens=False, padding=True, return_tensors="pt")
    common = dict(
        max_new_tokens=max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    with torch.inference_mode():
        greedy_ids = model.generate(**batch, do_sample=False, **common)
        sampled_ids = model.generate(
            **batch,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            num_return_sequences=samples_per_prompt,
            **common,
        )
    width = batch["input_ids"].shape[1]

    def texts(ids):
        return tokenizer.batch_decode(ids[:, width:], skip_special_tokens=True)

    greedy = texts(greedy_ids)
    sampled = texts(sampled_ids)
    n = max(len(rows), 1)
    return {
        "sampled": sum(
            grade("math", t, rows[i // samples_per_prompt]["label"]) for i, t in enumerate(sampled)
        )
        / max(len(sampled), 1),
        "greedy": sum(grade("math", t, row["label"]) for t, row in zip(greedy, rows, strict=True)) / n,
        "greedy_canonical": sum(t == answer_text(row["label"]) for t, row in zip(greedy, rows, strict=True))
        / n,
    }


# ---- the script --------------------------------------------------------------------------------


class Manifest:
    """assets.json: per part, the settings it was made with (and what it measured)."""

    def __init__(self, out: Path):
        self.path = out / "assets.json"
        self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def up_to_date(self, name: str, settings: dict[str, Any], outputs: list[Path]) -> bool:
        entry = self.data.get(name) or {}
        return entry.get("digest") == _digest(settings) and all(p.exists() for p in outputs)

    def record(self, name: str, settings: dict[str, Any], **extra: Any) -> None:
        self.data[name] = {"digest": _digest(settings), "settings": settings, **extra}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.path)


def make_assets(out: str | Path, settings: Settings = Settings(), *, measure: bool = True) -> dict[str, Any]:
    """Make (or reuse) every asset under `out`; returns {part: {"seconds", "skipped", ...}}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(out)
    report: dict[str, Any] = {}
    tok_dir, base_dir, model_dir, fp8_dir = out / "tokenizer", out / "base", out / "model", out / "model-fp8"
    train_path, test_path = out / "train.jsonl", out / "test.jsonl"

    def part(name: str, outputs: list[Path], make) -> None:
        wanted = settings.part(name)
        started = time.perf_counter()
        if manifest.up_to_date(name, wanted, outputs):
            report[name] = {"skipped": True, "seconds": 0.0, **manifest.data[name].get("measured", {})}
            return
        logger.info("making %s", name)
        for path in outputs:  # a half-made part from an interrupted run
            if path.is_dir():
                shutil.rmtree(path)
        measured = make() or {}
        manifest.record(name, wanted, measured=measured)
        report[name] = {"skipped": False, "seconds": time.perf_counter() - started, **measured}

    def make_dataset():
        train, test = make_problems(settings)
        write_jsonl(train_path, train)
        write_jsonl(test_path, test)
        return {"train_rows": len(train), "test_rows": len(test)}

    def make_model():
        train, test = make_problems(settings)
        sft = warm_start(base_dir, model_dir, train + test, settings)
        if measure:
            sft["train_accuracy"] = answer_accuracy(model_dir, train)
            sft["test_accuracy"] = answer_accuracy(model_dir, test)
        return sft

    part("tokenizer", [tok_dir], lambda: build_tokenizer(tok_dir) and None)
    part("dataset", [train_path, test_path], make_dataset)
    part("base", [base_dir], lambda: make_base_model(base_dir, tok_dir, settings) and None)

    def make_fp8():
        from slime_wf.checkpoint.fp8_convert import convert_checkpoint

        summary = convert_checkpoint(
            str(model_dir), str(fp8_dir), "block", FP8_BLOCK_SIZE, overwrite=True, progress=False
        )
        return {"fp8_weights": summary.quantized}

    part("model", [model_dir], make_model)
    part("model_fp8", [fp8_dir], make_fp8)
    return report


def print_report(out: Path, report: dict[str, Any]) -> None:
    print(f"assets in {out}:")
    print(f"  {'part':<10} {'seconds':>8}  what")
    for name, entry in report.items():
        status = "(up to date)" if entry["skipped"] else ""
        details = {k: v for k, v in entry.items() if k not in ("skipped", "seconds")}
        print(
            f"  {name:<10} {entry['seconds']:8.1f}  {status} {json.dumps(details, default=_round)}".rstrip()
        )
    print(f"  {'total':<10} {sum(e['seconds'] for e in report.values()):8.1f}")


def _round(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else str(value)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Settings]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", required=True, help="output folder (created; existing up-to-date parts are kept)"
    )
    parser.add_argument(
        "--no-measure", action="store_true", help="skip the accuracy measurement after the warm start"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    for f in dataclasses.fields(Settings):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(f.default),
            default=f.default,
            help=f"(default {f.default})",
        )
    args = parser.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    if settings.sft_steps < 1 or settings.blur_steps < 0:
        parser.error("--sft-steps must be >= 1 and --blur-steps >= 0")
    if not 0 <= settings.blur_correct_fraction <= 1:
        parser.error(f"--blur-correct-fraction={settings.blur_correct_fraction} must be in [0, 1]")
    if not 0 < settings.test_fraction < 1:
        parser.error(f"--test-fraction={settings.test_fraction} must be in (0, 1)")
    if settings.hidden % settings.heads:
        parser.error(f"--hidden={settings.hidden} must be a multiple of --heads={settings.heads}")
    return args, settings


def main(argv: list[str] | None = None) -> int:
    args, settings = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("megatron", "slime_wf.training"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = make_assets(args.out, settings, measure=not args.no_measure)
    print_report(Path(args.out), report)
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
