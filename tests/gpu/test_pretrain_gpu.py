"""On a CUDA GPU: a short pre-training run in bf16 and in fp16 (GradScaler) with the fused kernels."""
import json

import pytest

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_short_run_on_gpu(tmp_path, precision):
    from fastbert.data import prepare_corpus
    from fastbert.pretrain.trainer import PretrainConfig, pretrain

    corpus = tmp_path / "corpus.txt"
    words = "the quick brown fox jumps over a lazy dog near the quiet river bank".split()
    lines = []
    for d in range(80):
        for s in range(6):
            lines.append(" ".join(words[(d + s + i) % len(words)] for i in range(9)) + " .")
        lines.append("")
    corpus.write_text("\n".join(lines))
    prepare_corpus([corpus], tmp_path / "data", vocab_size=120)
    result = pretrain(PretrainConfig(model="bert-mini", data=str(tmp_path / "data"), out=str(tmp_path / "out"),
                                     max_steps=40, batch_size=32, seq_len=64, precision=precision, lr=5e-3,
                                     log_every=5, eval_every=40, num_workers=2, progress=False, device="cuda"))
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["tokens_per_s"] > 0 for r in steps)
    if precision == "fp16":
        assert all(r["loss_scale"] > 0 for r in steps) and "skipped_steps" in steps[-1]
