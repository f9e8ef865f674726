"""The local engine's threads per forward pass (`engine_server.model.ThreadBudget`)."""

import pytest
import torch

from slime_wf.engine_server.model import ThreadBudget


class TinyLM(torch.nn.Module):
    def __init__(self, tied: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 8)
        self.layer = torch.nn.Linear(8, 8)  # 72 parameters
        self.head = torch.nn.Linear(8, 100, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head


def test_a_token_costs_twice_the_parameters_it_is_multiplied_by():
    # the embedding is looked up, not multiplied; a head that shares its matrix still multiplies it
    assert ThreadBudget(TinyLM(tied=False), 4, 1.0).flop_per_token == 2 * (72 + 800)
    assert ThreadBudget(TinyLM(tied=True), 4, 1.0).flop_per_token == 2 * (72 + 800)
    assert ThreadBudget(torch.nn.Linear(8, 8), 4, 1.0).flop_per_token == 2 * 72  # no embeddings at all


def test_one_thread_per_share_of_the_arithmetic_within_one_and_the_maximum():
    budget = ThreadBudget(TinyLM(tied=False), 4, 1e-9 * 1744 * 10)  # a thread per 10 tokens
    assert [budget.threads(n) for n in (1, 9, 10, 19, 20, 35, 1000)] == [1, 1, 1, 1, 2, 3, 4]
    assert ThreadBudget(TinyLM(tied=False), 4, 0).threads(1) == 4  # 0: always all
    assert ThreadBudget(TinyLM(tied=False), 0, 1.0).threads(10**9) == 1


def test_a_negative_share_is_refused():
    with pytest.raises(ValueError, match="min_gflop_per_thread"):
        ThreadBudget(TinyLM(tied=False), 2, -1.0)
