"""experiment/report.py on hand-computed fixtures: aggregation, the Markdown cells, the 2-SE flag, cost ratios,
the PNG plots and the errors that stop a wrong report."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from experiment.report import (Stat, aggregate, format_cell, format_console, format_diff,
                               load_records, standard_error, write_report)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def rec(condition: str, seed: int, group: str = "main", seconds: float | None = 10.0, rows: int | None = 1000,
        **metrics) -> dict:
    """One result record; `seconds=None` makes it untrained (train: null)."""
    train = None if seconds is None else {"seconds": seconds, "forward_rows": rows, "steps": 5, "final": {},
                                          "reference_rows": None if rows is None else rows // 2}
    return {"condition": condition, "group": group, "seed": seed, "train": train, "eval": metrics,
            "eval_seconds": 2.0}


def series(condition: str, values, group: str = "main", metric: str = "chair_i_object", seconds=None, rows=None,
           **fixed) -> list[dict]:
    """One record per value (seeds 0..n-1); `seconds`/`rows` are per-seed lists or None (defaults)."""
    out = []
    for seed, value in enumerate(values):
        kwargs = {}
        if seconds is not None:
            kwargs["seconds"] = seconds[seed]
        if rows is not None:
            kwargs["rows"] = rows[seed]
        out.append(rec(condition, seed, group=group, **kwargs, **{metric: value}, **fixed))
    return out


def table_row(markdown: str, condition: str, after: str | None = None) -> list[str]:
    """The cells of the first table row for `condition` (after the heading `after`, if given)."""
    text = markdown if after is None else markdown[markdown.index(after):]
    for line in text.splitlines():
        if line.startswith(f"| {condition} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row for {condition!r}")


def header_row(markdown: str) -> list[str]:
    line = next(line for line in markdown.splitlines() if line.startswith("| condition |"))
    return [c.strip() for c in line.strip("|").split("|")]


@pytest.fixture
def two_conditions() -> list[dict]:
    """sft: chair 0.30/0.32/0.34 (mean 0.32, std 0.02); misp: 0.20/0.22/0.27 (mean 0.23, std sqrt(0.0013))."""
    return (series("base", [0.40, 0.42, 0.44], seconds=[None] * 3)
            + series("sft", [0.30, 0.32, 0.34], seconds=[10, 12, 14], rows=[1000] * 3)
            + series("misp", [0.20, 0.22, 0.27], seconds=[30, 36, 42], rows=[4000] * 3))


@pytest.fixture
def report(tmp_path, two_conditions):
    out_md = tmp_path / "report" / "REPORT.md"
    result = write_report(two_conditions, out_md, tmp_path / "plots", title="Issue 7", preamble="Setup: tiny.")
    return out_md, result


def test_aggregate_mean_and_sample_std(two_conditions):
    table = aggregate(two_conditions)
    assert table["condition"].to_list() == ["base", "sft", "misp"]
    assert table["group"].to_list() == ["main"] * 3
    assert table["n_seeds"].to_list() == [3, 3, 3]
    sft, misp = table.row(1, named=True), table.row(2, named=True)
    assert sft["chair_i_object_mean"] == pytest.approx(0.32)
    assert sft["chair_i_object_std"] == pytest.approx(0.02)  # ddof=1: sqrt((4e-4 + 0 + 4e-4) / 2)
    assert misp["chair_i_object_mean"] == pytest.approx(0.23)
    assert misp["chair_i_object_std"] == pytest.approx(math.sqrt(0.0013))
    assert sft["train_seconds_mean"] == pytest.approx(12.0) and sft["train_seconds_std"] == pytest.approx(2.0)
    assert misp["forward_rows_mean"] == pytest.approx(4000.0)
    assert sft["eval_seconds_mean"] == pytest.approx(2.0)
    base = table.row(0, named=True)
    assert base["train_seconds_mean"] is None and base["forward_rows_mean"] is None


def test_markdown_cells_and_diff(report):
    out_md, result = report
    md = out_md.read_text(encoding="utf-8")
    assert md == result["markdown"]
    assert md.startswith("# Issue 7\n\nSetup: tiny.\n")
    assert table_row(md, "sft")[:3] == ["sft", "3", "32.0 ± 2.0"]
    assert table_row(md, "misp")[2] == "23.0 ± 3.6"
    diff = table_row(md, "misp", after="### Difference vs `sft`")
    # SE = sqrt(0.0013/3 + 0.0004/3) = 2.38 points, Welch df = 3.12, t = 3.11: -9.0 +- 7.4 points
    assert diff[2] == "-9.0* [-16.4, -1.6]"
    assert "| sft |" not in md[md.index("### Difference"):md.index("### Cost")]  # neither control
    assert "| base |" not in md[md.index("### Difference"):md.index("### Cost")]  # nor baseline
    assert "95% interval" in md


def test_t_quantile_matches_the_t_table():
    from experiment.report import t_quantile

    # two-sided 95% critical values from any t table
    for df, t in ((1, 12.706), (2, 4.303), (4, 2.776), (10, 2.228), (30, 2.042), (1000, 1.962)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-3), df
    assert t_quantile(0.95, 5) == pytest.approx(2.015, abs=1e-3)
    with pytest.raises(ValueError, match="0.5 < p < 1"):
        t_quantile(0.2, 3)


def test_flag_just_inside_and_just_outside_the_interval(tmp_path):
    """Same spread as the control (std 0.02, n 3): SE = sqrt(2 * 0.0004 / 3) = 1.633 points, Welch df = 4,
    t = 2.776: the interval's half width is 4.533 points."""
    records = (series("sft", [0.30, 0.32, 0.34]) + series("above", [0.346, 0.366, 0.386])
               + series("below", [0.344, 0.364, 0.384]))
    md = write_report(records, tmp_path / "r.md", tmp_path / "plots", title="t")["markdown"]
    assert table_row(md, "above", after="### Difference")[2] == "+4.6* [+0.1, +9.1]"
    assert table_row(md, "below", after="### Difference")[2] == "+4.4 [-0.1, +8.9]"
    se = standard_error(Stat((0.346, 0.366, 0.386)), Stat((0.30, 0.32, 0.34)))
    assert se == pytest.approx(0.016330, abs=1e-6)


