"""Model level: one BertForPreTraining training step (forward with MLM+NSP labels, backward, AdamW).

Providers: ``fastbert`` (auto backend: fused kernels, unpadded encoder on CUDA), ``fastbert_padded``
(the same kernels, padded encoder), ``eager`` (our torch reference, padded), ``compile`` (torch.compile of the eager path), ``hf_eager`` / ``hf_sdpa``
(transformers' BertForPreTraining with the same weights). Reported: ms per step, real tokens/s,
model TFLOP/s and MFU (% of the measured GEMM ceiling), peak memory (CUDA). On the CPU the providers'
steps alternate (a change of load hits all alike).

Model FLOPs count useful work only (real tokens; the MLM decoder on masked tokens): see
fastbert/pretrain/flops.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .common import DTYPES, Row, hf_bert_config, peak_memory_mb, script_main, time_fn, time_interleaved
from fastbert.masking import IGNORE_INDEX

MASK_RATE = 0.15


@dataclass(frozen=True)
class Case:
    preset: str
    batch: int
    seqlen: int
    lengths: str  # "full" | "mix"
    providers: tuple[str, ...]


def cases(device: str, quick: bool) -> list[Case]:
    if device != "cuda":
        if quick:  # a smoke test of every provider but compile (whose compile time dwarfs the step)
            return [Case("bert-tiny", 4, 32, "mix", ("fastbert", "eager", "hf_eager", "hf_sdpa"))]
        providers = ("fastbert", "eager", "compile", "hf_eager", "hf_sdpa")
        # seq 128, fastbert vs transformers' SDPA (issue 25's goal: >= 1.0x), bert-tiny and BERT-base size
        return [Case("bert-tiny", 8, 64, "full", providers), Case("bert-tiny", 8, 64, "mix", providers),
                Case("bert-tiny", 32, 128, "mix", ("fastbert", "hf_sdpa")),
                Case("bert-base-uncased", 8, 128, "full", ("fastbert", "hf_sdpa")),
                Case("bert-base-uncased", 8, 128, "mix", ("fastbert", "hf_sdpa"))]
    all_providers = ("fastbert", "eager", "compile", "hf_eager", "hf_sdpa")
    if quick:
        return [Case("bert-base-uncased", 32, 128, "full", ("fastbert", "eager", "hf_sdpa"))]
    return [
        Case("bert-base-uncased", 64, 128, "full", all_providers),
        Case("bert-base-uncased", 64, 128, "mix", ("fastbert", "eager", "hf_eager", "hf_sdpa")),
        Case("bert-base-uncased", 16, 512, "full", ("fastbert", "eager", "hf_eager", "hf_sdpa")),
        Case("bert-base-uncased", 16, 512, "mix", ("fastbert", "fastbert_padded", "eager", "hf_eager", "hf_sdpa")),
        Case("bert-large-uncased", 32, 128, "full", ("fastbert", "eager", "hf_sdpa")),
        Case("bert-large-uncased", 8, 512, "mix", ("fastbert", "eager", "hf_sdpa")),
    ]


def make_batch(config, case: Case, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids; "mix" lengths follow Beta(2, 2)·seqlen (about half the slots are padding, as in
    BERT pre-training data at seq 512); 15% of real tokens carry MLM labels."""
    g = torch.Generator().manual_seed(seed)
    b, l = case.batch, case.seqlen
    if case.lengths == "full":
        lengths = torch.full((b,), l)
    else:
        beta_2_2 = torch.rand(b, 3, generator=g).median(dim=1).values  # the median of 3 uniforms is Beta(2, 2)
        lengths = (beta_2_2 * l).long().clamp(8, l)
    mask = torch.arange(l)[None, :] < lengths[:, None]
    ids = torch.randint(1000, config.vocab_size, (b, l), generator=g) * mask
    labels = torch.where((torch.rand(b, l, generator=g) < MASK_RATE) & mask, ids, torch.full_like(ids, IGNORE_INDEX))
    token_types = ((torch.arange(l)[None, :] >= lengths[:, None] // 2) & mask).long()
    nsp = torch.randint(0, 2, (b,), generator=g)
    batch = dict(input_ids=ids, attention_mask=mask.long(), token_type_ids=token_types, labels=labels,
                 next_sentence_label=nsp)
    return {k: v.to(device) for k, v in batch.items()}


def model_flops(config, batch: dict[str, torch.Tensor]) -> float:
    from fastbert.pretrain.flops import training_flops

    return training_flops(config, batch["attention_mask"], int((batch["labels"] != IGNORE_INDEX).sum()))


def build(provider: str, config, device: str):
    """A model for ``provider`` plus the context its steps run under (backend choice)."""
    import fastbert

    torch.manual_seed(0)
    ours = fastbert.BertForPreTraining(config).to(device).train()
    if provider in ("fastbert", "fastbert_padded", "eager", "compile"):
        fused = provider.startswith("fastbert")
        ctx = (lambda: fastbert.backend.use("auto")) if fused else (lambda: fastbert.backend.use("torch"))
        if provider == "fastbert_padded":
            ours.bert.unpad = False
        model = torch.compile(ours) if provider == "compile" else ours
        return model, ctx, lambda out: out.loss
    import transformers

    hf_config = hf_bert_config(config)
    attn = "eager" if provider == "hf_eager" else "sdpa"
    hf = transformers.BertForPreTraining._from_config(hf_config, attn_implementation=attn)
    hf.load_state_dict(ours.state_dict())
    return hf.to(device).train(), contextlib.nullcontext, lambda out: out.loss


def _step_fn(model, ctx, loss_of, batch, device: str, amp_dtype):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
    autocast = torch.autocast(device, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()

    def step():
        with ctx(), autocast:
            loss = loss_of(model(**batch))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _row(provider: str, dtype: str, shape: str, timing, flops: float, tokens: int, peak_mb: float | None) -> Row:
    row = Row.measured("model", provider, "step", dtype, shape, timing, flops=flops)
    row.tokens_per_s = tokens / (timing.median * 1e-3)
    row.peak_mem_mb = peak_mb
    return row


def run(device: str, dtype: str, quick: bool) -> list[Row]:
    import fastbert

    amp_dtype = DTYPES[dtype] if dtype != "fp32" else None
    rows = []
    for case in cases(device, quick):
        config = fastbert.BertConfig.from_pretrained(case.preset)
        batch = make_batch(config, case, device)
        flops = model_flops(config, batch)
        tokens = int(batch["attention_mask"].sum())
        shape = f"{case.preset} B={case.batch} L={case.seqlen} {case.lengths}"
        steps = {}
        for provider in case.providers:
            if provider.startswith("hf_"):
                try:
                    import transformers  # noqa: F401
                except ImportError:
                    rows.append(Row.unsupported("model", provider, "step", dtype, shape, "transformers not installed"))
                    continue
            model, ctx, loss_of = build(provider, config, device)
            inputs = batch
            if not provider.startswith("hf_"):
                # As fastbert's data path feeds it: masked positions found on the CPU, no device sync.
                flat = batch["labels"].reshape(-1)
                inputs = {**batch, "masked_positions": torch.nonzero(flat.cpu() != IGNORE_INDEX).flatten().to(device)}
            steps[provider] = _step_fn(model, ctx, loss_of, inputs, device, amp_dtype)
            steps[provider]()  # first call: compilation / autotuning outside the timing
            if device == "cuda":  # one model at a time on the GPU (memory); on the CPU all, interleaved below
                timing = time_fn(steps[provider], device, quick=quick, rep_ms=None if quick else 1500)
                rows.append(_row(provider, dtype, shape, timing, flops, tokens, peak_memory_mb(steps.pop(provider),
                                                                                               device)))
                del model
                torch.cuda.empty_cache()
        if steps:
            budget = 0.5 if quick else (60.0 if case.preset.startswith("bert-base") else 20.0)
            for provider, timing in time_interleaved(steps, device, quick=quick, budget_s=budget).items():
                rows.append(_row(provider, dtype, shape, timing, flops, tokens, None))
    return rows


if __name__ == "__main__":
    script_main(run, __doc__)
