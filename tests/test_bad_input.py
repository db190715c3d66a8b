"""The bad-input catalogue: what a new user gets wrong, and what the kit answers.

Each case asserts one outcome: a specific ErnieLabError subclass whose message names the file, tensor
or argument and says what to do; a documented warning; or, for input that is legitimate (a grayscale
picture, a one-token prompt), that it works. A refused load must leave nothing behind: no model alive,
no file left open, memory back near where it was (:func:`refused`).
"""

import gc
import io
import json
import math
import os
import shutil
import warnings
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ernie_lab
from conftest import SMALL_TEXT, kill_when, start_child
from ernie_lab import CheckpointError, ConfigError, ErnieConfig, InputError, NotEnoughMemoryError
from ernie_lab.model.decoder import ErnieForCausalLM
from ernie_lab.io.saving import save_model

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(SMALL_TEXT, max_position_embeddings=256, rope_theta=10000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)
IDS = torch.tensor([[1, 17, 99, 5]])


def small_model(seed: int = 0, **overrides) -> ErnieForCausalLM:
    torch.manual_seed(seed)
    return ErnieForCausalLM(ErnieConfig.from_dict({**SMALL, **overrides})).eval()


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


# ------------------------------------------------------------------------------------ the census
LIVE_MODELS = weakref.WeakSet()  # every ErnieForCausalLM (and VL model) built while these tests run


@pytest.fixture(autouse=True, scope="module")
def count_models():
    original = ErnieForCausalLM.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        LIVE_MODELS.add(self)

    ErnieForCausalLM.__init__ = init
    yield
    ErnieForCausalLM.__init__ = original


def census(collect: bool = True) -> tuple[int, int, int]:
    """(live ernie-lab models, open file descriptors, resident bytes) of this process."""
    if collect:
        gc.collect()
    models = len(LIVE_MODELS)
    fds = len(os.listdir("/proc/self/fd"))
    rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    return models, fds, rss


def refused(call, error: type, *words: str) -> str:
    """Run ``call``; it must raise ``error`` naming every word, and leave no model, file or memory behind."""
    models, fds, rss = census(collect=False)
    try:
        call()
    except error as err:
        message = str(err)
    else:
        pytest.fail(f"{call} did not raise {error.__name__}")
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    now_models, now_fds, now_rss = census(collect=False)
    if now_models > models:  # perhaps only garbage in a reference cycle: collect, then count again
        now_models, now_fds, now_rss = census()
    assert now_models <= models, "a failed call left a model alive"
    assert now_fds <= fds, "a failed call left a file open"
    assert now_rss - rss < 64 * 1024**2, f"a failed call kept {(now_rss - rss) / 2**20:.0f} MiB"
    return message


def load_refused(folder, error, *words, **kwargs) -> str:
    return refused(lambda: ernie_lab.load_model(folder, **kwargs), error, *words)


