"""Real tools read the kit's exports, checked: llama.cpp and transformers decode greedily what ernie-lab decodes.

    python scripts/interop.py        # or `make interop`; writes benchmarks/results/interop.json

Three exports, each written by one ``ernie_lab.save_model`` call (weights, config.json, the tokenizer's
files, chat_template.jinja, generation_config.json):

    tiny-text     the shipped tiny text model (data/tiny-ernie-text), loaded and saved
    merged-lora   the same with the shipped adapter data/adapters/tiny-text-colours-sft merged in
    text-moe      a small random text MoE in ERNIE 4.5 21B-A3B's layout (dense first layer, shared experts,
                  correction biases) on the tiny tokenizer's vocabulary

Each export is read by
  * transformers: ``AutoTokenizer`` renders and encodes the chat prompts (chat_template.jinja, tokenizer
    files) and ``AutoModelForCausalLM.from_pretrained(export).generate(do_sample=False)`` decodes, stopping
    where generation_config.json says;
  * llama.cpp: its own ``convert_hf_to_gguf.py`` converts the export to an f32 GGUF; llama-cpp-python
    tokenizes the prompts with the GGUF's vocabulary and decodes greedily with an f32 KV cache.
Every tool must give exactly the kit's token ids: the prompt's, and the greedy continuation's
(``ernie_lab.generate``, stopping at the tokenizer's stop ids ``</s>`` / ``<|end_of_sentence|>``).
llama.cpp's rows are skipped, with the reason, when llama-cpp-python or the converter source is missing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))
import ernie_lab  # noqa: E402
from ernie_lab import ErnieConfig, ErnieForCausalLM, lora  # noqa: E402
from ernie_lab.model.moe import moe_blocks  # noqa: E402
from llama_cpp_tools import LLAMA_CPP_VERSION, convert_to_gguf, llama_greedy, open_gguf  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "interop.json"
TINY_TEXT = ROOT / "data" / "tiny-ernie-text"
ADAPTER = ROOT / "data" / "adapters" / "tiny-text-colours-sft"
NEW_TOKENS = 24
PROMPTS = [  # chat questions: colours (the adapter's task), scenes, Python help (the tiny model's corpus)
    [{"role": "user", "content": "A red ball is next to a blue cube. What colour is the ball?"}],
    [{"role": "user", "content": "There is a green circle below a yellow square. What colour is the square?"}],
    [{"role": "user", "content": "Describe the picture."}],
    [{"role": "system", "content": "You are a Python tutor."}, {"role": "user", "content": "What does len() return?"}],
    [{"role": "user", "content": "How do I open a file?"}, {"role": "assistant", "content": "Use open()."},
     {"role": "user", "content": "And close it?"}],
    [{"role": "user", "content": "Explain a dictionary in one sentence."}],
]

# A scaled-down ERNIE 4.5 21B-A3B: layer 0 dense, then MoE layers with 2 shared experts. llama.cpp's converter
# writes the shared-expert width as intermediate_size // num_key_value_heads (12288 // 4 = 2 x 1536 in the
# 21B-A3B), so the small model keeps that ratio: 256 // 2 = 2 x 64.
TEXT_MOE = dict(model_type="ernie4_5_moe", vocab_size=6016, hidden_size=128, intermediate_size=256,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                moe_num_experts=8, moe_k=2, moe_intermediate_size=64, moe_num_shared_experts=2,
                moe_layer_start_index=1, rope_theta=500000.0, max_position_embeddings=4096)


# ------------------------------------------------------------------------------------- the exports
def random_text_moe(seed: int = 0, std: float = 0.15) -> ErnieForCausalLM:
    """TEXT_MOE with random matrices N(0, std^2) (std 0.02 gives a model that repeats one token: a weak check),
    routers N(0, 1) and correction biases U(-0.05, 0.05), so tokens route apart; norms stay at one."""
    model = ErnieForCausalLM(ErnieConfig.from_dict(TEXT_MOE)).init_weights(seed=seed).eval()
    generator = torch.Generator().manual_seed(seed)
    draw = lambda shape, scale: torch.randn(shape, generator=generator) * scale  # noqa: E731
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.copy_(draw(param.shape, std))
        for block in moe_blocks(model):
            block.gate.weight.copy_(draw(block.gate.weight.shape, 1.0))
            bias = block.moe_statics.e_score_correction_bias
            bias.copy_(torch.rand(bias.shape, generator=generator) * 0.1 - 0.05)
    return model


def make_exports(work: Path) -> dict[str, tuple[torch.nn.Module, Path]]:
    """name -> (the kit's model, the folder save_model wrote it to)."""
    exports = {}
    tiny = ernie_lab.load_model(TINY_TEXT)
    exports["tiny-text"] = tiny, ernie_lab.save_model(tiny, work / "tiny-text")  # tokenizer found where loaded
    merged = lora.merge_lora(lora.load_adapter(ernie_lab.load_model(TINY_TEXT), ADAPTER), unload=True)
    exports["merged-lora"] = merged, ernie_lab.save_model(merged, work / "merged-lora")
    moe = random_text_moe()
    tokenizer = ernie_lab.load_tokenizer(TINY_TEXT)
    exports["text-moe"] = moe, ernie_lab.save_model(moe, work / "text-moe", tokenizer=tokenizer)
    return exports


# ------------------------------------------------------------------------------------- the decoders
def up_to_stop(tokens: list[int], stop_ids) -> list[int]:
    """``tokens`` up to and including the first stop id."""
    for n, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:n + 1]
    return tokens


