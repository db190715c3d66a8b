"""Moving code must not move numbers: the shipped tiny models' logits equal those recorded before the layout change.

``tests/data/tiny_logits_before.json`` holds, for fixed inputs, the SHA-256 of the full fp32 logits (text model: two
random rows; VL model: a scene and a question), 256 sampled logits, and the VL model's greedy reply, all
recorded by the flat-package code (commit 84c92a8). On a machine whose CPU kernels are the recording's
(same ``torch.backends.cpu.get_cpu_capability()``, CPU vendor and torch version) the logits must be bit-identical;
elsewhere BLAS may sum in another order, so the samples are compared within 1e-4 and the reply must still match.
The vendor counts: on an Intel Xeon with AMX (capability AVX512 too) the samples moved by 5.7e-6 at the very
commit the suite had passed on the recording's AMD EPYC (2026-12-08), oneDNN and MKL picking other kernels there.
"""

import hashlib
import json
import platform
import random
from pathlib import Path

import pytest
import torch

import ernie_lab
from ernie_lab import processor, scenes

REPO = Path(__file__).resolve().parent.parent
RECORD = json.loads((Path(__file__).parent / "data" / "tiny_logits_before.json").read_text())


def cpu_vendor() -> str:
    """'GenuineIntel', 'AuthenticAMD', ... (Linux's /proc/cpuinfo), else what the platform module says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("vendor_id"))
    except (OSError, StopIteration):
        return platform.processor()


SAME_KERNELS = (torch.backends.cpu.get_cpu_capability() == RECORD["cpu_capability"]
                and cpu_vendor() == RECORD["cpu_vendor"] and torch.__version__ == RECORD["torch"])


@pytest.fixture(scope="module")
def logits():
    """Recomputed exactly as the recording was made."""
    torch.manual_seed(0)
    text = ernie_lab.load_model(REPO / "data" / "tiny-ernie-text").eval()
    ids = torch.randint(0, text.config.vocab_size, (2, 24))
    vl = ernie_lab.load_model(REPO / "data" / "tiny-ernie-vl").eval()
    tok = ernie_lab.load_tokenizer(REPO / "data" / "tiny-ernie-vl")
    scene = scenes.random_scene(random.Random(3))
    messages = [{"role": "user", "content": [{"type": "image", "image": scenes.render(scene)},
                                             {"type": "text", "text": "Describe the picture."}]}]
    inputs = processor.VLProcessor(tok, config=vl.config)(messages)
    with torch.no_grad():
        out = {"text": text(ids).logits.float().contiguous(), "vl": vl(**inputs).logits.float().contiguous()}
    out["vl_reply"] = ernie_lab.chat(vl, tok, messages, max_new_tokens=24)
    return out


@pytest.mark.parametrize("name", ["text", "vl"])
def test_logits_equal_the_recording(logits, name):
    got, want = logits[name], RECORD[name]
    assert list(got.shape) == want["shape"]
    sampled = got.flatten()[torch.tensor(want["index"])].double()
    expected = torch.tensor(want["values"], dtype=torch.float64)
    if SAME_KERNELS:
        assert torch.equal(sampled, expected), f"max |diff| {float((sampled - expected).abs().max()):.3g}"
        assert hashlib.sha256(got.numpy().tobytes()).hexdigest() == want["sha256"], "some logit changed"
    else:
        assert float((sampled - expected).abs().max()) <= 1e-4


def test_greedy_reply_equals_the_recording(logits):
    assert logits["vl_reply"] == RECORD["vl_reply"]
