"""One BERT encoder layer (attention + both residual/LayerNorm sublayers + MLP), forward and backward.

Providers: ``fastbert`` (auto backend: fused kernels on CUDA), ``eager`` (our torch reference),
``compile`` (torch.compile of the eager layer), ``hf_eager`` / ``hf_sdpa`` (transformers' BertLayer
with the same weights). Full-length sequences with an all-ones padding mask, so every provider does
the same work. FLOPs (fwd): 2·tokens·(4h² + 2h·i) + 4·h·B·L²; fwd+bwd = 3× fwd.
"""
from __future__ import annotations


import torch

from .common import DTYPES, Row, hf_bert_config, peak_memory_mb, script_main, time_fn


def shapes(device: str, quick: bool) -> list[tuple[str, int, int]]:
    if device != "cuda":
        return [("bert-tiny", 4, 32)]
    if quick:
        return [("bert-base-uncased", 32, 128)]
    return [("bert-base-uncased", 64, 128), ("bert-base-uncased", 16, 512), ("bert-large-uncased", 16, 512)]


def layer_flops(config, batch: int, seqlen: int) -> float:
    h, i = config.hidden_size, config.intermediate_size
    tokens = batch * seqlen
    return 3 * (2 * tokens * (4 * h * h + 2 * h * i) + 4 * h * batch * seqlen * seqlen)


def _ours(provider: str, config, device: str, dtype: torch.dtype, mask: torch.Tensor):
    import fastbert
    from fastbert.modeling import AttentionInputs, BertLayer

    torch.manual_seed(0)
    layer = BertLayer(config).to(device, dtype).train()
    attn = AttentionInputs(key_padding_mask=mask.bool())
    name = "auto" if provider == "fastbert" else "torch"
    fn = torch.compile(layer) if provider == "compile" else layer

    def forward(x):
        with fastbert.backend.use(name):
            return fn(x, attn)

    return layer, forward


def _hf(provider: str, config, device: str, dtype: torch.dtype, mask: torch.Tensor, ours_state):
    import transformers

    hf_config = hf_bert_config(config)
    hf_config._attn_implementation = "eager" if provider == "hf_eager" else "sdpa"
    layer = transformers.models.bert.modeling_bert.BertLayer(hf_config)
    layer.load_state_dict(ours_state)
    layer = layer.to(device, dtype).train()
    additive = ((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min)

    def forward(x):
        out = layer(x, attention_mask=additive)
        return out[0] if isinstance(out, tuple) else out

    return layer, forward


def _fwd_bwd(forward, x, grad):
    """One forward + backward of ``forward`` on ``x`` (bound now, not at call time: the caller loops)."""
    def step():
        forward(x).backward(grad)
    return step


def run(device: str, dtype: str, quick: bool) -> list[Row]:
    import fastbert

    torch_dtype = DTYPES[dtype]
    rows = []
    for preset, batch, seqlen in shapes(device, quick):
        config = fastbert.BertConfig.from_pretrained(preset)
        shape = f"{preset} B={batch} L={seqlen}"
        mask = torch.ones(batch, seqlen, dtype=torch.long, device=device)
        x = torch.randn(batch, seqlen, config.hidden_size, device=device, dtype=torch_dtype, requires_grad=True)
        grad = torch.randn_like(x)
        flops = layer_flops(config, batch, seqlen)
        reference_state = None
        providers = ["fastbert", "eager", "hf_eager", "hf_sdpa"] + ([] if device != "cuda" and quick else ["compile"])
        for provider in providers:
            if provider.startswith("hf_"):
                try:
                    module, forward = _hf(provider, config, device, torch_dtype, mask, reference_state)
                except ImportError:
                    rows.append(Row.unsupported("bert_layer", provider, "fwd+bwd", dtype, shape, "no transformers"))
                    continue
            else:
                module, forward = _ours(provider, config, device, torch_dtype, mask)
                if reference_state is None:
                    reference_state = {k: v.float().cpu() for k, v in module.state_dict().items()}

            step = _fwd_bwd(forward, x, grad)
            step()  # compile / autotune outside the timing
            timing = time_fn(step, device, quick=quick)
            row = Row.measured("bert_layer", provider, "fwd+bwd", dtype, shape, timing, flops=flops)
            row.tokens_per_s = batch * seqlen / (timing.median * 1e-3)
            row.peak_mem_mb = peak_memory_mb(step, device)
            rows.append(row)
    return rows


if __name__ == "__main__":
    script_main(run, __doc__)
