"""ERNIE 4.5 VL end to end: a random transformers model saved with save_pretrained, loaded by ernie_lab.

The reference keeps the real rotary layout (head_dim 128, mrope_section [22, 22, 20]); its routers are
re-initialised to non-zero weights with non-zero correction biases (transformers starts them at zero,
which would route every token alike), and its weights are drawn wider than the default 0.02 so that
greedy decoding does not repeat a single token.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

import ernie_lab

from conftest import reference_vl
from ernie_lab import InputError, routing
from ernie_lab.model.rope3d import modality_types, position_ids_3d, routing_types
from ernie_lab.io.image_processing import preprocess_images, preprocess_video
from ernie_lab.model.vision import tokens_per_item
from ernie_lab.model.vl_model import ErnieVLForConditionalGeneration, VLConfig

IMG, VID = 100295, 103367
IMG_START, IMG_END, VID_START, VID_END = 101304, 101305, 101306, 101307
RNG = np.random.default_rng(7)
NUM_EXPERTS = 4


def picture(height, width, seed=None):
    """A gradient with noise; ``seed``: the noise of its own generator, the same whatever was drawn before
    (without one, the next draw of this module's generator)."""
    rng = RNG if seed is None else np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], -1)
    return Image.fromarray((0.7 * base + 0.3 * rng.integers(0, 256, (height, width, 3))).astype(np.uint8))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers reference, ernie_lab model loaded from its save_pretrained folder)."""
    return build_pair(tmp_path_factory.mktemp("tiny-vl"))


def build_pair(folder, vocab_size=103424, **token_ids):
    """A random reference saved to ``folder`` and our model loaded from there; ``token_ids``: image_token_id=..."""
    reference = reference_vl(vocab_size=vocab_size, num_experts=NUM_EXPERTS, **token_ids)
    reference.save_pretrained(folder)
    return reference, ernie_lab.load_model(folder)


def image_prompt(grids, before=(11, 12, 13), between=(14, 15), after=(16, 17, 18)):
    ids = list(before)
    for k, grid in enumerate(grids):
        ids += [IMG_START] + [IMG] * tokens_per_item(torch.tensor([grid]))[0] + [IMG_END]
        ids += list(between if k < len(grids) - 1 else after)
    return torch.tensor([ids])


def reference_inputs(ids, **pixels):
    return dict(input_ids=ids, mm_token_type_ids=modality_types(ids), moe_mm_token_type_ids=routing_types(ids),
                **pixels)


def reference_router_choices(reference):
    """Forward hooks on every reference router: {(layer, group): [selected experts (n, k)]}."""
    seen = {}
    for idx, layer in enumerate(reference.model.language_model.layers):
        if hasattr(layer.mlp, "text_moe"):
            for group, block in ((0, layer.mlp.text_moe), (1, layer.mlp.vision_moe)):
                seen[idx, group] = []
                block.gate.register_forward_hook(
                    lambda mod, inp, out, key=(idx, group): seen[key].append(out[2].clone()))
    return seen


def compare_forward(pair, ids, **pixels):
    """Logits, 3-D positions and every routing decision of one forward, ours against the reference."""
    reference, model = pair
    choices = reference_router_choices(reference)
    with torch.no_grad():
        expected = reference(**reference_inputs(ids, **pixels)).logits
        with routing.record(model) as record:
            logits = model(ids, **pixels).logits
    for module in reference.modules():  # drop the hooks again
        module._forward_hooks.clear()
    assert (logits - expected).abs().max() < 1e-4
    types = modality_types(ids)
    ref_positions, _ = reference.model.get_rope_index(ids, types, pixels.get("image_grid_thw"),
                                                      pixels.get("video_grid_thw"))
    positions, _ = position_ids_3d(types, pixels.get("image_grid_thw"), pixels.get("video_grid_thw"))
    assert torch.equal(positions, ref_positions)
    vision_rows = routing_types(ids).reshape(-1) > 0
    for entry in record.layers:
        assert torch.equal(entry.modality, vision_rows.long())
        for group, rows in ((0, ~vision_rows), (1, vision_rows)):
            ours = entry.expert_ids[rows]
            theirs = torch.cat(choices[entry.layer_idx, group]) if choices[entry.layer_idx, group] else ours[:0]
            assert torch.equal(ours, theirs), f"layer {entry.layer_idx} group {group}"
            assert ours.numel() == 0 or int(ours.max()) < NUM_EXPERTS  # numbered inside the group
    return record


def greedy_pair(pair, ids, n=10, **pixels):
    reference, model = pair
    reference.model.rope_deltas = None
    expected = reference.generate(**reference_inputs(ids, **pixels), max_new_tokens=n, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    ours = ernie_lab.generate(model, ids, n, eos_token_id=[], **pixels)
    return ours, expected


# ----------------------------------------------------------------------------------------- tests
def test_loads_as_vl_model(pair):
    _, model = pair
    assert isinstance(model, ErnieVLForConditionalGeneration)
    assert model.vl_config.moe_layers == (False, True, True)
    assert model.vl_config.mrope_section == (22, 22, 20)
    moe = model.layers[1].mlp
    assert len(moe.experts) == 2 * NUM_EXPERTS  # text experts, then vision experts
    assert moe.experts[0].up_proj.out_features == 32 and moe.experts[NUM_EXPERTS].up_proj.out_features == 16
    assert moe.moe_statics.e_score_correction_bias.shape == (2, NUM_EXPERTS)


def test_text_image_text_matches_reference(pair):
    batch = preprocess_images([picture(70, 100)])
    ids = image_prompt(batch["image_grid_thw"].tolist())
    record = compare_forward(pair, ids, **batch)
    assert int(record.layers[0].modality.sum()) == tokens_per_item(batch["image_grid_thw"])[0] + 2  # + markers
    reference, model = pair
    with torch.no_grad():  # the vision tower's output on its own
        expected = reference.model.vision_tower(batch["pixel_values"], batch["image_grid_thw"]).last_hidden_state
        ours = model.vision(batch["pixel_values"], batch["image_grid_thw"])
    assert (ours - expected).abs().max() < 1e-4


def test_text_image_text_greedy_decoding_matches_reference(pair):
    batch = preprocess_images([picture(70, 100, seed=5)])      # a picture on which the reference varies its words
    ours, expected = greedy_pair(pair, image_prompt(batch["image_grid_thw"].tolist()), **batch)
    assert len(set(expected[0, -10:].tolist())) > 1, "the reference repeats one token: a weak test"
    assert torch.equal(ours, expected)


def test_two_images_of_different_sizes_match_reference(pair):
    batch = preprocess_images([picture(60, 140), picture(120, 70)])
    assert batch["image_grid_thw"][0].tolist() != batch["image_grid_thw"][1].tolist()
    ids = image_prompt(batch["image_grid_thw"].tolist())
    compare_forward(pair, ids, **batch)
    ours, expected = greedy_pair(pair, ids, **batch)
    assert torch.equal(ours, expected)


def test_short_video_matches_reference(pair):
    frames = np.stack([np.array(picture(56, 84)) for _ in range(4)])
    video = preprocess_video(frames, min_pixels=56 * 84, max_pixels=56 * 84)
    n = tokens_per_item(video["video_grid_thw"])[0]
    ids = torch.tensor([[11, 12, VID_START] + [VID] * n + [VID_END, 13, 14]])
    pixels = dict(pixel_values_videos=video["pixel_values_videos"], video_grid_thw=video["video_grid_thw"])
    compare_forward(pair, ids, **pixels)
    ours, expected = greedy_pair(pair, ids, **pixels)
    assert torch.equal(ours, expected)


def test_text_only_prompt_matches_reference(pair):
    ids = torch.tensor([[11, 12, 13, 14, 15, 16]])
    compare_forward(pair, ids)
    ours, expected = greedy_pair(pair, ids)
    assert torch.equal(ours, expected)


def test_left_padded_batch_equals_single_rows(pair):
    """Two prompts with pictures of different sizes, decoded together, as each alone."""
    _, model = pair
    first, second = preprocess_images([picture(60, 60)]), preprocess_images([picture(90, 120)])
    rows = [image_prompt(first["image_grid_thw"].tolist())[0].tolist(),
            image_prompt(second["image_grid_thw"].tolist(), before=(11,))[0].tolist()]
    pixels = dict(pixel_values=torch.cat([first["pixel_values"], second["pixel_values"]]),
                  image_grid_thw=torch.cat([first["image_grid_thw"], second["image_grid_thw"]]))
    together = ernie_lab.generate(model, rows, 6, eos_token_id=[], **pixels)
    alone = [ernie_lab.generate(model, [row], 6, eos_token_id=[], **batch)[0, -6:]
             for row, batch in zip(rows, (first, second))]
    assert torch.equal(together[0, -6:], alone[0]) and torch.equal(together[1, -6:], alone[1])


def test_bad_inputs_raise_input_error(pair):
    _, model = pair
    batch = preprocess_images([picture(70, 100)])
    ids = image_prompt(batch["image_grid_thw"].tolist())
    with pytest.raises(InputError, match="placeholder tokens but the images give"):
        model(ids[:, 1:-3].roll(1), **preprocess_images([picture(140, 140)]))
    with pytest.raises(InputError, match="no image pixels"):
        model(ids)
    with pytest.raises(InputError, match="need their grid"):
        model(ids, pixel_values=batch["pixel_values"])


def test_config_reads_baidu_flat_layout():
    raw = dict(architectures=["Ernie4_5_VLMoeForConditionalGeneration"], hidden_size=64, intermediate_size=96,
               num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
               vocab_size=103424, moe_num_experts=[4, 4], moe_intermediate_size=[32, 16], moe_k=2,
               moe_num_shared_experts=1, moe_layer_start_index=1, rope_theta=500000, freq_allocation=20,
               im_patch_id=100295, vision_config=dict(depth=2, hidden_size=32, num_heads=2))
    config = VLConfig.from_dict(raw)
    assert config.moe_layers == (False, True, True)
    assert config.mrope_section == (22, 22, 20)
    assert (config.text.moe_intermediate_size, config.vision_moe_intermediate_size) == (32, 16)


# ----------------------------------------------------------------------------------------- processor
from ernie_lab.io.processor import IMAGE_MARKER, VIDEO_MARKER, VLProcessor, format_vl_chat  # noqa: E402


@pytest.fixture(scope="module")
def processor():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the stand-in tokenizer warns that it is not the real vocabulary
        tokenizer = ernie_lab.load_tokenizer()
    return VLProcessor(tokenizer)


def test_chat_format_and_thinking_switch():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    plain = format_vl_chat(messages, enable_thinking=False)
    assert plain == ("<|begin_of_sentence|>Be brief.\nUser: Picture 1:" + IMAGE_MARKER
                     + "What is this?\nAssistant: <think>\n\n</think>\n\n")
    thinking = format_vl_chat(messages, enable_thinking=True)
    assert thinking.endswith("Assistant: <think>\n") and "</think>" not in thinking
    two = format_vl_chat([{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "image"}]}])
    assert "Picture 1:" in two and "Video 1:" in two and "Picture 2:" in two


def test_processor_counts_placeholders_per_picture(processor):
    images = [picture(60, 140), picture(120, 70)]
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "text", "text": "and"},
                                             {"type": "image", "image": images[1]}, {"type": "text", "text": "?"}]}]
    inputs = processor(messages)
    ids = inputs["input_ids"][0]
    counts = tokens_per_item(inputs["image_grid_thw"])
    assert int((ids == IMG).sum()) == sum(counts)
    starts = (ids == IMG_START).nonzero().flatten().tolist()
    assert len(starts) == 2 and ids[starts[0] + 1 + counts[0]] == IMG_END
    assert ids[:1].tolist() == [100273]  # <|begin_of_sentence|>
    # the same pictures passed beside the messages give the same inputs
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                         {"type": "image"}, {"type": "text", "text": "?"}]}]
    again = processor(bare, images=images)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    assert torch.equal(again["pixel_values"], inputs["pixel_values"])
    # the thinking switch changes only the end of the prompt
    thinking = processor(messages, enable_thinking=True)["input_ids"][0]
    common = len(ids) - len(processor.tokenizer.encode("Assistant: <think>\n\n</think>\n\n"))
    assert torch.equal(thinking[:common], ids[:common]) and not torch.equal(thinking, ids)


def test_processor_output_runs_the_model(pair, processor):
    _, model = pair
    frames = np.stack([np.array(picture(56, 84)) for _ in range(3)])  # odd: the last frame is repeated
    processor_small = VLProcessor(processor.tokenizer, video_min_pixels=56 * 84, video_max_pixels=56 * 84)
    messages = [{"role": "user", "content": [{"type": "image", "image": picture(70, 100)},
                                             {"type": "video", "video": frames},
                                             {"type": "text", "text": "Compare them."}]}]
    inputs = processor_small(messages)
    assert inputs["video_grid_thw"].tolist() == [[4, 4, 6]]
    ids = inputs.pop("input_ids")
    out = ernie_lab.generate(model, ids, 3, eos_token_id=[], **inputs)
    assert out.shape == (1, ids.shape[1] + 3)


def test_processor_count_mismatch_raises_input_error(processor):
    with pytest.raises(InputError, match="1 image item.* but 2 image"):
        processor([{"role": "user", "content": [{"type": "image"}]}], images=[picture(56, 56), picture(56, 56)])
    with pytest.raises(InputError, match="2 image placeholder.* but 1 image"):
        processor("Look: " + IMAGE_MARKER + IMAGE_MARKER, images=[picture(56, 56)])
    with pytest.raises(InputError, match="1 video placeholder.* but 0 video"):
        processor("Watch: " + VIDEO_MARKER)
    with pytest.raises(InputError, match="type 'text', 'image' or 'video'"):
        processor([{"role": "user", "content": [{"type": "audio"}]}])


def test_processor_uses_a_checkpoint_template(processor):
    template = ("{% for m in messages %}[{{ m.role }}]{% for item in m.content %}"
                "{% if item.type == 'image_url' %}<|IMAGE_START|><|image@placeholder|><|IMAGE_END|>"
                "{% else %}{{ item.text }}{% endif %}{% endfor %}{% endfor %}"
                "{% if enable_thinking %}<think>{% endif %}")
    tokenizer = processor.tokenizer
    original = tokenizer.chat_template
    try:
        tokenizer.chat_template = template
        text = VLProcessor(tokenizer).render([{"role": "user", "content": [{"type": "image"},
                                                                           {"type": "text", "text": "hi"}]}],
                                             enable_thinking=True)
    finally:
        tokenizer.chat_template = original
    assert text == "[user]" + IMAGE_MARKER + "hi<think>"


# ------------------------------------------------------------------------- a compact vocabulary
from ernie_lab import special_tokens  # noqa: E402
from ernie_lab.io.processor import IDS, picture_token_ids  # noqa: E402


def compact_picture_ids(ids: dict) -> dict:
    """processor key -> id in the compact tokenizer folder (see conftest.compact_tokenizer_folder)."""
    return {key: ids[text] for key, (text, _) in special_tokens.PICTURE_TOKENS.items()}


def picture_chat(image, video=None):
    content = [{"type": "image", "image": image}, *([{"type": "video", "video": video}] if video is not None else []),
               {"type": "text", "text": "What is it?"}]
    return [{"role": "user", "content": content}]


def test_processor_takes_picture_ids_from_a_compact_tokenizer(compact_tokenizer_folder):
    folder, ids = compact_tokenizer_folder
    tokenizer = ernie_lab.load_tokenizer(folder)
    processor = VLProcessor(tokenizer, video_min_pixels=56 * 84, video_max_pixels=56 * 84)
    compact = compact_picture_ids(ids)
    assert processor.ids == compact and set(compact.values()).isdisjoint(IDS.values())
    frames = np.stack([np.array(picture(56, 84))] * 2)
    inputs = processor(picture_chat(picture(70, 100), frames))
    row = inputs["input_ids"][0].tolist()
    image_tokens, video_tokens = (tokens_per_item(inputs[key])[0] for key in ("image_grid_thw", "video_grid_thw"))
    start = row.index(compact["image_start"])
    assert row[start:start + image_tokens + 2] == ([compact["image_start"]] + [compact["image"]] * image_tokens
                                                   + [compact["image_end"]])
    start = row.index(compact["video_start"])
    assert row[start:start + video_tokens + 2] == ([compact["video_start"]] + [compact["video"]] * video_tokens
                                                   + [compact["video_end"]])
    assert row[0] == ids["<|begin_of_sentence|>"] and max(row) < 8192


def test_picture_ids_come_from_token_ids_then_tokenizer_then_config(compact_tokenizer_folder, processor):
    folder, ids = compact_tokenizer_folder
    compact_tokenizer = ernie_lab.load_tokenizer(folder)
    compact = compact_picture_ids(ids)
    config = {config_key: compact[key] for key, (_, config_key) in special_tokens.PICTURE_TOKENS.items()}
    assert picture_token_ids() == IDS == special_tokens.PICTURE_TOKEN_IDS  # nothing known: the big checkpoints'
    assert picture_token_ids(compact_tokenizer, config) == compact        # tokenizer and config agree
    # a tokenizer that knows no picture tokens: the config's ids, then the defaults (Baidu's flat im_patch_id too)
    bare = compact_tokenizer.special_tokens
    compact_tokenizer.special_tokens = {}
    try:
        assert picture_token_ids(compact_tokenizer, config) == compact
        assert picture_token_ids(compact_tokenizer, {"im_patch_id": 7})["image"] == 7
        assert VLProcessor(compact_tokenizer).ids == IDS
    finally:
        compact_tokenizer.special_tokens = bare
    assert picture_token_ids(compact_tokenizer, token_ids={"image": 9})["image"] == 9  # explicit ids win
    with pytest.raises(ernie_lab.ConfigError, match="do not belong together"):
        VLProcessor(processor.tokenizer, config=config)  # the stand-in's 100295 against a compact config
    with pytest.raises(InputError, match="unknown keys"):
        VLProcessor(processor.tokenizer, token_ids={"image_token_id": 5})


def test_compact_vocabulary_model_reads_its_ids_from_its_config(tmp_path, compact_tokenizer_folder):
    """A reference whose picture tokens sit at 8002.. in an 8,192-id vocabulary, against ours, on processor output."""
    folder, ids = compact_tokenizer_folder
    compact = compact_picture_ids(ids)
    config_ids = {config_key: compact[key] for key, (_, config_key) in special_tokens.PICTURE_TOKENS.items()}
    reference, model = build_pair(tmp_path / "compact-vl", vocab_size=8192, **config_ids)
    assert {key: getattr(model.vl_config, key) for key in config_ids} == config_ids
    inputs = VLProcessor(ernie_lab.load_tokenizer(folder))(picture_chat(picture(70, 100)))
    ids_ = inputs.pop("input_ids")
    types = modality_types(ids_, compact["image"], compact["video"])
    assert int((types == special_tokens.IMAGE).sum()) == tokens_per_item(inputs["image_grid_thw"])[0]
    router_types = routing_types(ids_, compact["image"], compact["video"], (compact["image_start"], compact["image_end"]),
                                 (compact["video_start"], compact["video_end"]))
    with torch.no_grad():
        expected = reference(input_ids=ids_, mm_token_type_ids=types, moe_mm_token_type_ids=router_types,
                             **inputs).logits
        with routing.record(model) as record:
            logits = model(ids_, **inputs).logits
    assert (logits - expected).abs().max() < 1e-4
    assert torch.equal(record.layers[0].modality, (router_types.reshape(-1) > 0).long())


# ----------------------------------------------------------------------------------------- losses
import math  # noqa: E402

from ernie_lab.train.losses import modality_balancing_losses, token_balanced_loss  # noqa: E402


def test_token_balanced_loss_by_hand():
    """Sample A: one target at p = 1/4; sample B: three targets at p = 1/2 and two ignored positions."""
    quarter = torch.log(torch.tensor([1.0, 1.0, 1.0, 1.0]))   # uniform over 4 tokens: p(target) = 1/4
    half = torch.log(torch.tensor([1.0, 1.0, 1e-30, 1e-30]))  # two live tokens: p(target) = 1/2
    logits = torch.stack([torch.stack([quarter, half, half, half, half]),
                          torch.stack([half, half, half, quarter, quarter])])  # (2, 5, 4)
    labels = torch.tensor([[2, -100, -100, -100, -100],
                           [0, 1, 0, -100, -100]])
    loss = token_balanced_loss(logits, labels)
    assert math.isclose(loss.item(), (math.log(4) + math.log(2)) / 2, rel_tol=1e-6)        # 1.5 ln 2
    plain = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100)
    assert math.isclose(plain.item(), (math.log(4) + 3 * math.log(2)) / 4, rel_tol=1e-6)   # 1.25 ln 2
    with pytest.raises(InputError, match="no sample has a target"):
        token_balanced_loss(logits, torch.full_like(labels, -100))


def test_modality_balancing_losses_by_hand():
    """Text tokens both on expert 0 (collapsed); vision tokens split 0 / 1 (balanced); E = 2, k = 1."""
    probs = torch.tensor([[0.8, 0.2], [0.8, 0.2],     # text
                          [0.7, 0.3], [0.3, 0.7]])    # vision
    logits = probs.log()
    modality = torch.tensor([0, 0, 1, 1])
    losses = modality_balancing_losses([logits], modality, k=1)
    assert math.isclose(losses["text"].item(), 2 * (1.0 * 0.8 + 0.0 * 0.2), rel_tol=1e-6)    # 1.6
    assert math.isclose(losses["vision"].item(), 2 * (0.5 * 0.5 + 0.5 * 0.5), rel_tol=1e-6)  # 1.0: balanced
    from ernie_lab.train.losses import load_balancing_loss

    pooled = load_balancing_loss(logits, k=1)  # f = (3/4, 1/4), P = (0.65, 0.35)
    assert math.isclose(pooled.item(), 2 * (0.75 * 0.65 + 0.25 * 0.35), rel_tol=1e-6)      # 1.15 hides it
    assert modality_balancing_losses([logits[:2]], modality[:2], k=1)["vision"].item() == 0.0


def test_vl_router_logits_reach_the_losses_while_training(pair):
    _, model = pair
    batch = preprocess_images([picture(56, 56)])
    ids = image_prompt(batch["image_grid_thw"].tolist())
    block = model.layers[1].mlp  # the first MoE layer: out.router_logits[0]
    model.train()
    try:
        out = model(ids, **batch, output_router_logits=True)
        logits = out.logits
        losses = modality_balancing_losses([out.router_logits[0]], (routing_types(ids) > 0).long(), k=2)
        (losses["text"] + losses["vision"] + token_balanced_loss(logits[:, :-1], ids[:, 1:])).backward()
        assert block.routers[0].weight.grad is not None and block.routers[1].weight.grad is not None
        assert block.routers[1].weight.grad.abs().sum() > 0
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
