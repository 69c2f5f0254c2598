"""The static report's compare tool on small synthetic results.csv files."""
import csv

import pytest

from fastbert.kernels.static.compare import main

HEADER = ["op", "mode", "shape", "config", "registers", "spill_bytes", "ld_global_v4", "note"]


def _write(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(HEADER)
        writer.writerow(["ceiling", "gemm", "1x1", "", "", "", "", ""])  # not a static row: ignored
        writer.writerows(["static", *row, ""] for row in rows)
    return path


BASE = [("_k", "layer_norm bf16 N768 drop", "tuned BLOCK_M=1 w4 s3", 40, 0, 6),
        ("_j", "bias_gelu bf16 N768", "fixed BLOCK_M=16 w4 s3", 70, 0, 4)]


def _run(tmp_path, new_rows, *extra):
    old = _write(tmp_path / "old.csv", BASE)
    new = _write(tmp_path / "new.csv", new_rows)
    return main([str(old), str(new), *extra])


def test_identical_and_within_slack_pass(tmp_path, capsys):
    assert _run(tmp_path, BASE) == 0
    shifted = [(*BASE[0][:3], 44, 0, 6), BASE[1]]
    assert _run(tmp_path, shifted) == 0
    assert "registers 40 -> 44" in capsys.readouterr().out


@pytest.mark.parametrize("row, message", [
    ((*BASE[0][:3], 45, 0, 6), "registers 40 -> 45"),
    ((*BASE[0][:3], 35, 0, 6), "registers 40 -> 35"),
    ((*BASE[0][:3], 40, 8, 6), "spills 8 B"),
    ((*BASE[0][:3], 40, 0, 5), "16-byte loads 6 -> 5"),
    (("_k", "layer_norm bf16 N768 drop", "tuned BLOCK_M=2 w4 s3", 40, 0, 6), "missing from the new report"),
])
def test_regressions_exit_non_zero(tmp_path, capsys, row, message):
    assert _run(tmp_path, [row, BASE[1]]) == 1
    assert message in capsys.readouterr().out


def test_rename_maps_old_kernel_names_per_op(tmp_path):
    renamed = [("_layer_norm_k", *BASE[0][1:]), BASE[1]]
    assert _run(tmp_path, renamed) == 1  # without the map the rows do not match
    assert _run(tmp_path, renamed, "--rename", "layer_norm:_k=_layer_norm_k") == 0


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "bad.csv"), str(tmp_path / "bad.csv")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "not a static report" in err and "Traceback" not in err


def test_subset_run_compares_only_its_cases(tmp_path):
    assert _run(tmp_path, BASE[:1]) == 1  # the other case's row is missing
    assert _run(tmp_path, BASE[:1], "--common-cases") == 0
    only_new = ("_k", "layer_norm fp16 N768 drop", "tuned BLOCK_M=1 w4 s3", 40, 0, 6)
    assert _run(tmp_path, [*BASE, only_new], "--common-cases") == 0
    assert _run(tmp_path, [*BASE, only_new]) == 1
