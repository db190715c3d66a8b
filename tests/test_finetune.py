"""SFT with prompt masking, padding with correct attention, the DPO loss and its frozen reference."""

import json
import math
from pathlib import Path

import pytest
import torch

import ernie_lab
from conftest import SMALL_TEXT
from ernie_lab import finetune as ft
from ernie_lab import finetune_data as fd
from ernie_lab import lora
from ernie_lab.model.config import ErnieConfig
from ernie_lab.errors import InputError
from ernie_lab.model.decoder import ErnieForCausalLM

ROOT = Path(__file__).resolve().parents[1]

TINY_TEXT = SMALL_TEXT


@pytest.fixture(scope="module")
def tokenizer():
    from ernie_lab.tiny.tokenizer import TINY_TOKENIZER_DIR

    return ernie_lab.load_tokenizer(TINY_TOKENIZER_DIR)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return ErnieForCausalLM(ErnieConfig.from_dict(TINY_TEXT)).eval()


def labelled_text(tokenizer, example):
    return tokenizer.decode([i for i, l in zip(example["ids"], example["labels"]) if l != -100])


def test_only_assistant_tokens_carry_loss(tokenizer):
    messages = [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "rosso."},
                {"role": "user", "content": "And the square?"}, {"role": "assistant", "content": "verde."}]
    example = ft.conversation_example(tokenizer, messages)
    assert labelled_text(tokenizer, example) == "rosso.<|end_of_sentence|>verde.<|end_of_sentence|>"
    assert tokenizer.decode(example["ids"]) == tokenizer.apply_chat_template(messages, add_generation_prompt=False,
                                                                             tokenize=False)
    assert example["labels"][0] == -100 and len(example["ids"]) == len(example["labels"])
    with pytest.raises(InputError, match="end with an assistant"):
        ft.conversation_example(tokenizer, messages[:1])


def test_vl_conversation_masks_the_picture_and_question(tokenizer):
    from ernie_lab.io.processor import VLProcessor
    from ernie_lab.tiny.models import VL_CONFIG, tiny_config
    from ernie_lab.model.config import VLConfig

    config = VLConfig.from_dict(tiny_config(VL_CONFIG, tokenizer))
    processor = VLProcessor(tokenizer, config=config)
    item = fd.instruction_set(1, images=True)[0]
    example = ft.conversation_example(tokenizer, item["messages"], processor)
    assert example["pixel_values"].shape[0] > 0 and example["image_grid_thw"].shape == (1, 3)
    assert labelled_text(tokenizer, example) == fd.italian_answer(item["qa"]) + "<|end_of_sentence|>"
    assert config.image_token_id in example["ids"]


def test_padding_does_not_change_the_loss(tokenizer):
    model = tiny_model()
    data = fd.instruction_set(4, seed=3)
    short = ft.conversation_example(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "blu."}])
    long = ft.conversation_example(tokenizer, data[0]["messages"])
    batch = ft.collate([short, long], tokenizer.pad_token_id or 0)
    assert batch["attention_mask"][0].sum() == len(short["ids"]) < batch["input_ids"].shape[1]
    with torch.no_grad():
        alone = ft.sequence_logps(model, ft.collate([short], 0))
        padded = ft.sequence_logps(model, batch)
    assert abs(alone.item() - padded[0].item()) < 1e-4


def test_sft_batches_are_deterministic_and_split_by_rank(tokenizer):
    convs = [x["messages"] for x in fd.instruction_set(10)]
    batches = ft.sft_batches(tokenizer, convs, batch_size=2, seed=1)
    assert torch.equal(batches(3)["input_ids"], batches(3)["input_ids"])
    a, b = batches(0, 0, 2), batches(0, 1, 2)
    assert not torch.equal(a["input_ids"][:, :10], b["input_ids"][:, :10])


def test_dpo_loss_formula():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]))
    loss, m = ft.dpo_loss(pc, pr, rc, rr, beta=0.5)
    margins = torch.tensor([0.5 * (1 - -1), 0.5 * (0 - 1)])
    assert abs(loss.item() - (-torch.nn.functional.logsigmoid(margins).mean().item())) < 1e-6
    assert m["accuracy"] == 0.5 and abs(m["reward_margin"] - margins.mean().item()) < 1e-6


