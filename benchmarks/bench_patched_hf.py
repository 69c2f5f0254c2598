"""A transformers BERT training step: unpatched (eager and SDPA attention) vs fastbert's drop-ins.

Providers, all on the same weights and the same batch:
  hf-eager          transformers, attn_implementation="eager"
  hf-sdpa           transformers, attn_implementation="sdpa" (the baseline of the goal)
  hf-attn-impl      transformers with attn_implementation="fastbert" (only the attention core swapped)
  hf-patch_hf       transformers (sdpa) after fastbert.patch_hf: fused q/k/v + attention, residual+LN,
                    bias+GELU, unpadded encoder when the varlen kernel runs

The step is a sequence-classification fine-tuning step (forward with labels, backward, AdamW), so the
encoder — what the patch changes — is what is measured. The batch has a realistic length mix: lengths
drawn uniformly from [L/8, L] (mean ≈ 0.56 L). TFLOP/s count the useful work only (real tokens:
6 × encoder parameters per token + attention 3.5 × 4·H·D·ΣLᵢ²), so every provider is scored on the same
FLOPs and the TFLOP/s ratio is the tokens/s ratio. Goal on the H200 (bf16, bert-base, seq512):
hf-patch_hf ≥ 2× hf-sdpa.
"""
from __future__ import annotations

import contextlib
import copy
import gc

import torch

from .common import DTYPES, Row, script_main, time_fn

OP = "patched_hf"
BASELINE = "hf_sdpa"


def shapes(device: str, quick: bool) -> tuple[dict, int, int]:
    """(transformers BertConfig kwargs, batch, seqlen)."""
    if device == "cuda":
        # bert-base at seq512: the size of the goal (quick only shortens the timing, not the shape)
        return dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    vocab_size=30522), 32, 512
    config = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=1000)
    return config, 4, (32 if quick else 64)


def length_mix(batch: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(max(1, seqlen // 8), seqlen + 1, (batch,), generator=g)


def useful_flops(config: dict, lengths: torch.Tensor) -> float:
    """Forward + backward FLOPs of the encoder on the real tokens only."""
    h, inter, layers, heads = (config[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads"))
    params_per_layer = 4 * h * h + 2 * h * inter
    dense = 6 * params_per_layer * layers * float(lengths.sum())
    attention = 3.5 * 4 * heads * (h // heads) * float((lengths.double() ** 2).sum()) * layers
    return dense + attention


def _build(base, provider: str):
    import fastbert
    import fastbert.hf

    if provider == "hf_eager":
        model = copy.deepcopy(base)
        model.set_attn_implementation("eager")
        return model
    if provider == "hf_sdpa":
        return copy.deepcopy(base)
    if provider == "attn_impl":
        if not fastbert.hf.register_attention():
            return None
        model = copy.deepcopy(base)
        model.set_attn_implementation("fastbert")
        return model
    if provider == "patched":
        return fastbert.patch_hf(copy.deepcopy(base))
    raise ValueError(provider)


def _train_step(model, optimizer, scaler, autocast, batch):
    """One optimizer step of ``model`` on ``batch`` (bound now, not at call time: the caller loops)."""
    def step():
        with autocast:
            loss = model(**batch).loss
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def run(device: str, dtype: str, quick: bool) -> list[Row]:
    config, batch, seqlen = shapes(device, quick)
    shape = f"B{batch} L{seqlen} H{config['hidden_size']}x{config['num_hidden_layers']}"
    providers = ("hf_eager", "hf_sdpa", "attn_impl", "patched")
    try:
        import transformers
    except ImportError:
        return [Row.unsupported(OP, p, "step", dtype, shape, "transformers is not installed") for p in providers]
    if device == "cuda" and not torch.cuda.is_available():
        return [Row.unsupported(OP, p, "step", dtype, shape, "no CUDA device") for p in providers]

    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**config, max_position_embeddings=max(512, seqlen), num_labels=2,
                                        attn_implementation="sdpa")
    base = transformers.BertForSequenceClassification(hf_config).to(device).train()
    lengths = length_mix(batch, seqlen)
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).long()
    g = torch.Generator().manual_seed(1)
    ids = (torch.randint(5, hf_config.vocab_size, (batch, seqlen), generator=g) * mask).to(device)
    mask, labels = mask.to(device), torch.randint(0, 2, (batch,), generator=g).to(device)
    shape += f" mix real{float(lengths.sum()) / (batch * seqlen):.2f}"
    flops = useful_flops(config, lengths)
    autocast = (contextlib.nullcontext() if dtype == "fp32" else torch.autocast(device, dtype=DTYPES[dtype]))
    if dtype == "fp16" and device != "cuda":
        return [Row.unsupported(OP, p, "step", dtype, shape, "fp16 autocast needs CUDA") for p in providers]

    rows = []
    for provider in providers:
        model = _build(base, provider)
        if model is None:
            rows.append(Row.unsupported(OP, provider, "step", dtype, shape, "this transformers has no attention registry"))
            continue
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")
        scaler = torch.amp.GradScaler(device) if dtype == "fp16" else None

        step = _train_step(model, optimizer, scaler, autocast, dict(input_ids=ids, attention_mask=mask, labels=labels))

        try:
            timing = time_fn(step, device, quick=quick)
        except Exception as err:  # a provider that cannot run here is a row saying why, not a crashed suite
            rows.append(Row.unsupported(OP, provider, "step", dtype, shape, f"{type(err).__name__}: {err}"))
        else:
            row = Row.measured(OP, provider, "step", dtype, shape, timing, flops=flops)
            rows.append(row)
        del model, optimizer, step
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def summary(rows: list[Row]) -> str:
    """Speed of each provider relative to the hf-sdpa baseline (equal to the tokens/s ratio)."""
    measured = {r.provider: r for r in rows if r.ms_median is not None}
    base = measured.get(BASELINE)
    if base is None:
        return f"no {BASELINE} baseline measured"
    lines = [f"{p:<18} {base.ms_median / r.ms_median:5.2f}x {BASELINE}" for p, r in measured.items()]
    lines.append(f"goal (H200, bf16, bert-base seq512 with a length mix): hf-patch_hf >= 2.00x {BASELINE}")
    return "\n".join(lines)


if __name__ == "__main__":
    script_main(run, __doc__, summary=summary)
