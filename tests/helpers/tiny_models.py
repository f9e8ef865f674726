"""Tiny random causal-LM checkpoints (Qwen3 / Qwen2 / Llama) with a tokenizer, built offline.

Other tests import these helpers to get a real Hugging Face checkpoint directory in
milliseconds: `make_tiny_model(dir)` writes config.json, model.safetensors,
generation_config.json and a word-level tokenizer that transformers' Auto classes load.
"""

from __future__ import annotations

from pathlib import Path

WORDS = (
    "the a of what is plus minus times answer question user assistant system "
    "one two three four five six seven eight nine ten yes no maybe and or not "
    "cat dog sun moon red blue green fast slow up down left right"
).split()
SPECIAL = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def make_tiny_tokenizer(out_dir: str | Path, vocab_size: int | None = None) -> Path:
    """A word-level tokenizer (digits split, specials `<|im_start|>` / `<|im_end|>` = EOS) saved to `out_dir`.

    With `vocab_size`, synthetic words `w<i>` pad the vocabulary to exactly that size, so that a
    model with a realistic vocabulary still decodes every id it can emit.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens = [*SPECIAL, *WORDS, *"0123456789+-*=?"]
    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise ValueError(f"vocab_size={vocab_size} is below the {len(tokens)} base tokens")
        tokens += [f"w{i}" for i in range(vocab_size - len(tokens))]
    vocab = {w: i for i, w in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    return _save_chat_tokenizer(tok, out_dir)


def _save_chat_tokenizer(tok, out_dir: str | Path) -> Path:
    """Save a `tokenizers` tokenizer as a transformers one, with `<|im_start|>` / `<|im_end|>` (= EOS) and
    the chat template."""
    from transformers import PreTrainedTokenizerFast

    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out


def load_safetensors_dir(folder: str | Path) -> dict:
    """Every tensor of a checkpoint folder's *.safetensors shards, by name."""
    from safetensors import safe_open

    tensors = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def tiny_config(
    arch: str,
    vocab_size: int,
    layers: int,
    hidden: int,
    max_positions: int,
    eos_token_id: int,
    heads: int | None = None,
):
    """A small config of the given family with grouped-query attention (2 query heads per KV head).

    `heads` defaults to one per 16 hidden dims.
    """
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    heads = heads or max(2, hidden // 16)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        eos_token_id=eos_token_id,
        pad_token_id=1,
        bos_token_id=None,
        rms_norm_eps=1e-6,
    )
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=hidden // heads, tie_word_embeddings=True)
    if arch == "qwen2":
        return Qwen2Config(**common, tie_word_embeddings=True)
    if arch == "llama":
        return LlamaConfig(**common, tie_word_embeddings=False)
    raise ValueError(f"make_tiny_model: arch={arch!r} is not one of 'qwen3', 'qwen2', 'llama'")


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "qwen3",
    layers: int = 2,
    hidden: int = 64,
    vocab_size: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    heads: int | None = None,
) -> Path:
    """Write a random `arch` checkpoint (float32 safetensors) plus tokenizer into `out_dir` and return it.

    The tokenizer is copied from `tokenizer_dir` when given (its vocabulary sets the model's
    unless `vocab_size` is larger), else built with `make_tiny_tokenizer`. The same `seed` gives the
    same weights.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.save_pretrained(out)
    else:
        make_tiny_tokenizer(out, vocab_size=vocab_size)
        tokenizer = AutoTokenizer.from_pretrained(out)
    vocab = max(len(tokenizer), vocab_size or 0)
    config = tiny_config(
        arch, vocab, layers, hidden, max_positions, eos_token_id=tokenizer.eos_token_id, heads=heads
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Default init (std 0.02) gives near-uniform logits: widen it so greedy choices are well separated.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.5 if "embed" in name or "lm_head" in name else 0.3)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=1)
    model.save_pretrained(out)
    return out


def perturb_checkpoint(src: str | Path, dst: str | Path, seed: int = 1, scale: float = 0.2) -> Path:
    """Copy checkpoint `src` to `dst` with every weight matrix perturbed: same architecture, different outputs."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    for shard in dst.glob("*.safetensors"):
        tensors = load_file(shard)
        for name, t in tensors.items():
            if t.dim() > 1:
                tensors[name] = t + scale * torch.randn(t.shape, generator=gen, dtype=t.dtype)
        save_file(tensors, shard, metadata={"format": "pt"})
    return dst


# Characters that break naive line handling (str.splitlines splits at all of them) or terminals.
HOSTILE_CHARS = ["\u0085", "\u2028", "\u2029", "\x1c", "\x1d", "\x1e", "\x0b", "\x0c", "\r"]


def make_byte_tokenizer(out_dir: str | Path, extra_tokens: list[str] = HOSTILE_CHARS) -> Path:
    """A byte-level BPE tokenizer (GPT-2's byte alphabet, no merges) saved to `out_dir`.

    A random model over it emits arbitrary bytes, which decode to arbitrary Unicode (invalid UTF-8
    becomes U+FFFD), as real byte-level tokenizers do. `extra_tokens` are added as ordinary tokens so
    that a random model emits each of them often.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate([*SPECIAL, *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in extra_tokens])
    return _save_chat_tokenizer(tok, out_dir)
