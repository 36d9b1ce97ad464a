import json
import math

import numpy as np
import pytest

from storage_schemas import UserError
from trainer.report import (
    betainc,
    compare,
    paired_difference,
    t_critical,
    t_two_sided_p,
    tokens_to_reach,
    zoomed,
)

T95_DF2 = 4.303  # two-sided 95% Student t for n = 3 pairs, from the printed tables


def fake_run(path, mode, params, losses, tokens_per_eval=1000, seed=0, sources=None):
    """A run folder as training writes it; `sources` {name: loss per eval} gives the new val_sources format."""
    path.mkdir(parents=True)
    rows = [{"step": i, "tokens": (i + 1) * tokens_per_eval, "val_loss": v} for i, v in enumerate(losses)]
    for i, row in enumerate(rows):
        if sources is not None:
            row["val_sources"] = {name: curve[i] for name, curve in sources.items()}
    rows.insert(1, {"step": 0, "tokens": 500, "train_loss": 9.0, "val_loss": None, "val_sources": None})  # skipped
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    info = {"mode": mode, "n_params": params, "seed": seed, "tokens_per_s": 100.0, "label_fingerprint": "abc"}
    if sources is not None:
        info["final_val_sources"] = {name: curve[-1] for name, curve in sources.items()}
    (path / "run.json").write_text(json.dumps(info))
    return path


def read_summary(out):
    return json.loads((out / "summary.json").read_text())


def test_tokens_to_reach_interpolates():
    t, loss = np.array([1.0, 2.0, 3.0]), np.array([5.0, 4.0, 3.0])
    assert tokens_to_reach(t, loss, 3.5) == pytest.approx(2.5)
    assert tokens_to_reach(t, loss, 6.0) == 1.0
    assert tokens_to_reach(t, loss, 2.0) is None


@pytest.mark.parametrize(("df", "expected"), [(1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042), (100_000, 1.960)])
def test_t_critical_matches_tables(df, expected):
    assert t_critical(df) == pytest.approx(expected, abs=1e-3)


def test_t_distribution_against_closed_forms():
    # df = 1 is the Cauchy distribution: P(|T| > t) = 1 - 2 atan(t) / pi
    for t in (0.3, 1.0, 12.706):
        assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-9)
    assert betainc(0.5, 0.5, 0.3) == pytest.approx(2 / math.pi * math.asin(math.sqrt(0.3)), rel=1e-12)
    assert betainc(3.0, 1.0, 0.4) == pytest.approx(0.4 ** 3, rel=1e-12)
    assert betainc(2.0, 5.0, 0.0) == 0.0 and betainc(2.0, 5.0, 1.0) == 1.0


def test_paired_difference_single_pair_has_no_ci_and_only_shared_seeds_count():
    d = paired_difference({0: 2.0, 1: 2.5}, {1: 2.7, 2: 3.0})
    assert d["n"] == 1 and d["mean"] == pytest.approx(-0.2) and d["ci_low"] is None and d["verdict"] == "no CI"
    assert paired_difference({0: 1.0}, {1: 1.0})["verdict"] == "no shared seed"


def test_compare_groups_seeds_and_reports_efficiency(tmp_path):
    runs = [fake_run(tmp_path / "ntp", "ntp", 10, [5.0, 4.0, 3.0, 2.0]),
            fake_run(tmp_path / "cocomix-seed0", "cocomix", 12, [5.0, 3.5, 2.5, 1.5], seed=0),
            fake_run(tmp_path / "cocomix-seed1", "cocomix", 12, [5.0, 3.5, 1.5, 1.5], seed=1),
            fake_run(tmp_path / "ntp-wide", "ntp", 12, [5.0, 4.5, 4.0, 3.5])]
    report = compare(runs, tmp_path / "report").read_text()
    summary = read_summary(tmp_path / "report")
    rows = {r["run"]: r for r in summary["rows"]}
    assert set(rows) == {"ntp", "cocomix", "ntp-wide"}
    assert rows["cocomix"]["seeds"] == 2 and rows["cocomix"]["val_loss"] == pytest.approx(1.5)
    assert (tmp_path / "report" / "val_loss.png").stat().st_size > 1000
    assert "| cocomix | cocomix | 2 |" in report
    assert set(summary["sample_efficiency_pct"]) == {"ntp", "ntp-wide"}
    # only seed 0 has a baseline partner: its curve hits ntp-wide's 3.5 at 2000 of 4000, ntp's 2.0 at 3500
    assert summary["sample_efficiency_pct"]["ntp-wide"]["cocomix"] == pytest.approx(50.0)
    assert summary["sample_efficiency_pct"]["ntp"]["cocomix"] == pytest.approx(87.5)
    assert summary["tokens_to_reach"]["ntp"]["cocomix"]["n"] == 1
    assert "Sample efficiency against `ntp`" in report and "| cocomix | 88% | in 1 of 1 seeds |" in report