# ------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def saved():
    """(model, folder of its single-file save, folder of its sharded save); copies are damaged per test."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="bad-input-"))
    model = small_model()
    save_model(model, root / "single")
    save_model(model, root / "sharded", max_shard_bytes=120_000)
    yield model, root / "single", root / "sharded"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture()
def single(saved, tmp_path):
    return Path(shutil.copytree(saved[1], tmp_path / "single"))


@pytest.fixture()
def sharded(saved, tmp_path):
    return Path(shutil.copytree(saved[2], tmp_path / "sharded"))


def index_of(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def write_index(folder: Path, index: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_good_checkpoints_load(saved):
    model, single, sharded = saved
    for folder in (single, sharded):
        assert torch.equal(logits(ernie_lab.load_model(folder)), logits(model))


def test_tensor_in_two_shards(sharded):
    """Was silently wrong: the copy in the later shard won, whatever the index said."""
    from safetensors.torch import load_file, save_file

    shards = sorted(sharded.glob("model-*.safetensors"))
    first, last = load_file(shards[0]), load_file(shards[-1])
    name = next(iter(first))
    save_file({**last, name: first[name] * 2}, shards[-1])
    load_refused(sharded, CheckpointError, name, "stored twice", shards[0].name, shards[-1].name)


def test_tensor_in_a_shard_the_index_does_not_name(sharded):
    index = index_of(sharded)
    shard_sizes = {v: list(index["weight_map"].values()).count(v) for v in index["weight_map"].values()}
    name = next(k for k, v in index["weight_map"].items() if shard_sizes[v] > 1)
    right = index["weight_map"][name]
    index["weight_map"][name] = next(v for v in index["weight_map"].values() if v != right)
    write_index(sharded, index)
    load_refused(sharded, CheckpointError, name, right, "index")


def test_index_names_a_tensor_its_shard_lacks(sharded):
    index = index_of(sharded)
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = next(iter(index["weight_map"].values()))
    write_index(sharded, index)
    load_refused(sharded, CheckpointError, "model.layers.9.mlp.up_proj.weight", "not there")


def test_index_points_outside_the_folder(sharded):
    index = index_of(sharded)
    index["weight_map"] = {k: "../../etc/passwd.safetensors" for k in index["weight_map"]}
    write_index(sharded, index)
    load_refused(sharded, CheckpointError, "../../etc/passwd.safetensors", "plain .safetensors file names")


def test_index_without_weight_map(sharded):
    write_index(sharded, {"weight_map": ["not", "a", "map"]})
    load_refused(sharded, CheckpointError, "model.safetensors.index.json", "weight_map")


def test_index_too_large_is_not_read(sharded):
    (sharded / "model.safetensors.index.json").write_bytes(b" " * (17 * 1024**2))
    load_refused(sharded, CheckpointError, "model.safetensors.index.json", "bytes")


def test_integer_weights_are_refused(single):
    from safetensors.torch import load_file, save_file

    tensors = load_file(single / "model.safetensors")
    tensors["model.norm.weight"] = tensors["model.norm.weight"].to(torch.int32)
    save_file(tensors, single / "model.safetensors")
    load_refused(single, CheckpointError, "model.norm.weight", "I32", "floating point")


def test_quantized_allow_list_admits_integer_tensors(monkeypatch):
    from ernie_lab import loading

    # the kit's quantized format (ernie_lab.quant) stores codes as int8 / uint8 under .qweight
    loading.check_tensor_dtype(Path("x.safetensors"), "layers.0.mlp.up_proj.qweight", "I8")
    with pytest.raises(CheckpointError):  # another integer type, or an integer tensor under any other name
        loading.check_tensor_dtype(Path("x.safetensors"), "layers.0.mlp.up_proj.qweight", "I32")
    with pytest.raises(CheckpointError):
        loading.check_tensor_dtype(Path("x.safetensors"), "layers.0.mlp.up_proj.weight", "I8")
    monkeypatch.delitem(loading.QUANTIZED_TENSOR_DTYPES, ".qweight")
    with pytest.raises(CheckpointError):
        loading.check_tensor_dtype(Path("x.safetensors"), "layers.0.mlp.up_proj.qweight", "I8")


def test_unknown_dtype_in_header(tmp_path, single):
    write_raw_safetensors(single / "model.safetensors",
                          {"model.norm.weight": {"dtype": "F4", "shape": [32], "data_offsets": [0, 16]}}, b"\0" * 16)
    load_refused(single, CheckpointError, "model.norm.weight", "'F4'")


def test_absurd_header_length(single):
    (single / "model.safetensors").write_bytes((10**15).to_bytes(8, "little") + b"{}")
    load_refused(single, CheckpointError, "model.safetensors", "truncated or corrupt")


def test_offsets_outside_the_file(single):
    write_raw_safetensors(single / "model.safetensors",
                          {"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 128]}}, b"\0" * 8)
    load_refused(single, CheckpointError, "model.norm.weight", "outside")


def test_bytes_not_matching_the_shape(single):
    write_raw_safetensors(single / "model.safetensors",
                          {"model.norm.weight": {"dtype": "F32", "shape": [32], "data_offsets": [0, 64]}}, b"\0" * 64)
    load_refused(single, CheckpointError, "model.norm.weight", "64 bytes")


def test_stored_head_contradicting_tied_embeddings(single):
    """Was silently wrong: the stored head was dropped without a word."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(single / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
    save_file(tensors, single / "model.safetensors")
    load_refused(single, CheckpointError, "lm_head.weight", '"tie_word_embeddings": false', "delete")


