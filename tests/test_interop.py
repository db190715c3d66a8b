"""Real tools read the kit's exports (scripts/interop.py): transformers and llama.cpp decode greedily exactly what
ernie_lab.generate decodes, on the tiny text model, a merged-LoRA export of it and a small text MoE.

The transformers part always runs (transformers is a dependency). The llama.cpp part runs where
llama-cpp-python is installed and llama.cpp's converter source is at hand (build/llama-cpp-src, fetched
once by pip, or $LLAMA_CPP_DIR), and skips with the reason elsewhere.
"""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("interop", ROOT / "scripts" / "interop.py")
interop = importlib.util.module_from_spec(spec)
spec.loader.exec_module(interop)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return interop.make_exports(tmp_path_factory.mktemp("interop"))


def assert_all_equal(check: dict) -> None:
    for prompt, row in zip(interop.PROMPTS, check["greedy"]):
        assert row["equal"], f"{check['tool']} differs on {prompt}: kit {row['kit']}, tool {row['tool']}"
    assert check["prompt_ids_equal"], f"{check['tool']} encodes the chat prompts differently"
    assert check["result"].startswith("pass"), check["result"]


@pytest.mark.parametrize("name", ["tiny-text", "merged-lora", "text-moe"])
def test_transformers_generates_the_kits_greedy_tokens(exports, name):
    model, folder = exports[name]
    check = interop.check_transformers(model, folder)
    assert_all_equal(check)
    assert check["generation_config_eos"] == [2, 6000]  # </s> and <|end_of_sentence|>
    assert check["model_class"] == ("Ernie4_5_MoeForCausalLM" if name == "text-moe" else "Ernie4_5ForCausalLM")
    if name == "merged-lora":  # the adapter's one-word answers end at <|end_of_sentence|>: the stop was honoured
        assert all(row["kit"][-1] == 6000 and len(row["kit"]) < interop.NEW_TOKENS for row in check["greedy"])


@pytest.fixture(scope="module")
def llama_cpp_ready():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36 "
                                            "builds it from source, about 15 minutes on 2 cores)")
    missing = interop.llama_cpp_missing()
    if missing:
        pytest.skip(missing)


@pytest.mark.parametrize("name", ["tiny-text", "merged-lora", "text-moe"])
def test_llama_cpp_converts_and_generates_the_kits_greedy_tokens(llama_cpp_ready, exports, name, tmp_path):
    model, folder = exports[name]
    check = interop.check_llama_cpp(model, folder, tmp_path)
    assert_all_equal(check)
    assert check["chat_template_in_gguf"], "the GGUF lacks the export's chat_template.jinja"
    assert check["architecture"] == ("ernie4_5-moe" if name == "text-moe" else "ernie4_5")
