"""fastbert.options: the config dataclasses are the one description of the jobs' flags (help, choices,
bounds); the parsers are built from them and validate() checks the same rules for configs made in Python."""
import argparse
import dataclasses
import re
from pathlib import Path

import pytest
import torch

from fastbert import backend, device, options
from fastbert.cli import build_parser
from fastbert.cli import main as cli_main
from fastbert.finetune import FinetuneConfig
from fastbert.options import check_options, option
from fastbert.pretrain.config import PretrainConfig
from fastbert.training.optim import OPTIMIZERS
from fastbert.training.schedule import SCHEDULES


@dataclasses.dataclass
class Example:
    path: str = option(help="a required path")
    count: int = option(3, help="how many", at_least=1)
    size: int = option(8, help="at least eight", at_least=8)
    rate: float = option(0.5, help="a fraction", above=0, below=1)
    share: float = option(1.0, help="a closed fraction", at_least=0, at_most=1)
    scale: float | None = option(None, help="optional, positive", above=0)
    mode: str = option("a", help="a choice", choices=("a", "b"))
    files: list[str] | None = option(None, help="one or more")
    fast: bool = option(False, help="a switch")
    bar: bool = option(True, help="no bar")
    hidden: float = option(0.1, help="not a flag", at_least=0, cli=False)
    plain: int = 7  # not an option: neither a flag nor checked

    def validate(self):
        check_options(self)


def parse(*argv):
    parser = argparse.ArgumentParser()
    options.add_options(parser, Example)
    return options.from_args(Example, parser.parse_args(list(argv)))


def test_flags_follow_the_fields():
    assert parse("--path", "p") == Example(path="p")
    config = parse("--path", "p", "--count", "5", "--rate", "0.25", "--scale", "2", "--mode", "b", "--files", "x",
                   "y", "--fast", "--no-bar")
    assert config == Example(path="p", count=5, rate=0.25, scale=2.0, mode="b", files=["x", "y"], fast=True,
                             bar=False)
    for argv in ([], ["--path", "p", "--mode", "c"], ["--path", "p", "--hidden", "1"], ["--path", "p", "--plain", "1"],
                 ["--path", "p", "--count", "two"]):
        with pytest.raises(SystemExit):  # argparse: a required flag, a choice, flags that do not exist, a type
            parse(*argv)


@pytest.mark.parametrize("field, value, message", [
    ("count", 0, "--count must be a positive integer, got 0"),
    ("count", True, "--count must be a positive integer, got True"),
    ("count", 2.0, "--count must be a positive integer, got 2.0"),
    ("size", 7, "--size must be an integer >= 8, got 7"),
    ("rate", 1.0, r"--rate must be a number in \(0, 1\), got 1.0"),
    ("rate", float("nan"), r"--rate must be a number in \(0, 1\), got nan"),
    ("share", 1.5, r"--share must be a number in \[0, 1\], got 1.5"),
    ("scale", float("inf"), "--scale must be a positive number, got inf"),
    ("scale", "2", "--scale must be a positive number, got '2'"),
    ("mode", "c", "--mode must be one of a, b, got 'c'"),
    ("mode", 1, "--mode must be text, got 1"),
    ("files", [], "--files must be a list of one or more values"),
    ("files", ["x", 3], "--files must be text, got 3"),
    ("hidden", -1.0, "hidden must be a number >= 0, got -1.0"),  # named by its field: it is no flag
])
def test_validate_names_the_flag_and_the_rule(field, value, message):
    with pytest.raises(ValueError, match=message):
        Example(path="p", **{field: value}).validate()


def test_in_range_values_and_none_pass():
    Example(path="p", count=1, size=8, rate=1e-9, share=0.0, scale=None, files=["x"], hidden=0, plain=-5).validate()
    Example(path=Path("p"), share=1, scale=3).validate()  # ints are numbers; paths are text


def _actions(command):
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in sub.choices[command]._actions}


@pytest.mark.parametrize("command, config_class", [("pretrain", PretrainConfig), ("finetune", FinetuneConfig)])
def test_every_config_field_is_a_described_option(command, config_class):
    actions = _actions(command)
    for f in dataclasses.fields(config_class):
        declared = options.option_of(f)
        assert declared is not None, f.name  # validate() checks it
        if declared.cli:
            assert actions[f.name].help, f.name
            assert actions[f.name].default == (f.default if f.default is not dataclasses.MISSING else None), f.name