def test_compare_sample_efficiency_against_ntp(tmp_path):
    runs = [fake_run(tmp_path / "ntp", "ntp", 10, [5.0, 4.0, 3.0, 2.0]),
            fake_run(tmp_path / "cocomix", "cocomix", 12, [5.0, 3.0, 2.0, 1.5])]
    compare(runs, tmp_path / "r")
    eff = read_summary(tmp_path / "r")["sample_efficiency_pct"]
    assert eff["ntp"]["cocomix"] == pytest.approx(75.0)  # reaches 2.0 at 3000 of NTP's 4000 tokens


def test_compare_refuses_non_run(tmp_path):
    with pytest.raises(UserError, match="not a training run"):
        compare([tmp_path], tmp_path / "r")


def test_compare_refuses_two_runs_of_one_seed(tmp_path):
    runs = [fake_run(tmp_path / "a" / "ntp", "ntp", 10, [5.0, 4.0]),
            fake_run(tmp_path / "b" / "ntp", "ntp", 10, [5.0, 3.0])]
    with pytest.raises(UserError, match="both have seed 0"):
        compare(runs, tmp_path / "r")
    assert not (tmp_path / "r").exists()


# A study: 3 seeds per arm, final losses and per-source finals chosen so the verdicts are known by hand.
FINALS = {"ntp": [3.00, 3.10, 2.95], "ntp-wide": [2.90, 3.05, 2.80], "cocomix": [2.90, 2.95, 2.85],
          "pause": [3.30, 3.35, 3.40]}
AUSTEN = {"ntp": [3.5, 3.6, 3.4], "ntp-wide": [3.4, 3.5, 3.3], "cocomix": [3.3, 3.45, 3.3], "pause": [3.9, 3.8, 3.7]}
DOCS = {"ntp": [2.5, 2.6, 2.5], "ntp-wide": [2.4, 2.6, 2.3], "cocomix": [2.5, 2.45, 2.4], "pause": [2.7, 2.9, 3.1]}


@pytest.fixture
def study(tmp_path):
    runs = []
    for arm, finals in FINALS.items():
        mode = "ntp" if arm.startswith("ntp") else arm
        for seed, final in enumerate(finals):
            sources = {"austen": [5.5, 4.5, AUSTEN[arm][seed]], "python-docs": [4.5, 3.5, DOCS[arm][seed]]}
            runs.append(fake_run(tmp_path / "runs" / f"{arm}-seed{seed}", mode, 10, [5.0, 4.0, final], seed=seed,
                                 sources=sources))
    out = tmp_path / "report"
    return compare(runs, out).read_text(), read_summary(out), out