def test_format_helpers():
    assert format_cell(Stat((0.30, 0.32, 0.34)), 3) == "32.0 ± 2.0"
    assert format_cell(Stat((2.0, 2.2)), 2, plain=True) == "2.10 ± 0.14"
    assert format_cell(Stat(()), 3) == "—"
    assert format_diff(Stat((0.5,)), Stat((0.3, 0.32, 0.34))) == "+18.0"  # one seed: no std, no flag
    assert format_diff(Stat((0.32, 0.32)), Stat((0.32, 0.32))) == "+0.0 [+0.0, +0.0]"
    # no spread on either side: a difference is not flagged (the interval has nothing to go on)
    assert format_diff(Stat((0.30, 0.30)), Stat((0.32, 0.32))) == "-2.0 [-2.0, -2.0]"


def test_none_metrics_excluded_and_counted(tmp_path):
    records = [rec("sft", 0, chair_i_object=0.1, prior_rate=0.2), rec("sft", 1, chair_i_object=None, prior_rate=0.2),
               rec("sft", 2, chair_i_object=0.3, prior_rate=0.2)]
    row = aggregate(records).row(0, named=True)
    assert row["n_seeds"] == 3 and row["chair_i_object_n"] == 2 and row["prior_rate_n"] == 3
    assert row["chair_i_object_mean"] == pytest.approx(0.2)
    assert row["chair_i_object_std"] == pytest.approx(math.sqrt(0.02))
    md = write_report(records, tmp_path / "r.md", tmp_path / "p", title="t")["markdown"]
    assert table_row(md, "sft")[1:3] == ["3", "20.0 ± 14.1 (n=2)"]


def test_one_seed_std_is_a_dash(tmp_path):
    records = [rec("sft", 0, chair_i_object=0.3), rec("misp", 0, chair_i_object=0.25)]
    table = aggregate(records)
    assert table["chair_i_object_std"].to_list() == [None, None]
    md = write_report(records, tmp_path / "r.md", tmp_path / "p", title="t")["markdown"]
    assert table_row(md, "sft")[2] == "30.0 ± —"
    assert table_row(md, "misp", after="### Difference")[2] == "-5.0"  # no std: never flagged


def test_cost_table_ratios(report):
    md = report[0].read_text(encoding="utf-8")
    cost = md[md.index("### Cost"):]
    assert table_row(cost, "misp") == ["misp", "3", "36.0 ± 6.0", "4,000", "2,000", "2.0", "3.00×", "4.00×"]
    assert table_row(cost, "sft")[-2:] == ["1.00×", "1.00×"]
    assert table_row(cost, "base")[2:4] == ["—", "—"] and table_row(cost, "base")[-1] == "—"


def test_headers_direction_and_absent_metrics_omitted(tmp_path):
    records = [rec("sft", s, chair_i_object=0.3, recall_object=0.6, mentions_per_caption=2.0 + s / 10,
                   pope_adversarial_yes_ratio=0.5, pope_adversarial_f1=None) for s in range(2)]
    md = write_report(records, tmp_path / "r.md", tmp_path / "p", title="t")["markdown"]
    assert header_row(md) == ["condition", "n", "CHAIR_i object ↓", "recall object ↑", "mentions/caption",
                              "POPE adversarial yes ratio"]
    assert table_row(md, "sft")[4] == "2.05 ± 0.07"  # a count: plain, two decimals
    assert "CHAIR_i shape" not in md and "F1" not in md  # absent / all-null metrics: no column of dashes