def test_choices_have_one_source():
    for command in ("pretrain", "finetune"):
        assert tuple(_actions(command)["precision"].choices) == device.PRECISIONS
    pretrain = _actions("pretrain")
    assert tuple(pretrain["backend"].choices) == backend.BACKENDS
    assert tuple(pretrain["optimizer"].choices) == OPTIMIZERS
    assert tuple(pretrain["schedule"].choices) == SCHEDULES
    assert pretrain["device"].choices is None and _actions("finetune")["device"].choices is None


def test_pretrain_flags_keep_their_names_and_defaults():
    """The flags (and their defaults) the command had before they were derived from the dataclass."""
    # issue 26 changed the recipe: MLM-only, seq 32 x batch 128, AdamW (3e-3 by default), 5 % warmup, 1500 steps,
    # 20 eval batches of 128; and added --objective, --mlm-probability, --init-range and --dropout.
    defaults = {"model": "bert-tiny", "corpus": None, "data": None, "out": "runs/pretrain", "objective": "mlm",
                "max_steps": 1500, "batch_size": 128, "grad_accum": 1, "seq_len": 32, "phases": None, "lr": None, "warmup": 0.05,
                "schedule": "linear", "optimizer": "adamw", "weight_decay": 0.01, "clip": 1.0, "precision": "auto",
                "seed": 0, "log_every": 10, "save_every": 200, "keep": 3, "eval_every": 250, "eval_batches": 20,
                "eval_fraction": 0.05, "resume": False, "stop_at": None, "whole_word_mask": False, "packing": False,
                "compile": False, "backend": "auto", "device": "auto", "num_workers": 2, "vocab_size": 8192,
                "tokenizer": None, "mlm_probability": 0.15, "init_range": None, "dropout": None, "progress": True}
    actions = _actions("pretrain")
    flags = {a.option_strings[0]: a.dest for a in actions.values() if a.option_strings and a.dest != "help"}
    assert set(flags.values()) == set(defaults)
    assert flags["--no-progress"] == "progress" and flags["--max-steps"] == "max_steps"
    assert {name: actions[name].default for name in defaults} == defaults
    assert build_parser().parse_args(["pretrain"]).corpus is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without a GPU")
def test_pretrain_takes_cuda_n_as_finetune_does(tmp_path, capsys):
    assert build_parser().parse_args(["pretrain", "--device", "cuda:1"]).device == "cuda:1"
    assert cli_main(["pretrain", "--device", "cuda:1", "--out", str(tmp_path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda:1, but torch sees no CUDA device" in err and "Traceback" not in err


def test_help_is_readable(capsys):
    for command in ("pretrain", "finetune"):
        with pytest.raises(SystemExit):
            build_parser().parse_args([command, "--help"])
        text = capsys.readouterr().out
        assert "--max-steps" in text and "--precision {auto,bf16,fp16,fp32}" in text
        assert "(default: 128)" in text  # --seq-len's default, shown


@pytest.mark.parametrize("config_class,field,value,message", [
    (PretrainConfig, "lr", 1e300, "--lr must be a number in (0, 1]"),
    (FinetuneConfig, "lr", 2.0, "--lr must be a number in (0, 1]"),
    (PretrainConfig, "seed", 2**70, "--seed must be an integer in [0, 9223372036854775807]"),
    (FinetuneConfig, "seed", -1, "--seed must be an integer in [0, "),
    (PretrainConfig, "out", "", "--out must not be empty"),
    (PretrainConfig, "out", "  ", "--out must not be empty"),
    (PretrainConfig, "eval_batches", 100_000_000, "--eval-batches must be an integer in [0, 10000]"),
])
def test_overflowing_and_empty_values_name_the_flag(config_class, field, value, message):
    base = {} if config_class is PretrainConfig else dict(model="m", train="t.csv", eval="e.csv")
    with pytest.raises(ValueError, match=re.escape(message)):
        config_class(**base, **{field: value}).validate()


def test_backend_triton_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backend, "triton_can_run_on", lambda tensor: False)
    code = cli_main(["pretrain", "--out", str(tmp_path / "run"), "--backend", "triton", "--max-steps", "1",
                     "--eval-batches", "0", "--num-workers", "0", "--corpus", "builtin"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("fastbert pretrain: error: FASTBERT_BACKEND=triton"), err
    assert "Traceback" not in err
