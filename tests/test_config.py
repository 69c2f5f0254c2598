import json

import pytest

from fastbert import BertConfig

# Google's published sizes: (layers, hidden, heads, intermediate, vocab)
GOOGLE_SIZES = {
    "bert-base-uncased": (12, 768, 12, 3072, 30522),
    "bert-large-uncased": (24, 1024, 16, 4096, 30522),
    "bert-base-cased": (12, 768, 12, 3072, 28996),
    "bert-tiny": (2, 128, 2, 512, 30522),
    "bert-mini": (4, 256, 4, 1024, 30522),
    "bert-small": (4, 512, 8, 2048, 30522),
    "bert-medium": (8, 512, 8, 2048, 30522),
}


@pytest.mark.parametrize("name", sorted(GOOGLE_SIZES))
def test_presets_have_googles_sizes(name):
    c = BertConfig.from_pretrained(name)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size, c.vocab_size) \
        == GOOGLE_SIZES[name]
    assert c.max_position_embeddings == 512 and c.type_vocab_size == 2 and c.layer_norm_eps == 1e-12
    assert c.hidden_act == "gelu" and c.head_dim * c.num_attention_heads == c.hidden_size


def test_presets_list_and_hub_aliases():
    assert set(BertConfig.presets()) == set(GOOGLE_SIZES)
    assert BertConfig.from_pretrained("google/bert_uncased_L-2_H-128_A-2") == BertConfig.from_pretrained("bert-tiny")


def test_overrides_and_unknown_preset():
    c = BertConfig.from_pretrained("bert-tiny", hidden_dropout_prob=0.0)
    assert c.hidden_dropout_prob == 0.0
    with pytest.raises(ValueError, match="preset"):
        BertConfig.from_pretrained("no-such-bert")
    with pytest.raises(ValueError, match="no field"):
        BertConfig.from_pretrained("bert-tiny", hiddn_size=3)


def test_json_round_trip_keeps_unknown_keys(tmp_path):
    data = BertConfig(hidden_size=80, num_attention_heads=5).to_dict()
    data["my_custom_flag"] = {"a": 1}
    data["transformers_version"] = "4.8.2"
    (tmp_path / "config.json").write_text(json.dumps(data))
    c = BertConfig.from_pretrained(tmp_path)
    assert c.hidden_size == 80 and c.extra["my_custom_flag"] == {"a": 1}
    assert "transformers_version" not in c.extra
    c.save_pretrained(tmp_path / "out")
    again = BertConfig.from_pretrained(tmp_path / "out" / "config.json")
    assert again == c
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "bert"


def test_num_labels_from_id2label():
    c = BertConfig.from_dict({"id2label": {"0": "neg", "1": "neu", "2": "pos"}})
    assert c.num_labels == 3
    assert c.to_dict()["id2label"] == {"0": "neg", "1": "neu", "2": "pos"}
    assert len(BertConfig(num_labels=4).to_dict()["id2label"]) == 4


def test_transformers_reads_our_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    BertConfig(hidden_size=80, num_attention_heads=5, num_labels=3, vocab_size=99).save_pretrained(tmp_path)
    hf = transformers.BertConfig.from_pretrained(tmp_path)
    assert (hf.hidden_size, hf.num_attention_heads, hf.num_labels, hf.vocab_size) == (80, 5, 3, 99)


@pytest.mark.parametrize("changes, message", [
    (dict(hidden_size=100, num_attention_heads=3), "divisible"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(vocab_size=2.5), "vocab_size"),
    (dict(hidden_dropout_prob=1.0), "hidden_dropout_prob"),
    (dict(hidden_act="mish"), "hidden_act"),
    (dict(position_embedding_type="relative_key"), "absolute"),
    (dict(pad_token_id=30522), "pad_token_id"),
    (dict(layer_norm_eps=0.0), "layer_norm_eps"),
])
def test_invalid_configs_raise(changes, message):
    with pytest.raises(ValueError, match=message):
        BertConfig(**changes)


def test_bad_config_files(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BertConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type"):
        BertConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize("field", ["vocab_size", "intermediate_size", "hidden_size"])
def test_absurd_sizes_in_a_config_json_are_refused_before_allocating(tmp_path, field):
    import fastbert

    config = fastbert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64).to_dict()
    config[field] = 10**12
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"BertConfig.{field} is 1000000000000, more than fastbert builds"):
        fastbert.BertForSequenceClassification.from_pretrained(tmp_path)
