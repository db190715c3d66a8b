"""The static KV cache (fixed buffers, whole-buffer mask) and the compiled decode step of generate.

The static cache must give the plain cache's logits step by step (same attention code, a mask instead of
a slice), and generate's greedy tokens must not change with ``static_cache=True`` or ``compile=True``.
``torch.compile`` runs ONCE here (module fixture ``compiled``), on the shipped tiny text model; the MoE and VL
models compile in ``test_compiled_moe.py`` (compile=True no longer refuses them).
"""

import contextlib
import io
from pathlib import Path

import pytest
import torch

import ernie_lab
from ernie_lab.model.kv_cache import KVCache, StaticKVCache
from conftest import micro_model, micro_moe, refused, tiny_vl_picture_prompt

DATA = Path(__file__).resolve().parent.parent / "data"


def step_by_step(model, cache, ids, mask, steps=4):
    """Logits of a prefill then ``steps`` one-token steps (the tokens fixed, the mask growing)."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = [model(ids, attention_mask=mask, cache=cache, position_ids=positions).logits]
    for t in range(steps):
        mask = torch.cat([mask, mask.new_ones(len(ids), 1)], 1)
        token = torch.full((len(ids), 1), 3 + t)
        outs.append(model(token, attention_mask=mask, cache=cache, position_ids=positions[:, -1:] + 1 + t).logits)
    return outs


def test_static_cache_gives_the_plain_caches_logits_with_left_padding():
    model = micro_model(seed=1).eval()
    ids = torch.tensor([[0, 0, 5, 9, 11], [7, 8, 9, 10, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        plain = step_by_step(model, KVCache.for_model(model, 2, 16), ids, mask)
        static = step_by_step(model, KVCache.for_model(model, 2, 16, static=True), ids, mask)
    for a, b in zip(plain, static):
        real = a[:, -1]  # the padding rows' outputs are ignored by both
        assert (real - b[:, -1]).abs().max() < 1e-5
    assert (plain[0][1] - static[0][1]).abs().max() < 1e-5  # the full row: every position


def test_static_cache_grows_past_its_buffer_and_says_so():
    model = micro_model(seed=2).eval()
    ids, mask = torch.tensor([[4, 5, 6]]), torch.ones(1, 3, dtype=torch.long)
    cache = KVCache.for_model(model, 1, 4, static=True)
    with torch.no_grad(), pytest.warns(UserWarning, match="reallocating 8.*recompiles"):
        static = step_by_step(model, cache, ids, mask, steps=3)
        plain = step_by_step(model, KVCache.for_model(model, 1, 4), ids, mask, steps=3)
    assert isinstance(cache, StaticKVCache) and cache.capacity == 8 and cache.length == 6
    assert max((a - b).abs().max() for a, b in zip(plain, static)) < 1e-5


def test_static_cache_greedy_tokens_equal_on_the_tiny_text_model():
    model, tok = ernie_lab.load_model(DATA / "tiny-ernie-text"), ernie_lab.load_tokenizer(DATA / "tiny-ernie-text")
    prompts = [tok.encode("The for statement is used to"), tok.encode("A list")]
    plain = ernie_lab.generate(model, prompts, 10, eos_token_id=[])
    assert torch.equal(plain, ernie_lab.generate(model, prompts, 10, eos_token_id=[], static_cache=True))


def test_static_cache_greedy_tokens_equal_on_a_text_moe():
    model = micro_moe(seed=3, bias=0.1)
    prompts = [[5, 9, 11, 30, 2], [7, 8]]
    plain = ernie_lab.generate(model, prompts, 8, eos_token_id=[])
    assert torch.equal(plain, ernie_lab.generate(model, prompts, 8, eos_token_id=[], static_cache=True))


def test_static_cache_greedy_tokens_equal_on_the_tiny_vl_model_after_a_picture():
    model, ids, prompt = tiny_vl_picture_prompt()
    plain = ernie_lab.generate(model, ids, 6, eos_token_id=[], **prompt)
    assert torch.equal(plain, ernie_lab.generate(model, ids, 6, eos_token_id=[], static_cache=True, **prompt))


@pytest.fixture(scope="module")
def compiled():
    """The tiny text model's greedy continuations of a left-padded batch: eager, compiled (first call,
    which compiles), compiled again; and what the compiled calls printed."""
    folder = DATA / "tiny-ernie-text"
    model, tok = ernie_lab.load_model(folder), ernie_lab.load_tokenizer(folder)
    prompts = [tok.encode("The for statement is used to"), tok.encode("A list")]
    eager = ernie_lab.generate(model, prompts, 8, eos_token_id=[])
    printed = []
    for _ in range(2):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            tokens = ernie_lab.generate(model, prompts, 8, eos_token_id=[], compile=True)
        printed.append(out.getvalue())
    return dict(eager=eager, tokens=tokens, printed=printed)


def test_compiled_greedy_tokens_equal_eager(compiled):
    assert torch.equal(compiled["eager"], compiled["tokens"])


def test_compile_time_is_reported_once(compiled):
    first, second = compiled["printed"]
    assert "compiled the decode step of ErnieForCausalLM in" in first and second == ""


def test_each_model_compiles_its_own_copy_of_the_step():
    """Dynamo caches at most 8 graphs per code object: a step shared by every model refused the ninth model
    compiled in one process (benchmarks/quant.py compiles nine). Each model gets a copy with its own code."""
    from ernie_lab.model import fast_decode, fast_prefill
    a, b = fast_decode.compiled_step(micro_model()), fast_decode.compiled_step(micro_model())
    codes = (fast_decode.decode_step, a.step._torchdynamo_orig_callable, b.step._torchdynamo_orig_callable)
    assert len({id(fn.__code__) for fn in codes}) == 3                  # the cache belongs to the object
    copy = fast_decode.own_copy(fast_prefill.prefill_step)
    assert copy.__code__ is not fast_prefill.prefill_step.__code__ and copy.__name__ == "prefill_step"
    assert copy.__code__.co_code == fast_prefill.prefill_step.__code__.co_code


@pytest.mark.parametrize("kwargs, words", [
    (dict(compile="yes"), ("compile", "True or False")),
    (dict(static_cache=1), ("static_cache",)),
    (dict(static_cache=True, kv_cache_dtype="int8"), ("int8", "static")),
])
def test_bad_static_switches(kwargs, words):
    refused(lambda: ernie_lab.generate(micro_model(), [[1, 2]], 2, **kwargs), ernie_lab.InputError, *words)


def test_a_switch_flipped_between_generates_is_seen_by_the_compiled_step():
    """Steps after the first of a generate skip dynamo's full guard check (same_as_last_call); the first step
    of each generate still checks them all, so turning the kit's C kernels off between two calls changes the
    kernels the compiled step runs (no stale graph), and the tokens stay the eager ones."""
    from ernie_lab import quant
    from torch.profiler import profile
    if not quant.native.available():
        pytest.skip("the kit's C kernels could not be built here")
    model = micro_model(seed=3).eval()
    quant.stream_linears(model)                 # the linears on ernie_lab::linear, or F.linear when off
    ids = [[5, 9, 11, 30, 2, 7]]

    def run():
        with profile() as prof:
            tokens = ernie_lab.generate(model, ids, 5, eos_token_id=[], compile=True)
        return tokens, sum(e.count for e in prof.key_averages() if e.key == "ernie_lab::linear")

    eager = ernie_lab.generate(model, ids, 5, eos_token_id=[])
    with contextlib.redirect_stdout(io.StringIO()):
        tokens_on, c_calls_on = run()
        with quant.native.off():
            tokens_off, c_calls_off = run()
        tokens_again, c_calls_again = run()
    assert c_calls_on > 0 and c_calls_off == 0 and c_calls_again > 0
    assert torch.equal(tokens_on, eager) and torch.equal(tokens_again, eager) and torch.equal(tokens_off, eager)


def test_the_cpu_step_is_compiled_with_the_cpp_wrapper_unless_switched_off(monkeypatch):
    """On CPU inductor writes the step's wrapper in C++ (built apart from the kernels, at -O1): about 1 ms a
    token off the 0.3B's step. ERNIE_LAB_CPP_WRAPPER=0 (read at import: fast_decode.CPP_WRAPPER) keeps Python's."""
    from ernie_lab.model import fast_decode
    model = micro_model()
    cpp = {"cpp_wrapper": True, "cpp_wrapper_build_separate": True}
    assert fast_decode.wrapper_options(model) == cpp and fast_decode.compiled_step(model).options == cpp
    monkeypatch.setattr(fast_decode, "CPP_WRAPPER", False)
    other = micro_model()
    assert fast_decode.wrapper_options(other) == {} and fast_decode.compiled_step(other).options == {}
    meta = micro_model().to("meta")  # not on the CPU: inductor's default wrapper
    monkeypatch.setattr(fast_decode, "CPP_WRAPPER", True)
    assert fast_decode.wrapper_options(meta) == {}


def test_the_python_wrapper_still_compiles_a_step_equal_to_eager(monkeypatch):
    from ernie_lab.model import fast_decode
    monkeypatch.setattr(fast_decode, "CPP_WRAPPER", False)
    model = micro_model(seed=3).eval()
    eager = ernie_lab.generate(model, [[4, 5, 6]], 5, eos_token_id=[])
    with contextlib.redirect_stdout(io.StringIO()):
        compiled = ernie_lab.generate(model, [[4, 5, 6]], 5, eos_token_id=[], compile=True)
    assert fast_decode.compiled_step(model).options == {} and torch.equal(eager, compiled)
