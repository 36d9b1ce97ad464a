import json

import numpy as np
import pytest

from storage_schemas import UserError
from trainer.report import compare, tokens_to_reach


def fake_run(path, mode, params, losses, tokens_per_eval=1000, seed=0):
    path.mkdir(parents=True)
    rows = [{"step": i, "tokens": (i + 1) * tokens_per_eval, "val_loss": v} for i, v in enumerate(losses)]
    rows.insert(1, {"step": 0, "tokens": 500, "train_loss": 9.0})  # a train-only log line is skipped
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "run.json").write_text(json.dumps({"mode": mode, "n_params": params, "seed": seed,
                                               "tokens_per_s": 100.0, "label_fingerprint": "abc"}))
    return path


def test_tokens_to_reach_interpolates():
    t, loss = np.array([1.0, 2.0, 3.0]), np.array([5.0, 4.0, 3.0])
    assert tokens_to_reach(t, loss, 3.5) == pytest.approx(2.5)
    assert tokens_to_reach(t, loss, 6.0) == 1.0
    assert tokens_to_reach(t, loss, 2.0) is None


def test_compare_groups_seeds_and_reports_efficiency(tmp_path):
    runs = [fake_run(tmp_path / "ntp", "ntp", 10, [5.0, 4.0, 3.0, 2.0]),
            fake_run(tmp_path / "cocomix-seed0", "cocomix", 12, [5.0, 3.5, 2.5, 1.5], seed=0),
            fake_run(tmp_path / "cocomix-seed1", "cocomix", 12, [5.0, 3.5, 1.5, 1.5], seed=1),
            fake_run(tmp_path / "ntp-wide", "ntp", 12, [5.0, 4.5, 4.0, 3.5])]
    report = compare(runs, tmp_path / "report").read_text()
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == {"ntp", "cocomix", "ntp-wide"}
    assert rows["cocomix"]["seeds"] == 2 and rows["cocomix"]["val_loss"] == pytest.approx(1.5)
    assert (tmp_path / "report" / "val_loss.png").stat().st_size > 1000
    assert "| cocomix | cocomix | 2 |" in report
    assert set(summary["sample_efficiency_pct"]) == {"ntp", "ntp-wide"}
    assert summary["sample_efficiency_pct"]["ntp-wide"]["cocomix"] == pytest.approx(50.0)  # mean curve hits 3.5 at 2000 of 4000


def test_compare_sample_efficiency_against_ntp(tmp_path):
    runs = [fake_run(tmp_path / "ntp", "ntp", 10, [5.0, 4.0, 3.0, 2.0]),
            fake_run(tmp_path / "cocomix", "cocomix", 12, [5.0, 3.0, 2.0, 1.5])]
    compare(runs, tmp_path / "r")
    eff = json.loads((tmp_path / "r" / "summary.json").read_text())["sample_efficiency_pct"]
    assert eff["ntp"]["cocomix"] == pytest.approx(75.0)  # reaches 2.0 at 3000 of NTP's 4000 tokens


def test_compare_refuses_non_run(tmp_path):
    with pytest.raises(UserError, match="not a training run"):
        compare([tmp_path], tmp_path / "r")