def test_dpo_reference_is_the_model_with_adapters_off(tokenizer):
    model = lora.apply_lora(tiny_model())
    pairs = fd.preference_pairs(8)
    batches = ft.dpo_batches(tokenizer, pairs, batch_size=4)
    loss, metrics = ft.dpo_batch_loss(model, batches(0))
    assert abs(loss.item() - math.log(2)) < 1e-5 and metrics["reward_margin"] == 0.0  # B = 0: policy = reference
    log = ft.train_steps(model, batches, steps=12, lr=5e-3, objective="dpo", log_every=1)
    assert log[-1]["reward_margin"] > log[0]["reward_margin"] and log[-1]["accuracy"] > 0.5
    base = tiny_model()
    with torch.no_grad():
        assert torch.allclose(ft.reference_logps(model, batches(1)), ft.sequence_logps(base, batches(1)), atol=1e-4)


def test_full_weight_dpo_needs_cached_reference(tokenizer):
    model = tiny_model()
    batches = ft.dpo_batches(tokenizer, fd.preference_pairs(8), batch_size=4)
    with pytest.raises(InputError, match="add_reference_logps"):
        ft.dpo_batch_loss(model, batches(0))
    cached = ft.add_reference_logps(model, batches, steps=2)
    log = ft.train_steps(model, cached, steps=4, lr=1e-3, objective="dpo", log_every=1)
    assert log[0]["reward_margin"] == 0.0 and log[-1]["reward_margin"] > 0


def test_sft_with_lora_learns(tokenizer):
    model = lora.apply_lora(tiny_model(), r=4, alpha=8)
    convs = [x["messages"] for x in fd.instruction_set(16)]
    log = ft.train_steps(model, ft.sft_batches(tokenizer, convs, batch_size=8), steps=20, lr=1e-2, log_every=1)
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    with pytest.raises(InputError, match="frozen"):
        frozen = tiny_model().requires_grad_(False)
        ft.train_steps(frozen, ft.sft_batches(tokenizer, convs), steps=1)