def test_study_mean_and_std_per_source(study):
    report, summary, _ = study
    rows = {r["run"]: r for r in summary["rows"]}
    assert summary["sources"] == ["austen", "python-docs"]
    for arm in FINALS:
        assert rows[arm]["val_loss"] == pytest.approx(np.mean(FINALS[arm]))
        assert rows[arm]["val_loss_std"] == pytest.approx(np.std(FINALS[arm], ddof=1))
        for name, table in (("austen", AUSTEN), ("python-docs", DOCS)):
            assert rows[arm]["sources"][name]["mean"] == pytest.approx(np.mean(table[arm]))
            assert rows[arm]["sources"][name]["std"] == pytest.approx(np.std(table[arm], ddof=1))
    assert "| val ppl | tokens/s | austen | python-docs |" in report
    pause = f"{np.mean(FINALS['pause']):.3f} ± {np.std(FINALS['pause'], ddof=1):.3f}"
    assert f"| pause | pause | 3 | 0.00M | 0.00M | {pause} |" in report
    assert f"{np.mean(DOCS['pause']):.3f} ± {np.std(DOCS['pause'], ddof=1):.3f} |" in report


def hand_ci(arm, base):
    d = np.array(arm) - np.array(base)
    half = T95_DF2 * d.std(ddof=1) / math.sqrt(len(d))
    return d.mean(), d.mean() - half, d.mean() + half


@pytest.mark.parametrize(("arm", "base", "verdict"), [("cocomix", "ntp", "better"),
                                                      ("cocomix", "ntp-wide", "inside noise"),
                                                      ("pause", "ntp", "worse"), ("pause", "ntp-wide", "worse")])
def test_study_paired_difference_matches_hand_computation(study, arm, base, verdict):
    report, summary, _ = study
    d = summary["paired"][base][arm]["total"]
    mean, lo, hi = hand_ci(FINALS[arm], FINALS[base])
    assert d["n"] == 3 and d["seeds"] == [0, 1, 2] and d["t"] == pytest.approx(T95_DF2, abs=1e-3)
    assert (d["mean"], d["ci_low"], d["ci_high"]) == pytest.approx((mean, lo, hi), abs=2e-4)
    assert d["verdict"] == verdict
    assert f"| {arm} | {base} | 3 | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] | {verdict} |" in report
    for name, table in (("austen", AUSTEN), ("python-docs", DOCS)):
        s = summary["paired"][base][arm]["sources"][name]
        assert (s["mean"], s["ci_low"], s["ci_high"]) == pytest.approx(hand_ci(table[arm], table[base]), abs=2e-4)


def test_study_verdict_lists(study):
    report, summary, _ = study
    assert set(summary["paired"]) == {"ntp", "ntp-wide"}  # NTP groups are baselines, not arms
    assert set(summary["paired"]["ntp"]) == {"cocomix", "pause"}
    noise = report.split("Inside noise")[1].split("Significant")[0]
    significant = report.split("Significant (95% CI excludes 0):")[1]
    assert "`cocomix` vs `ntp-wide`" in noise and "`cocomix` vs `ntp`:" not in noise
    assert "`cocomix` vs `ntp`: better" in significant and "`pause` vs `ntp`: worse" in significant
    assert "`cocomix` vs `ntp-wide`" not in significant


def test_against_adds_a_baseline_by_name(study, tmp_path):
    _, _, out = study
    runs = sorted(p for p in (out.parent / "runs").iterdir())
    report = compare(runs, tmp_path / "r", against=("cocomix", "ntp")).read_text()
    summary = read_summary(tmp_path / "r")
    assert set(summary["paired"]) == {"ntp", "ntp-wide", "cocomix"}
    assert set(summary["paired"]["cocomix"]) == {"pause"}  # not against itself, and NTP groups are no arms
    d = summary["paired"]["cocomix"]["pause"]["total"]
    mean, lo, hi = hand_ci(FINALS["pause"], FINALS["cocomix"])
    assert (d["mean"], d["ci_low"], d["ci_high"], d["verdict"]) == pytest.approx((mean, lo, hi, "worse"), abs=2e-4)
    assert f"| pause | cocomix | 3 | {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] | worse |" in report
    assert "## Sample efficiency against `cocomix`" in report
    assert summary["paired"]["ntp"] == read_summary(out)["paired"]["ntp"]  # the NTP comparisons unchanged