def kit_greedy(model, ids: list[int], stop_ids: list[int]) -> list[int]:
    out = ernie_lab.generate(model, torch.tensor([ids]), NEW_TOKENS, eos_token_id=stop_ids)
    return up_to_stop(out[0, len(ids):].tolist(), stop_ids)


def transformers_greedy(hf_model, ids: list[int], stop_ids: list[int]) -> list[int]:
    """transformers' greedy decoding; it stops where the export's generation_config.json says."""
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                do_sample=False, max_new_tokens=NEW_TOKENS)
    return up_to_stop(out[0, len(ids):].tolist(), stop_ids)


# ------------------------------------------------------------------------------------- the checks
def check_transformers(model, folder: Path) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tok = ernie_lab.load_tokenizer(folder)
    theirs = AutoTokenizer.from_pretrained(folder)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts, tokens = [], []
    for messages in PROMPTS:
        ids = tok.apply_chat_template(messages)
        their_ids = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        prompts.append(their_ids == ids)
        ours = kit_greedy(model, ids, tok.stop_token_ids)
        tokens.append(comparison(ours, transformers_greedy(hf_model, ids, tok.stop_token_ids), tok))
    eos = GenerationConfig.from_pretrained(folder).eos_token_id
    return {"tool": "transformers", "model_class": type(hf_model).__name__,
            "prompt_ids_equal": all(prompts), "generation_config_eos": eos,
            "greedy": tokens, "result": verdict(all(prompts) and eos == tok.stop_token_ids, tokens)}


def check_llama_cpp(model, folder: Path, work: Path) -> dict:
    gguf = convert_to_gguf(folder, work / f"{folder.name}-f32.gguf")
    llm = open_gguf(gguf)
    tok = ernie_lab.load_tokenizer(folder)
    prompts, tokens = [], []
    for messages in PROMPTS:
        text = tok.apply_chat_template(messages, tokenize=False)
        ids = tok.encode(text)
        prompts.append(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) == ids)
        ours = kit_greedy(model, ids, tok.stop_token_ids)
        tokens.append(comparison(ours, llama_greedy(llm, ids, NEW_TOKENS, tok.stop_token_ids), tok))
    template = llm.metadata.get("tokenizer.chat_template")
    return {"tool": "llama.cpp", "gguf": f"f32, {gguf.stat().st_size:,} bytes, converted by convert_hf_to_gguf.py",
            "kv_cache": "f32 (type_k = type_v = GGML_TYPE_F32)", "architecture": llm.metadata.get("general.architecture"),
            "prompt_ids_equal": all(prompts), "chat_template_in_gguf": template == tok.chat_template,
            "greedy": tokens, "result": verdict(all(prompts) and template == tok.chat_template, tokens)}


def comparison(ours: list[int], theirs: list[int], tok) -> dict:
    same = ours == theirs
    first = next((n for n, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return {"kit": ours, "tool": theirs, "equal": same, "kit_text": tok.decode(ours),
            **({} if same else {"first_difference_at": first})}


def verdict(files_ok: bool, tokens: list[dict]) -> str:
    equal = sum(t["equal"] for t in tokens)
    return f"{'pass' if files_ok and equal == len(tokens) else 'FAIL'}: {equal}/{len(tokens)} prompts equal"


def llama_cpp_missing() -> str | None:
    """Why llama.cpp cannot be checked here, or None."""
    try:
        importlib.import_module("llama_cpp")
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python==0.3.36 builds it, ~15 min on 2 cores)"
    try:
        from llama_cpp_tools import llama_cpp_source
        llama_cpp_source()
    except Exception as err:  # offline without the sdist, or pip failed
        return f"llama.cpp's converter source could not be fetched ({type(err).__name__}: {str(err)[:200]})"
    return None


def versions() -> dict:
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import llama_cpp
        out["llama-cpp-python"] = llama_cpp.__version__
    except ImportError:
        out["llama-cpp-python"] = f"not installed (the bench extra pins {LLAMA_CPP_VERSION})"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    rows, missing = [], llama_cpp_missing()
    with tempfile.TemporaryDirectory(prefix="interop-") as tmp:
        for name, (model, folder) in make_exports(Path(tmp)).items():
            row = {"export": name, "files": sorted(p.name for p in folder.iterdir()),
                   "checks": [check_transformers(model, folder)]}
            row["checks"].append({"tool": "llama.cpp", "result": f"skipped: {missing}"} if missing
                                 else check_llama_cpp(model, folder, Path(tmp)))
            rows.append(row)
            for check in row["checks"]:
                print(f"{name:12s} {check['tool']:12s} {check['result']}")
    report = {"what": "greedy token ids (prompt and continuation, up to the first stop id, at most "
                      f"{NEW_TOKENS} new) of each tool on the kit's exports, against ernie_lab.generate",
              "prompts": PROMPTS, "exports": rows, "versions": versions(),
              "date": datetime.date.today().isoformat()}
    args.out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    if any("FAIL" in check["result"] for row in rows for check in row["checks"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
