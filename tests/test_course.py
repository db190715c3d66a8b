"""The course plumbing in ernie_lab.notebook: settings restored even on errors, hooks removed, the
USE_REAL_WEIGHTS switch harmless offline, and the course table numbered without gaps."""

import re

import pytest
import torch

from ernie_lab import attention, notebook


def test_cpu_settings_are_restored_even_when_the_block_fails():
    threads = torch.get_num_threads()
    with pytest.raises(RuntimeError):
        with notebook.cpu_settings(threads=1, flush_denormal=True):
            assert torch.get_num_threads() == 1
            raise RuntimeError("boom")
    assert torch.get_num_threads() == threads
    assert torch.tensor([1e-40]).mul(1.0).item() != 0.0      # denormals are numbers again


def test_rope_layout_swaps_and_restores():
    original = attention.apply_rope
    with pytest.raises(KeyError):
        with notebook.rope_layout(lambda x, cos, sin: x):
            assert attention.apply_rope is not original
            raise KeyError
    assert attention.apply_rope is original


def test_reference_routing_records_and_removes_its_hooks():
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM

    torch.manual_seed(0)
    reference = Ernie4_5_MoeForCausalLM(Ernie4_5_MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, moe_intermediate_size=8, moe_num_experts=4, moe_k=2,
        moe_layer_start_index=1)).eval()
    with torch.no_grad(), notebook.reference_routing(reference) as chosen:
        reference(torch.randint(0, 64, (1, 5)))
    assert list(chosen) == [(1, 0)] and chosen[1, 0][0].shape == (5, 2)
    assert all(not m._forward_hooks for m in reference.modules())


def test_use_real_weights_offline_says_so_and_returns_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("ERNIE_LAB_WEIGHTS_0_3B", raising=False)
    assert notebook.cached_model("baidu/ERNIE-4.5-0.3B-PT") == (None, None)
    assert "not cached on this machine" in capsys.readouterr().out


def test_use_real_weights_passes_load_options_through(monkeypatch, tmp_path, capsys):
    """A lecturer's folder (here the shipped tiny model) loads with the options a notebook gives: the MoE
    notebooks round the 21B-A3B / VL-28B-A3B experts to int4 as they are read, so a laptop holds them."""
    from ernie_lab import quant
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setenv("ERNIE_LAB_WEIGHTS_0_3B", str(notebook.repo_path("data", "tiny-ernie-text")))
    model, tokenizer = notebook.cached_model("baidu/ERNIE-4.5-0.3B-PT", quantize="w8a16")
    assert tokenizer is not None and "loading" in capsys.readouterr().out
    assert quant.quantized_layers(model) and all(layer.scheme == "w8a16" for layer in quant.quantized_layers(model).values())
    plain, _ = notebook.cached_model("baidu/ERNIE-4.5-0.3B-PT")
    assert not quant.quantized_layers(plain)


def test_course_is_numbered_without_gaps_and_covers_the_notebooks():
    numbers = [number for number, *_ in notebook.COURSE]
    assert numbers == [f"{i:02d}" for i in range(len(numbers))]
    present = {p.name[:2] for p in notebook.repo_path("notebooks").glob("[0-9][0-9]_*.py")}
    assert present <= set(numbers)
    assert all(lesson.track in ("dense", "moe", "both") and lesson.minutes >= lesson.core > 0
               for lesson in notebook.COURSE)


def test_expert_columns_put_each_choice_in_its_groups_column():
    from ernie_lab.analysis.routing import LayerRouting

    entry = LayerRouting(layer_idx=1, num_experts=3)
    entry.append(torch.tensor([[0, 2], [1, 0]]), torch.tensor([[0.7, 0.3], [0.6, 0.4]]), torch.zeros(2, 3),
                 torch.tensor([0, 1]))
    columns = notebook.expert_columns(entry, 3)              # (2 tokens, T0 T1 T2 V0 V1 V2)
    assert torch.allclose(columns, torch.tensor([[0.7, 0.0, 0.3, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.4, 0.6, 0.0]]))


NOTEBOOK_SOURCES = sorted(notebook.repo_path("notebooks").glob("[0-9][0-9]_*.py"))


@pytest.mark.parametrize("source", NOTEBOOK_SOURCES, ids=lambda p: p.stem)
def test_every_notebook_ends_with_further_reading_that_cites_the_report(source):
    text = source.read_text()
    assert "# ## Further reading" in text, f"{source.name}: no further reading"
    reading = text.split("# ## Further reading", 1)[1]
    assert "ERNIE_Technical_Report.pdf" in reading, f"{source.name}: the further reading skips the ERNIE 4.5 report"
    assert len(re.findall(r"^# \* ", reading, re.MULTILINE)) >= 3, f"{source.name}: fewer than three sources"


@pytest.mark.parametrize("source", [p for p in NOTEBOOK_SOURCES if "01" <= p.name[:2] <= "08"], ids=lambda p: p.stem)
def test_every_lesson_shows_a_diagram_of_its_idea(source):
    text = source.read_text()
    shown = re.findall(r"\]\(\.\./figures/[\w.-]+\.png\)|\bfigure\(\s*[\"'][\w.-]+\.png", text)
    assert shown, f"{source.name} shows no diagram from figures/"


@pytest.mark.parametrize("source", NOTEBOOK_SOURCES, ids=lambda p: p.stem)
def test_every_notebook_has_the_frame(source):
    text = source.read_text()
    for part in ("**What you will learn:**", "**Time:**", "# ## Key takeaways"):
        assert part in text, f"{source.name} lacks {part!r}"
