"""Dtype names as settings, HF configs and SGLang's weight-update requests spell them."""

from __future__ import annotations

import pytest
import torch

from slime_wf.checkpoint.dtypes import FLOAT_DTYPES, dtype_name, torch_dtype


def test_torch_names_resolve_and_auto_stands_for_what_the_caller_says():
    assert torch_dtype("bfloat16", "x") is torch.bfloat16
    assert torch_dtype("float8_e4m3fn", "x") is torch.float8_e4m3fn  # any torch dtype without choices
    assert torch_dtype("auto", "x", choices=FLOAT_DTYPES, auto=torch.float32) is torch.float32
    assert torch_dtype("float16", "x", choices=FLOAT_DTYPES) is torch.float16


@pytest.mark.parametrize("name", [*FLOAT_DTYPES, "float8_e4m3fn"])
def test_a_name_round_trips(name):
    assert dtype_name(torch_dtype(name, "x")) == name


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("bf16", {}, r"export dtype 'bf16' is not a torch dtype \(e\.g\. 'bfloat16', 'float32'\)"),
        ("Tensor", {}, "is not a torch dtype"),  # an attribute of torch, but not a dtype
        ("auto", {}, "'auto' is not a torch dtype"),  # only where the caller says what it means
        (
            "float16",
            {"choices": ("float32", "bfloat16"), "auto": torch.float32},
            "export dtype 'float16' is not one of auto, float32, bfloat16",
        ),
    ],
)
def test_a_wrong_name_is_refused_naming_the_setting_and_the_choices(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        torch_dtype(name, "export dtype", **kwargs)


def test_the_settings_use_it():
    from slime_wf.engine_server.model import resolve_dtype
    from slime_wf.training.train_args import params_dtype

    with pytest.raises(ValueError, match="--dtype 'int8' is not one of auto, float32, bfloat16, float16"):
        resolve_dtype("int8")
    assert resolve_dtype("auto") is torch.float32
    with pytest.raises(ValueError, match="params_dtype 'float16' is not one of auto, float32, bfloat16"):
        params_dtype(type("Args", (), {"params_dtype": "float16"})())
