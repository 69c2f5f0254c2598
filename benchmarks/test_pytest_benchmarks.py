"""A small pytest-benchmark set for regression tracking:

    pytest benchmarks/ --benchmark-only            (CUDA when available, else tiny CPU shapes)
"""
import pytest
import torch

import fastbert

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
TOKENS, HIDDEN = (16384, 768) if DEVICE == "cuda" else (512, 128)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def hidden():
    return torch.randn(TOKENS, HIDDEN, device=DEVICE, dtype=DTYPE)


def test_layer_norm_fwd(benchmark, hidden):
    w = torch.ones(HIDDEN, device=DEVICE, dtype=DTYPE)
    b = torch.zeros(HIDDEN, device=DEVICE, dtype=DTYPE)
    benchmark(lambda: (fastbert.ops.dropout_add_layer_norm(hidden, hidden, w, b), _sync()))


def test_bias_gelu_fwd(benchmark, hidden):
    bias = torch.randn(HIDDEN, device=DEVICE, dtype=DTYPE)
    benchmark(lambda: (fastbert.ops.bias_gelu(hidden, bias), _sync()))


def test_attention_fwd(benchmark):
    b, l, h, d = (32, 512, 12, 64) if DEVICE == "cuda" else (2, 64, 2, 32)
    q, k, v = (torch.randn(b, l, h, d, device=DEVICE, dtype=DTYPE) for _ in range(3))
    mask = torch.arange(l, device=DEVICE)[None, :] < torch.randint(1, l + 1, (b, 1), device=DEVICE)
    benchmark(lambda: (fastbert.ops.attention(q, k, v, mask), _sync()))


def test_model_forward(benchmark):
    config = fastbert.BertConfig.from_pretrained("bert-base-uncased" if DEVICE == "cuda" else "bert-tiny")
    model = fastbert.BertModel(config).to(DEVICE, DTYPE).eval()
    ids = torch.randint(1000, 30000, (32 if DEVICE == "cuda" else 4, 128), device=DEVICE)
    with torch.no_grad():
        benchmark(lambda: (model(ids), _sync()))