def test_against_refuses_an_unknown_group(study, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    _, _, out = study
    r = CliRunner().invoke(app, ["compare", *map(str, (out.parent / "runs").iterdir()), "--out",
                                 str(tmp_path / "r"), "--against", "cocomix-negated"])
    assert r.exit_code == 2, r.output
    assert "--against cocomix-negated: no such group among the runs (" in r.stderr
    assert not (tmp_path / "r").exists()


def test_study_plot_is_a_png_with_a_panel_per_source(study):
    import matplotlib.image

    _, _, out = study
    png = out / "val_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = matplotlib.image.imread(png).shape[:2]
    assert 1.6 * h < w < 2.4 * h  # total + 2 sources side by side; a zoomed row below
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "summary.json", "val_loss.png"]  # no temp files


def test_zoomed_row_leaves_out_arms_far_behind_the_best():
    finals = {"ntp": 5.11, "cocomix": 5.04, "kd": 4.92, "pause": 6.57, "no-pred": 5.43, "edge": 5.41}
    assert zoomed(finals) == ["ntp", "cocomix", "kd", "edge"]  # within 0.5 nats of kd's 4.92
    assert zoomed({"only": 7.0}) == ["only"] and zoomed({}) == []


def test_tokens_to_reach_per_seed_pair(tmp_path):
    base = [[5.0, 4.0, 3.5, 3.0], [5.0, 4.0, 3.5, 3.2], [5.0, 4.0, 3.0, 2.0]]
    arm = [[5.0, 4.0, 2.0, 1.8],  # reaches 3.0 halfway from 2000 to 3000 tokens: 2500 of 4000
           [3.1, 3.0, 2.9, 2.8],  # below 3.2 at the first eval: 1000 of 4000
           [5.0, 4.0, 3.0, 2.5]]  # never reaches 2.0
    runs = [fake_run(tmp_path / f"ntp-seed{s}", "ntp", 10, base[s], seed=s) for s in range(3)]
    runs += [fake_run(tmp_path / f"cocomix-seed{s}", "cocomix", 12, arm[s], seed=s) for s in range(3)]
    report = compare(runs, tmp_path / "r").read_text()
    e = read_summary(tmp_path / "r")["tokens_to_reach"]["ntp"]["cocomix"]
    assert [p["tokens"] for p in e["pairs"]] == [pytest.approx(2500.0), pytest.approx(1000.0), None]
    assert [p["pct"] for p in e["pairs"]] == [pytest.approx(62.5), pytest.approx(25.0), None]
    assert (e["n"], e["reached"]) == (3, 2)
    assert (e["mean_pct"], e["std_pct"]) == pytest.approx((43.75, np.std([62.5, 25.0], ddof=1)))
    assert "| cocomix | 44% ± 27% | in 2 of 3 seeds |" in report


def test_old_format_runs_still_report(tmp_path):
    """Runs logged before val_sources existed, alone and next to a run that has them."""
    old = [fake_run(tmp_path / f"ntp-seed{s}", "ntp", 10, [5.0, 4.0, 3.0 + s / 10], seed=s) for s in range(2)]
    new = [fake_run(tmp_path / f"cocomix-seed{s}", "cocomix", 12, [5.0, 3.5, 2.9 + s / 10], seed=s,
                    sources={"austen": [5.5, 4.0, 3.3]}) for s in range(2)]
    report = compare(old, tmp_path / "old").read_text()
    assert "| ntp | ntp | 2 |" in report and "austen" not in report
    assert read_summary(tmp_path / "old")["sources"] == []
    assert (tmp_path / "old" / "val_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = compare(old + new, tmp_path / "mixed").read_text()
    summary = read_summary(tmp_path / "mixed")
    rows = {r["run"]: r for r in summary["rows"]}
    assert rows["ntp"]["sources"] == {} and rows["cocomix"]["sources"]["austen"]["mean"] == pytest.approx(3.3)
    assert summary["paired"]["ntp"]["cocomix"]["sources"] == {}  # nothing to pair a source with
    assert summary["paired"]["ntp"]["cocomix"]["total"]["mean"] == pytest.approx(-0.1)
    assert "| ntp | ntp | 2 | 0.00M | 0.00M | 3.050 ± 0.071 | 21.1 | 100 | — |" in report
