"""Sampling options and streaming of ernie_lab.generate."""

import pytest
import torch

import ernie_lab
from ernie_lab.model.generation import pick_next_token


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return ernie_lab.load_model(tiny_checkpoint[1])


def test_top_k_1_is_greedy(model):
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    greedy = ernie_lab.generate(model, ids, 8, eos_token_id=[])
    sampled = ernie_lab.generate(model, ids, 8, temperature=1.0, top_k=1, eos_token_id=[])
    assert torch.equal(greedy, sampled)


def test_sampling_is_reproducible_with_a_generator(model):
    ids = torch.tensor([[4, 8, 15]])
    runs = [ernie_lab.generate(model, ids, 10, temperature=1.5, top_p=0.9, eos_token_id=[],
                               generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*runs)


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    draws = torch.stack([pick_next_token(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(s))
                         for s in range(200)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.5 alone < 0.7; 0.5 + 0.3 reaches it


def test_eos_stops_and_pads_finished_rows(model):
    ids = torch.tensor([[4, 8, 15]])
    free = ernie_lab.generate(model, ids, 6, eos_token_id=[])
    first_new = int(free[0, 3])
    stopped = ernie_lab.generate(model, ids, 6, eos_token_id=first_new)
    assert stopped.shape == (1, 4) and int(stopped[0, -1]) == first_new


def test_streamer_sees_prompt_then_each_token(model):
    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, ids):
            self.chunks.append(ids.flatten().tolist())

        def end(self):
            self.ended = True

    s = Collect()
    out = ernie_lab.generate(model, torch.tensor([[4, 8, 15]]), 5, eos_token_id=[], streamer=s)
    assert s.ended and s.chunks[0] == [4, 8, 15]
    assert sum(s.chunks[1:], []) == out[0, 3:].tolist()


@pytest.mark.parametrize("kwargs, words", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=3, temperature=-1.0), "temperature"),
    (dict(max_new_tokens=3, top_p=0.0), "top_p"),
    (dict(max_new_tokens=3, top_k=0), "top_k"),
    (dict(max_new_tokens=200_000), "context"),
])
def test_bad_generation_arguments(model, kwargs, words):
    n = kwargs.pop("max_new_tokens")
    with pytest.raises(ernie_lab.InputError, match=words):
        ernie_lab.generate(model, torch.tensor([[1, 2]]), n, **kwargs)
