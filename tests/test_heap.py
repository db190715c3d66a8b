"""ernie_lab.heap: freed memory handed back while a big model is loaded or quantized."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import ernie_lab
from ernie_lab import heap, quant
from test_quant import random_model, text_config

glibc = pytest.mark.skipif(not heap.available(), reason="malloc_trim is glibc's (Linux)")

# In a fresh process, so the heap's state is known: a 24 MiB block freed raises glibc's mmap threshold, then
# 4 MiB temporaries come from the heap with small blocks that stay between them, as quantize-on-read leaves
# codes between a weight's temporaries. Freeing the temporaries gives nothing back; the trim gives back all.
HOLES_SCRIPT = textwrap.dedent("""
    import json, torch
    from ernie_lab import heap

    def anonymous():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024

    big = torch.ones(6 * 2**20)
    del big
    temporaries, kept = [], []
    for _ in range(100):
        temporaries.append(torch.ones(2**20))
        kept.append(torch.ones(16 * 1024))
    before = anonymous()
    del temporaries
    freed = anonymous()
    returned = heap.release_freed_memory()
    print(json.dumps({"by_free": before - freed, "by_trim": freed - anonymous(), "returned": returned}))
""")


@glibc
def test_release_freed_memory_returns_the_holes_between_live_blocks():
    out = subprocess.run([sys.executable, "-c", HOLES_SCRIPT], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    temporaries = 100 * 4 * 2**20
    assert result["by_free"] < 0.1 * temporaries          # glibc keeps the holes
    assert result["by_trim"] > 0.9 * temporaries and result["returned"]


def counting(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "release_freed_memory", lambda: calls.append(1))
    return calls


def test_trimmer_trims_once_per_every_bytes(monkeypatch):
    calls = counting(monkeypatch)
    trimmer = heap.Trimmer(every=100)
    for _ in range(9):
        trimmer.converted(30)
    assert len(calls) == 2 and trimmer.pending == 30      # at 120 and at 240 bytes; 30 still pending
    trimmer.finish()
    trimmer.finish()
    assert len(calls) == 3 and trimmer.pending == 0


def test_quantize_on_read_and_quantize_hand_memory_back(monkeypatch, tmp_path):
    model = random_model(text_config())
    ernie_lab.save_model(model, tmp_path, tokenizer=False)
    calls = counting(monkeypatch)
    loaded = ernie_lab.load_model(tmp_path)                  # nothing converted: nothing to hand back
    assert not calls
    on_read = ernie_lab.load_model(tmp_path, quantize="w4a16", group_size=32)
    assert len(calls) == 1                                   # the tiny model's weights are under 64 MiB: the last trim
    quant.quantize(loaded, "w4a16", group_size=32)
    assert len(calls) == 2
    a, b = on_read.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_loading_in_another_dtype_hands_memory_back(monkeypatch, tmp_path):
    ernie_lab.save_model(random_model(text_config()), tmp_path, tokenizer=False)
    calls = counting(monkeypatch)
    ernie_lab.load_model(tmp_path, dtype=torch.bfloat16)
    assert len(calls) == 1
