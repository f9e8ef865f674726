"""`slime.utils.processing_utils`: tokenizer and processor loading."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def load_tokenizer(name_or_path: str, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained(name_or_path, **kwargs)`, as slime's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path, **kwargs)


def load_processor(name_or_path: str, **kwargs: Any) -> Any:
    """The multimodal processor of a checkpoint, or None for a text-only one (what slime's gives)."""
    from transformers import AutoProcessor, PreTrainedTokenizerBase, ProcessorMixin

    try:
        proc = AutoProcessor.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        logger.debug("no processor for %s: %s", name_or_path, err)
        return None
    if isinstance(proc, PreTrainedTokenizerBase) or not isinstance(proc, ProcessorMixin):
        return None
    return proc


def build_processor_kwargs(multimodal_inputs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Processor keyword arguments: text as lists of ids, each modality as torch tensors."""
    result = dict(multimodal_inputs) if multimodal_inputs else {}
    result["text_kwargs"] = {
        **result.get("text_kwargs", {}),
        "return_tensors": None,
        "return_mm_token_type_ids": False,
    }
    for key in ("audio_kwargs", "images_kwargs", "videos_kwargs"):
        result[key] = {**result.get(key, {}), "return_tensors": "pt"}
    return result


__all__ = ["build_processor_kwargs", "load_processor", "load_tokenizer"]