def test_sft_runs_on_the_trainer_with_adapter_checkpoints_and_resumes(tokenizer, tmp_path):
    from ernie_lab.train import checkpoints

    convs = [x["messages"] for x in fd.instruction_set(24)]
    held = [x["messages"] for x in fd.instruction_set(8, split="val")]
    config = ft.sft_config(lr=1e-2, max_steps=6, checkpoint_every=3, out_dir=str(tmp_path), seed=2)
    whole = lora.apply_lora(tiny_model(), r=4, alpha=8)
    history = ft.sft(whole, tokenizer, convs, config, batch_size=4, eval_conversations=held)
    losses = [h["loss"] for h in history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "eval_loss" in history[-1] and math.isfinite(history[-1]["eval_loss"])
    (step3, folder3), (step6, _) = checkpoints(tmp_path)
    assert (step3, step6) == (3, 6) and (folder3 / "adapter_model.safetensors").stat().st_size < 100_000
    assert not list(folder3.glob("model*.safetensors"))                  # the adapter, not the whole model
    resumed = lora.apply_lora(tiny_model(), r=4, alpha=8)
    again = ft.FineTuner(resumed, ft.sft_batches(tokenizer, convs, 4),
                         ft.sft_config(lr=1e-2, max_steps=6, seed=2), eval_data=None).resume(folder3)
    assert again.step == 3
    again.fit()
    for name, layer in lora.lora_layers(whole).items():
        assert torch.allclose(layer.lora_B.weight, lora.lora_layers(resumed)[name].lora_B.weight, atol=1e-6), name


def test_qlora_trains_adapters_on_a_frozen_int4_base(tokenizer, tmp_path):
    from ernie_lab import quant

    model = quant.quantize(tiny_model(), "w4a16")
    layers = quant.quantized_layers(model)
    fp32_bytes = sum(m.in_features * m.out_features * 4 for m in layers.values())   # the same layers in float32
    int4_bytes = sum(quant.weight_bytes(m) for m in layers.values())                # codes + group scales
    weights = {n: m.dequantize().clone() for n, m in quant.quantized_layers(model).items()}
    lora.apply_lora(model, r=4, alpha=8)
    assert lora.trainable_parameters(model) == lora.trainable_parameters(lora.apply_lora(tiny_model(), r=4, alpha=8))
    convs = [x["messages"] for x in fd.instruction_set(16)]
    log = ft.train_steps(model, ft.sft_batches(tokenizer, convs, batch_size=8), steps=20, lr=1e-2, log_every=1)
    assert log[-1]["loss"] < 0.7 * log[0]["loss"]
    for name, layer in quant.quantized_layers(model).items():          # the int4 base never moved
        assert torch.equal(layer.dequantize(), weights[name.removesuffix(".base_layer")]), name
    assert int4_bytes < 0.25 * fp32_bytes
    lora.save_adapter(model, tmp_path / "qlora")
    fresh = lora.load_adapter(quant.quantize(tiny_model(), "w4a16"), tmp_path / "qlora")
    ids = torch.randint(0, 6000, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, fresh(ids).logits, atol=1e-5)
    with pytest.raises(InputError, match="dequantize"):
        lora.merge_lora(model)


def test_english_one_word_answers_and_one_shape_scenes():
    items = fd.instruction_set(20, language="english", max_shapes=1)
    assert all(len(x["scene"].shapes) == 1 for x in items)
    item = items[0]
    assert item["messages"][-1]["content"] == f"{item['qa'].answer_word}." and "one word" in item["messages"][0]["content"]
    assert fd.is_correct(item["qa"], item["messages"][-1]["content"], "english")
    assert not fd.is_correct(item["qa"], item["messages"][-1]["content"])          # not the Italian name
    pair = fd.preference_pairs(2, language="english")[1]
    assert pair["kind"] == "wrong" and pair["rejected"] != pair["chosen"] and pair["chosen"].rstrip(".") in fd.ENGLISH
    with pytest.raises(InputError, match="language"):
        fd.instruction_set(1, language="klingon")


def test_vl_sft_lora_teaches_the_tiny_vl_model_a_new_answer_about_pictures():
    """scripts/finetune_vl_evidence.py in small: before, no reply has the new form; after SFT-LoRA through
    the VL chat template (picture first, loss on the reply only), most held-out replies do."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("vl_evidence", ROOT / "scripts" / "finetune_vl_evidence.py")
    evidence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evidence)
    from ernie_lab.io.processor import VLProcessor

    folder = ROOT / "data" / "tiny-ernie-vl"
    model, tokenizer = ernie_lab.load_model(folder).eval(), ernie_lab.load_tokenizer(folder)
    held_out = evidence.conversations(20, "val", seed=11)
    before, _ = evidence.accuracy(model, tokenizer, held_out)
    lora.apply_lora(model, r=8, alpha=16)
    train = [c["messages"] for c in evidence.conversations(300, "train", seed=3)]
    ft.sft(model, tokenizer, train, ft.sft_config(lr=2e-3, max_steps=40, warmup_steps=5), batch_size=8,
           processor=VLProcessor(tokenizer, config=model.config))
    after, replies = evidence.accuracy(model, tokenizer, held_out)
    assert before == 0.0 and after >= 0.8, (before, after, replies[:4])
    recorded = json.loads((ROOT / "benchmarks" / "results" / "finetune_vl_evidence.json").read_text())
    assert recorded["before"]["accuracy"] == 0.0 and recorded["after_sft"]["accuracy"] >= 0.9
    assert recorded["dpo_after"]["preferred_rate"] >= recorded["dpo_before"]["preferred_rate"] + 0.2  # DPO-LoRA on VL


def test_vl_preference_pairs_differ_in_one_word_of_the_reply():
    import importlib.util

    spec = importlib.util.spec_from_file_location("vl_evidence", ROOT / "scripts" / "finetune_vl_evidence.py")
    evidence = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evidence)
    pairs = evidence.preference_pairs(20, "val", seed=1)
    assert {p["kind"] for p in pairs} == {"count", "background"}
    for p in pairs:
        chosen, rejected = p["chosen"].split(), p["rejected"].split()
        assert len(chosen) == len(rejected) and sum(a != b for a, b in zip(chosen, rejected)) == 1
        assert evidence.is_right(evidence.conversations(20, "val", seed=1)[pairs.index(p)]["scene"], p["chosen"])