def test_plots_exist_and_links_resolve(report, tmp_path):
    out_md, result = report
    names = [p.name for p in result["plots"]]
    assert names[:2] == ["main_metrics.png", "cost.png"]
    for plot in result["plots"]:
        data = Path(plot).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", result["markdown"])
    assert sorted(Path(link).name for link in links) == sorted(names)
    for link in links:
        assert link.startswith("../plots/")  # relative to the Markdown's folder
        assert (out_md.parent / link).resolve().is_file()


def test_plots_are_deterministic(tmp_path, two_conditions):
    first = write_report(two_conditions, tmp_path / "a.md", tmp_path / "a", title="t")["plots"]
    second = write_report(two_conditions, tmp_path / "b.md", tmp_path / "b", title="t")["plots"]
    assert [Path(p).read_bytes() for p in first] == [Path(p).read_bytes() for p in second]


def test_ablation_groups(tmp_path):
    records = (series("sft", [0.30, 0.32]) + series("misp", [0.20, 0.22])
               + series("K=3", [0.25, 0.26], group="K", prior_rate=0.1) + series("K=5", [0.21, 0.22], group="K")
               + series("sft", [0.30, 0.31], group="beta") + series("beta=0.1", [0.28, 0.29], group="beta"))
    result = write_report(records, tmp_path / "r.md", tmp_path / "p", title="t")
    md = result["markdown"]
    k_section = md[md.index("## Ablation: `K`"):md.index("## Ablation: `beta`")]
    beta_section = md[md.index("## Ablation: `beta`"):]
    assert "### Difference" not in k_section  # no condition named like the control
    assert k_section.startswith("## Ablation: `K`\n") and beta_section.startswith("## Ablation: `beta`, against `sft`\n")
    assert table_row(k_section, "K=5")[1:3] == ["2", "21.5 ± 0.7"]
    # SE = 0.71 points, df = 2, t = 4.303: -2.0 +- 3.0, not flagged with two seeds
    assert table_row(beta_section, "beta=0.1", after="### Difference")[2] == "-2.0 [-5.0, +1.0]"
    assert [p.name for p in result["plots"]][-2:] == ["ablation_K.png", "ablation_beta.png"]
    assert result["table"]["group"].to_list() == ["main", "main", "K", "K", "beta", "beta"]


def test_format_console(two_conditions):
    text = format_console(two_conditions)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["condition", "n", "CHAIR_i"]
    assert "32.0±2.0" in lines[2] and lines[2].split()[-1] == "12"
    assert lines[1].split()[-1] == "-"  # base: untrained


def test_load_records(tmp_path, two_conditions):
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in two_conditions[:2]) + "\n\n", encoding="utf-8")
    assert load_records(path) == two_conditions[:2]
    path.write_text(json.dumps(two_conditions[0]) + "\n\n{broken\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        load_records(path)


def test_errors(tmp_path, two_conditions):
    with pytest.raises(ValueError, match="no results to report"):
        write_report([], tmp_path / "r.md", tmp_path / "p", title="t")
    missing = [rec("sft", 0, chair_i_object=0.3), {"condition": "x", "group": "main", "seed": 0}]
    with pytest.raises(ValueError, match="record 1: missing required key 'eval'"):
        write_report(missing, tmp_path / "r.md", tmp_path / "p", title="t")
    duplicate = two_conditions + [rec("sft", 1, chair_i_object=0.5)]
    with pytest.raises(ValueError, match=r"duplicate result for group 'main', condition 'sft', seed 1"):
        aggregate(duplicate)
    assert not (tmp_path / "r.md").exists()


def test_a_group_with_its_own_control_and_title(tmp_path):
    records = (series("sft", [0.30, 0.32]) + series("misp", [0.20, 0.22])
               + series("dpo", [0.30, 0.31], group="no_sft") + series("misp", [0.25, 0.26], group="no_sft"))
    md = write_report(records, tmp_path / "r.md", tmp_path / "p", title="t", group_controls={"no_sft": "dpo"},
                      group_titles={"no_sft": "Paper form"})["markdown"]
    section = md[md.index("## Paper form"):]
    assert "## Ablation: `no_sft`" not in md
    # misp minus dpo = 25.5 - 30.5: SE = 0.71 points, df = 2, t = 4.303
    assert table_row(section, "misp", after="### Difference vs `dpo`")[2] == "-5.0* [-8.0, -2.0]"
    assert "ratios against `dpo`" in section
