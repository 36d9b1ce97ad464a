"""`python -m bench.gpu_check` on the CPU (reduced shapes): every field of the report is there with a sane
value, the JSON file matches, and a bad option is one line with exit code 2."""

import json
import math

import pytest

from bench import gpu_check

FRACTION = ("mfu_vs_matmul", "ids_identical", "ids_same_set", "top1_identical")


def _sane(entry: dict) -> None:
    assert entry["seconds"] > 0 and entry["tokens_per_s"] > 0 and entry["warmup_s"] > 0
    assert 0.01 < entry["mfu_vs_matmul"] < 1.5  # of the CPU's own best matmul rate
    assert entry["mfu_vs_spec"] is None  # no spec peak for a CPU unless given
    assert 0 < entry["peak_gib"] < 4 and 0 < entry["planned_gib"] < 4
    assert 0.3 < entry["peak_gib"] / entry["planned_gib"] < 3  # the plan's memory is within a few x of the truth


def test_cpu_report_has_every_field_with_sane_values(tmp_path, capsys):
    out = tmp_path / "gpu-check.json"
    report = gpu_check.main(["--device", "cpu", "--extract-batch", "1", "--train-batch", "1", "--steps", "1",
                             "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert report["device"] == "cpu" and report["shapes"] == "reduced" and report["precision"] == "fp32"
    assert 0.001 < report["matmul_tflops"] < 50 and report["spec_tflops"] is None and report["seconds"] > 0
    ex = report["extraction"]
    assert (ex["batch"], ex["window"]) == (1, 256) and ex["tokens_per_s"] > 0
    assert 0.01 < ex["mfu_vs_matmul"] < 1.5 and ex["mfu_vs_spec"] is None
    assert 0 < ex["peak_gib"] < 4 and 0.3 < ex["peak_gib"] / ex["planned_gib"] < 3
    assert set(report["training"]) == {"ntp", "cocomix", "kd"}
    for runs in report["training"].values():
        _sane(runs["eager"])
        assert "torch.compile not asked for" in runs["compiled"]["skipped"]
    t = report["training"]
    assert t["cocomix"]["eager"]["params"] > t["ntp"]["eager"]["params"] == t["kd"]["eager"]["params"]
    lab = report["labels_bf16_vs_fp32"]
    assert lab["positions"] > 200  # of the 255 labelled positions of one 256-token window
    assert all(0.5 < lab[k] <= 1 for k in FRACTION if k in lab)  # bf16 mostly picks the same concepts
    assert 0 < lab["max_score_diff"] < lab["max_abs_score"] and math.isfinite(lab["max_abs_score"])
    text = capsys.readouterr().out
    for word in ("extraction", "train ntp", "train cocomix", "train kd", "labels bf16 vs fp32"):
        assert word in text


def test_bad_option_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.main(["--device", "tpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device must be auto, cuda or cpu") and err.count("\n") == 1