def test_stored_head_equal_to_the_embedding_loads(single, saved):
    from safetensors.torch import load_file, save_file

    tensors = load_file(single / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, single / "model.safetensors")
    assert torch.equal(logits(ernie_lab.load_model(single)), logits(saved[0]))


def test_untied_config_without_a_head(single):
    edit_config(single, tie_word_embeddings=False)
    load_refused(single, CheckpointError, "lm_head.weight", "tie_word_embeddings")


def deny(monkeypatch, module, path: Path):
    """Make ``path`` unreadable: chmod where that binds (not root), else the module's open() refuses it."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    real_open = open

    def fake_open(file, *args, **kwargs):
        if Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(module, "open", fake_open, raising=False)


def test_unreadable_weights_say_permission(single, monkeypatch):
    from ernie_lab import loading

    deny(monkeypatch, loading, single / "model.safetensors")
    load_refused(single, CheckpointError, "Permission denied", "model.safetensors", "chmod")


def test_unreadable_config_says_permission(single, monkeypatch):
    from ernie_lab import config

    deny(monkeypatch, config, single / "config.json")
    load_refused(single, ConfigError, "Permission denied", "config.json")


def test_pickle_files_are_never_opened(single):
    (single / "model.safetensors").rename(single / "pytorch_model.bin")
    load_refused(single, CheckpointError, "pytorch_model.bin", "pickle", "safetensors")


def test_model_larger_than_free_memory(single, monkeypatch):
    monkeypatch.setenv("ERNIE_LAB_AVAILABLE_MEMORY", "100000")
    load_refused(single, NotEnoughMemoryError, "GiB", "bfloat16", "check_memory=False")
    assert ernie_lab.load_model(single, check_memory=False) is not None


def test_memory_estimate_fits_a_real_shape():
    """The estimate is family.weight_bytes at the load dtype: the 0.3B in fp32 needs ~1.4 GB, in bf16 half."""
    from ernie_lab.model.config import ERNIE_0_3B
    from ernie_lab.analysis.family import weight_bytes

    assert 1.3e9 < weight_bytes(ERNIE_0_3B, "bf16") * 2 < 1.6e9


@pytest.mark.parametrize("dtype, words", [
    ("float77", ["dtype", "'float77'", "bfloat16"]),
    (torch.int8, ["dtype", "floating-point"]),
    (3, ["dtype"]),
])
def test_bad_dtype_before_any_weight(single, dtype, words):
    """Was wrong advice: dtype='float77' was reported as a corrupt file to download again."""
    (single / "model.safetensors").write_bytes(b"garbage")  # the arguments are checked before any file
    load_refused(single, InputError, *words, dtype=dtype)


def test_dtype_by_name_works(saved):
    model = ernie_lab.load_model(saved[1], dtype="bf16")
    assert model.embed.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("device, words", [("gpu7", ["device", "'gpu7'"]), ("cuda:99", ["cuda:99", "device='cpu'"]),
                                           ("meta", ["meta"])])
def test_bad_device(single, device, words):
    load_refused(single, InputError, *words, device=device)


def test_transforms_not_functions(single):
    load_refused(single, InputError, "transform", "got 42", transforms=[42])
    load_refused(single, InputError, "transforms", transforms=42)


def test_source_not_a_path():
    refused(lambda: ernie_lab.load_model(123), InputError, "source", "int")


def test_config_too_large_is_not_read(single):
    (single / "config.json").write_bytes(b" " * (17 * 1024**2))
    load_refused(single, ConfigError, "config.json", "bytes")


def test_config_field_is_named_with_its_file(single):
    edit_config(single, intermediate_size=-3)
    load_refused(single, ConfigError, str(single / "config.json"), "intermediate_size", "-3", "valid: 1 ..")


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("change, words", [
    ({"intermediate_size": -4}, ["intermediate_size", "positive integer"]),
    ({"rms_norm_eps": "1e-5"}, ["rms_norm_eps", "str"]),
    ({"rms_norm_eps": 0.0}, ["rms_norm_eps", "> 0"]),
    ({"rope_theta": 0}, ["rope_theta", "> 0"]),
    ({"rope_theta": math.inf}, ["rope_theta", "finite"]),
    ({"rope_theta": math.nan}, ["rope_theta", "finite"]),
    ({"hidden_size": 30, "head_dim": None}, ["hidden_size (30)", "num_attention_heads (4)", "head_dim"]),
    ({"num_key_value_heads": 3}, ["num_key_value_heads", "[1, 2, 4]"]),
    ({"vocab_size": 10**12}, ["vocab_size", "valid: 1 .. 4194304"]),
    ({"num_hidden_layers": 2.0}, ["num_hidden_layers"]),
    ({"tie_word_embeddings": "yes"}, ["tie_word_embeddings", "true or false"]),
    ({"eos_token_id": 7000}, ["eos_token_id", "0 .. 6015"]),
    ({"pad_token_id": -1}, ["pad_token_id"]),
    ({"rope_parameters": [1, 2]}, ["rope_parameters"]),
    ({"moe_num_experts": 4, "moe_k": 5, "moe_intermediate_size": 16}, ["moe_k (5)", "1 .. 4"]),
    ({"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 16, "moe_layer_start_index": 5},
     ["no layer is an MoE layer"]),
    ({"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 0}, ["moe_intermediate_size"]),
])
def test_impossible_text_configs(change, words):
    refused(lambda: ErnieConfig.from_dict({**SMALL, **change}, source="my/config.json"), ConfigError,
            "my/config.json", *words)


def test_nan_in_json_config_is_refused(single):
    """json accepts NaN; a config must not."""
    text = (single / "config.json").read_text().replace('"rope_theta": 10000.0', '"rope_theta": NaN')
    (single / "config.json").write_text(text)
    load_refused(single, ConfigError, "rope_theta")


VL = {"model_type": "ernie4_5_vl_moe",
      "text_config": dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, moe_num_experts=4, moe_k=2,
                          moe_intermediate_size=[48, 16], moe_num_shared_experts=0),
      "vision_config": dict(depth=1, hidden_size=32, intermediate_size=40, num_heads=4, patch_size=14)}


@pytest.mark.parametrize("change, words", [
    ({"num_heads": 3}, ["vision_config.hidden_size 32", "num_heads 3"]),
    ({"spatial_merge_size": 0}, ["vision_config.spatial_merge_size"]),
    ({"rms_norm_eps": -1e-6}, ["vision_config", "rms_norm_eps"]),
    ({"depth": 10**6}, ["vision_config", "depth"]),
])
def test_impossible_vision_configs(change, words):
    from ernie_lab.model.config import parse_config

    raw = {**VL, "vision_config": {**VL["vision_config"], **change}}
    parse_config({**VL})  # the unchanged one is fine
    refused(lambda: parse_config(raw, source="vl/config.json"), ConfigError, "vl/config.json", *words)


# ------------------------------------------------------------------------------------ generation
@pytest.fixture(scope="module")
def model():
    return small_model(seed=1)


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=math.nan), ["temperature", "nan"]),
    (dict(temperature=math.inf), ["temperature", "inf"]),
    (dict(temperature="hot"), ["temperature"]),
    (dict(top_p=math.nan), ["top_p"]),
    (dict(top_k=2.5), ["top_k"]),
    (dict(max_new_tokens=True), ["max_new_tokens"]),
    (dict(eos_token_id="</s>"), ["eos_token_id"]),
    (dict(eos_token_id=[2, 70000]), ["eos_token_id", "70000"]),
    (dict(pad_token_id=-1), ["pad_token_id"]),
    (dict(streamer=object()), ["streamer", "put"]),
    (dict(generator=0), ["generator"]),
])
def test_bad_generation_arguments(model, kwargs, words):
    """Was a raw RuntimeError from multinomial for a NaN temperature."""
    n = kwargs.pop("max_new_tokens", 3)
    refused(lambda: ernie_lab.generate(model, IDS, n, **kwargs), InputError, *words)


@pytest.mark.parametrize("ids, mask, words", [
    (torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]), ["row 0", "LEFT"]),
    (torch.tensor([[5, 0, 6]]), torch.tensor([[1, 0, 1]]), ["row 0", "holes"]),
    (torch.tensor([[5, 6], [0, 0]]), torch.tensor([[1, 1], [0, 0]]), ["row 1", "no real token"]),
    (torch.tensor([[5, 6]]), torch.tensor([[1, 2]]), ["only 0"]),
    (torch.tensor([[5.0, 6.0]]), None, ["integer token ids", ".long()"]),
    (torch.zeros(1, 0, dtype=torch.long), None, ["non-empty"]),
    (torch.tensor([[[5]]]), None, ["2-D"]),
    ([5, 6, 7], None, ["wrap it as [ids]"]),
    ("Hello", None, ["tokenizer"]),
    ([[5, 6], []], None, ["at least one token"]),
])
def test_bad_prompts(model, ids, mask, words):
    """Right padding was silently wrong (other tokens than the row alone); an all-zero row was generated for."""
    refused(lambda: ernie_lab.generate(model, ids, 3, attention_mask=mask), InputError, *words)


def test_one_token_prompt_works(model):
    out = ernie_lab.generate(model, torch.tensor([[7]]), 4, eos_token_id=[])
    assert out.shape == (1, 5) and out[0, 0] == 7


def test_left_padding_matches_each_row_alone(model):
    rows = [[4, 8, 15, 16], [23, 42]]
    together = ernie_lab.generate(model, rows, 5, eos_token_id=[])
    for i, row in enumerate(rows):
        alone = ernie_lab.generate(model, [row], 5, eos_token_id=[])
        assert together[i, -5:].tolist() == alone[0, -5:].tolist()


# ------------------------------------------------------------------------------------ tokenizer and chat
@pytest.fixture(scope="module")
def tokenizer():
    return ernie_lab.load_tokenizer(REPO / "data" / "tiny-tokenizer")


@pytest.mark.parametrize("messages, words", [
    ([], ["no messages"]),
    (["Hi"], ["message 0", "dict"]),
    ([{"role": "user"}], ["message 0", "'content'"]),
    ([{"role": "robot", "content": "Hi"}], ["robot", "user"]),
    ([{"role": "user", "content": 42}], ["message 0", "int"]),
    ([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], ["message 0", "str content"]),
    ([{"role": "user", "content": [{"type": "image", "image": None}]}], ["text-only ERNIE 4.5"]),
])
def test_bad_chat_messages(model, tokenizer, messages, words):
    refused(lambda: ernie_lab.chat(model, tokenizer, messages, max_new_tokens=2), InputError, *words)


@pytest.mark.parametrize("content, words", [
    ([{"type": "text"}], ["item 0", "'text'"]),
    ([{"type": "audio", "audio": b""}], ["item 0", "'image' or 'video'"]),
    ({"type": "text", "text": "Hi"}, ["content must be a str or a list"]),
])
def test_bad_vl_message_items(content, words):
    from ernie_lab.io.chat_format import check_messages

    refused(lambda: check_messages([{"role": "user", "content": content}]), InputError, "message 0", *words)


def test_chat_arguments_in_the_wrong_order(model, tokenizer):
    messages = [{"role": "user", "content": "Hi"}]
    refused(lambda: ernie_lab.chat(model, messages, tokenizer), InputError, "tokenizer", "chat(model, tokenizer")
    refused(lambda: ernie_lab.chat(tokenizer, model, messages), InputError, "model")
    refused(lambda: ernie_lab.chat(model, tokenizer, messages, enable_thinking="yes"), InputError, "enable_thinking")
    refused(lambda: ernie_lab.chat(model, tokenizer, messages, temperature=math.nan), InputError, "temperature")


def test_chat_works_with_one_short_message(model, tokenizer):
    assert isinstance(ernie_lab.chat(model, tokenizer, [{"role": "user", "content": "a"}], max_new_tokens=3), str)


def test_chat_takes_a_plain_string_as_one_user_turn(model, tokenizer):
    as_list = ernie_lab.chat(model, tokenizer, [{"role": "user", "content": "a b"}], max_new_tokens=3)
    assert ernie_lab.chat(model, tokenizer, "a b", max_new_tokens=3) == as_list


@pytest.mark.parametrize("call, words", [
    (lambda tok: tok.encode([1, 2]), ["encode wants a str"]),
    (lambda tok: tok.decode([1, 10**6]), ["10", "outside"]),
    (lambda tok: tok.decode(torch.ones(2, 2, dtype=torch.long)), ["one sequence"]),
    (lambda tok: tok.decode([1.5]), ["ints"]),
    (lambda tok: tok.convert_tokens_to_ids("no-such-token-here"), ["not a token"]),
])
def test_bad_tokenizer_calls(tokenizer, call, words):
    refused(lambda: call(tokenizer), InputError, *words)


def test_load_tokenizer_on_a_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    refused(lambda: ernie_lab.load_tokenizer(tmp_path / "tokenizer.model"), InputError, "is a file")


def test_damaged_sentencepiece_model(tmp_path):
    shutil.copytree(REPO / "data" / "tiny-tokenizer", tmp_path / "tok")
    (tmp_path / "tok" / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    refused(lambda: ernie_lab.load_tokenizer(tmp_path / "tok"), CheckpointError, "tokenizer.model", "SentencePiece")


# ------------------------------------------------------------------------------------ images and videos
def picture(mode: str) -> Image.Image:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    return rgb.convert(mode) if mode != "RGB" else rgb


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "1", "I;16"])
def test_any_picture_mode_works(mode):
    from ernie_lab.io.image_processing import preprocess_images

    out = preprocess_images([picture(mode)])
    assert out["pixel_values"].shape[1] == 588 and torch.isfinite(out["pixel_values"]).all()


def test_transparent_pixels_become_white():
    from ernie_lab.io.image_processing import to_rgb

    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.array(to_rgb(clear)).min() == 255


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    picture("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("source, words", [
    (Image.new("RGB", (2000, 5)), ["elongated", "crop"]),
    (b"definitely not an image", ["not an image file"]),
    (png_bytes()[:200], ["truncated or corrupt"]),
    (np.zeros((8, 8, 3), dtype=np.uint8), ["PIL.Image.fromarray"]),
    ("/no/such/picture.png", ["no image file"]),
    ([], ["no images"]),
])
def test_bad_pictures(source, words):
    from ernie_lab.io.image_processing import preprocess_images

    refused(lambda: preprocess_images(source), InputError, *words)


@pytest.mark.parametrize("frames, words", [
    ([Image.new("RGB", (56, 56)), Image.new("RGB", (84, 56))], ["one size"]),
    (np.zeros((2, 56, 56, 3), dtype=np.float32), ["uint8", "float32"]),
    (np.zeros((2, 56, 56), dtype=np.uint8), ["(frames, height, width, 3)"]),
    ([], ["no frames"]),
])
def test_bad_videos(frames, words):
    from ernie_lab.io.image_processing import preprocess_video

    refused(lambda: preprocess_video(frames), InputError, *words)


def test_odd_frame_count_works():
    from ernie_lab.io.image_processing import preprocess_video

    out = preprocess_video(np.zeros((3, 56, 56, 3), dtype=np.uint8), min_pixels=56 * 56)
    assert out["video_grid_thw"][0, 0] == 4  # the last frame repeated: frames merge in pairs


def test_more_pictures_than_placeholders(tokenizer):
    from ernie_lab.io.processor import VLProcessor

    processor = VLProcessor(tokenizer)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what?"}]}]
    refused(lambda: processor(messages, images=[picture("RGB"), picture("RGB")]), InputError, "1 image item",
            "2 image(s)")


# ------------------------------------------------------------------------------------ saving
def test_save_into_a_file_is_refused(tmp_path, model):
    target = tmp_path / "notes.txt"
    target.write_text("keep me")
    refused(lambda: save_model(model, target), InputError, "notes.txt", "is a file")
    assert target.read_text() == "keep me"


def test_bad_shard_size(tmp_path, model):
    refused(lambda: save_model(model, tmp_path / "x", max_shard_bytes=0), InputError, "max_shard_bytes")
    assert not (tmp_path / "x").exists()


def test_saving_over_a_sharded_save_leaves_no_stale_shards(tmp_path):
    """Was data lost: the old index and shards stayed, and reloading returned the old weights."""
    old, new = small_model(seed=2), small_model(seed=3)
    save_model(old, tmp_path / "ckpt", max_shard_bytes=120_000, tokenizer=False)
    (tmp_path / "ckpt" / "tokenizer.model").write_bytes(b"kept")  # the next saves keep the target's tokenizer
    save_model(new, tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors",
                                                                      "tokenizer.model"]
    assert (tmp_path / "ckpt" / "tokenizer.model").read_bytes() == b"kept"  # other files are carried over
    assert torch.equal(logits(ernie_lab.load_model(tmp_path / "ckpt")), logits(new))
    save_model(old, tmp_path / "ckpt", max_shard_bytes=120_000)  # and back to shards
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()
    assert torch.equal(logits(ernie_lab.load_model(tmp_path / "ckpt")), logits(old))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_head_untied_after_loading_is_saved(tmp_path, saved):
    """Was data lost: the config still said tied, so the changed head was not written."""
    model = ernie_lab.load_model(saved[1])
    model.lm_head.weight = torch.nn.Parameter(model.embed.weight.detach() * 3)
    with pytest.warns(UserWarning, match="tie_word_embeddings: false"):
        save_model(model, tmp_path / "untied")
    assert json.loads((tmp_path / "untied" / "config.json").read_text())["tie_word_embeddings"] is False
    again = ernie_lab.load_model(tmp_path / "untied")
    assert torch.equal(logits(again), logits(model)) and not torch.equal(logits(again), logits(saved[0]))


def test_tied_in_memory_untied_in_config_is_saved_with_its_head(tmp_path):
    model = small_model(seed=4, tie_word_embeddings=False)
    model.lm_head.weight = model.embed.weight  # tied by hand while the config says untied
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_model(model, tmp_path / "ckpt", tokenizer=False)  # weights only, on purpose: no warning at all
    assert torch.equal(logits(ernie_lab.load_model(tmp_path / "ckpt")), logits(model))


def test_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    from ernie_lab import saving

    old, new = small_model(seed=5), small_model(seed=6)
    save_model(old, tmp_path / "ckpt", max_shard_bytes=120_000)
    before = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    written = []

    def failing_save_file(tensors, path, metadata=None):
        if written:
            raise OSError(28, "No space left on device")
        written.append(path)
        return saving_save_file(tensors, path, metadata=metadata)

    saving_save_file = saving.save_file
    monkeypatch.setattr(saving, "save_file", failing_save_file)
    with pytest.raises(OSError, match="No space left"):
        save_model(new, tmp_path / "ckpt", max_shard_bytes=120_000)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no partial folder
    assert torch.equal(logits(ernie_lab.load_model(tmp_path / "ckpt")), logits(old))


KILLED_SAVE = """
import sys, torch, ernie_lab
from ernie_lab.model.config import ERNIE_0_3B
from ernie_lab.model.decoder import ErnieForCausalLM
with torch.device("meta"):
    model = ErnieForCausalLM(ERNIE_0_3B)
model = model.to_empty(device="cpu")  # uninitialised 0.3B-shape weights: their values do not matter here
model.lm_head.weight = model.embed.weight  # to_empty unties; the 0.3B is tied
print("ready", flush=True)
ernie_lab.save_model(model, sys.argv[1], max_shard_bytes=int(sys.argv[2]))
print("finished", flush=True)
"""


def test_save_killed_midway_leaves_the_previous_checkpoint(tmp_path):
    """SIGKILL while a sharded 0.3B-shape checkpoint (1.4 GB fp32, 200 MB shards) is being written."""
    old = small_model(seed=7)
    target = tmp_path / "ckpt"
    save_model(old, target, max_shard_bytes=120_000)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    kill_when(start_child(KILLED_SAVE, target, 200 * 2**20),
              lambda: any(p.suffix == ".safetensors" for p in tmp_path.glob(".ckpt.partial-*/*")), "it could be killed")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # not one byte of the old save changed
    assert torch.equal(logits(ernie_lab.load_model(target)), logits(old))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.partial-")  # hidden, never at the target
    save_model(old, target)  # the next save sweeps what the killed one left
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
