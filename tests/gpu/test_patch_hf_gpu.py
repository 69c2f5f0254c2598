"""On a CUDA GPU: a patched transformers BERT under bf16 runs fastbert's Triton path, matches the unpatched
model within bf16's own error, and compiles without graph breaks inside fastbert (run by scripts/gpu_check.sh)."""
import copy
from pathlib import Path

import pytest
import torch

import fastbert
from fastbert.modeling import AttentionInputs
from tests.kernel_checks import gradient_scales

pytestmark = pytest.mark.gpu
transformers = pytest.importorskip("transformers")

BASE = dict(hidden_size=768, num_hidden_layers=4, num_attention_heads=12, intermediate_size=3072,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
FASTBERT_DIR = Path(fastbert.__file__).parent


def hf_classifier():
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(**BASE, num_labels=2, attn_implementation="sdpa"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.02)
    return model.cuda().train()


def batch(size=16, seqlen=256):
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, seqlen + 1, (size,), generator=g)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, 30522, (size, seqlen), generator=g) * mask
    return ids.cuda(), mask.cuda(), torch.randint(0, 2, (size,), generator=g).cuda()


def run_step(model, ids, mask, labels, autocast: bool):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
    out.loss.backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}
    return hidden[mask.bool()].double(), grads


@pytest.mark.parametrize("backend_name", ["auto", "triton"])
def test_patched_bf16_matches_fp32_within_hf_bf16_error(backend_name, triton_dispatch):
    hf_model = hf_classifier()
    patched = fastbert.patch_hf(copy.deepcopy(hf_model))
    ids, mask, labels = batch()
    ref_hidden, ref_grads = run_step(hf_model, ids, mask, labels, autocast=False)  # fp32 reference
    hf_hidden, hf_grads = run_step(hf_model, ids, mask, labels, autocast=True)
    with fastbert.backend.use(backend_name):
        got_hidden, got_grads = run_step(patched, ids, mask, labels, autocast=True)
    assert torch.isfinite(got_hidden).all()
    budget = (hf_hidden - ref_hidden).abs().max().item()
    assert (got_hidden - ref_hidden).abs().max().item() <= 3 * budget + 1e-3
    scales = gradient_scales(ref_grads)
    for name, ref in ref_grads.items():
        budget = (hf_grads[name] - ref).abs().max().item()
        err = (got_grads[name] - ref).abs().max().item()
        assert err <= 3 * budget + 1e-3 * (scales[name] + 1e-6), (name, err, budget)
    chosen = {op for op, used in triton_dispatch if used}
    assert {"dropout_add_layer_norm", "bias_gelu"} <= chosen
    assert chosen & {"attention", "attention_varlen"}


def test_compiled_patched_model_on_gpu():
    hf_model = hf_classifier().eval()
    patched = fastbert.patch_hf(copy.deepcopy(hf_model))
    ids, mask, labels = batch(8, 128)
    with fastbert.backend.use("triton"):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(patched)(input_ids=ids, attention_mask=mask)
        for reason in explanation.break_reasons:
            for frame in reason.user_stack or []:
                assert not Path(frame.filename).resolve().is_relative_to(FASTBERT_DIR.resolve()), reason.reason
        torch._dynamo.reset()
        compiled = torch.compile(patched)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = compiled(input_ids=ids, attention_mask=mask).logits.float()
            eager = patched(input_ids=ids, attention_mask=mask).logits.float()
    assert (got - eager).abs().max() < 5e-2


def test_fused_ops_fullgraph_on_gpu():
    """Each fused op (the triton path, varlen included: no CPU-side value checks on CUDA) in one graph."""
    torch._dynamo.reset()
    config = fastbert.BertConfig(**BASE)
    model = fastbert.BertModel(config).cuda()
    hidden = torch.randn(4, 200, 768, device="cuda", requires_grad=True)
    lengths = torch.tensor([200, 1, 77, 150])
    mask = (torch.arange(200)[None, :] < lengths[:, None]).cuda()
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32).cuda()
    tokens = torch.randn(int(lengths.sum()), 768, device="cuda", requires_grad=True)
    with fastbert.backend.use("triton"), torch.autocast("cuda", dtype=torch.bfloat16):
        padded = torch.compile(lambda h: model.encoder(h, AttentionInputs(key_padding_mask=mask)), fullgraph=True)
        unpadded = torch.compile(lambda t: model.encoder(t, AttentionInputs(cu_seqlens=cu_seqlens, max_seqlen=200)),
                                 fullgraph=True)
        a = padded(hidden)
        b = unpadded(tokens)
        (a.float().sum() + b.float().sum()).backward()
        a_eager = model.encoder(hidden, AttentionInputs(key_padding_mask=mask))
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert (a.float() - a_eager.float())[mask].abs().max() < 5e-2
    assert hidden.grad is not None and tokens.grad is not None
