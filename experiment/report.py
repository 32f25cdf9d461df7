"""Aggregate the experiment's result records (conditions x seeds) into a Markdown report with PNG plots.

    from experiment.report import load_records, write_report, format_console
    records = load_records("runs/exp/results.jsonl")
    write_report(records, Path("runs/exp/REPORT.md"), Path("runs/exp/plots"), title="Issue 7", preamble=setup)
    print(format_console(records))

One record per (group, condition, seed), one JSON object per line of `results.jsonl` (written by the runner):
`{"condition", "group", "seed", "train": {"seconds", "forward_rows", ...} | null, "eval": {metric: value | null},
"eval_seconds"}`. A metric that is null (an undefined ratio) is left out of its mean and standard deviation, and
the table says over how many seeds it was taken. Pure aggregation: no torch, no model; plots use matplotlib's Agg
canvas directly (no pyplot, no global backend) and carry no timestamp, so a rerun on the same records writes
the same bytes.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import polars as pl

from store.parquet_io import write_bytes_atomic

DEFAULT_METRICS: tuple[str, ...] = (
    "chair_i_object", "chair_s_object", "chair_i_colour", "chair_i_shape", "recall_object", "recall_colour",
    "mentions_per_caption", "well_formed", "prior_chair_i", "prior_rate", "prior_rate_visible", "prior_rate_uncertain",
    "prior_lift", "prior_probe_rate", "prior_probe_control", "prior_probe_lift", "probe_grey_said",
    "pope_random_accuracy", "pope_adversarial_accuracy", "pope_adversarial_f1", "pope_adversarial_yes_ratio")
"""The metrics of the report's tables, in column order (those no record has are left out)."""
PLOT_METRICS: tuple[str, ...] = (
    "chair_i_object", "chair_i_colour", "prior_probe_rate", "prior_probe_lift", "recall_object", "well_formed",
    "mentions_per_caption", "pope_random_accuracy")
"""The panels of `main_metrics.png` (those no record has are left out)."""
ABLATION_PLOT_METRICS: tuple[str, ...] = ("chair_i_object", "chair_i_colour", "prior_probe_rate")
CONSOLE_METRICS: tuple[str, ...] = ("chair_i_object", "chair_i_colour", "prior_probe_rate", "recall_object",
                                    "well_formed", "pope_random_accuracy")
PLAIN_METRICS = frozenset({"mentions_per_caption", "prior_lift", "prior_probe_lift"})
"""Metrics that are counts, not fractions: shown as plain numbers, never as percent."""
REQUIRED_KEYS: tuple[str, ...] = ("condition", "group", "seed", "eval")
MAIN_GROUP = "main"
DASH = "—"


# ---------------------------------------------------------------------------------------------------- records


def load_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `results.jsonl`, blank lines skipped; a bad line fails loudly with its number, because a
    silently dropped seed would change the means without anyone noticing."""
    path = Path(path)
    records: list[dict[str, Any]] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} line {lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
    return records


def validate_records(records: Sequence[Mapping[str, Any]]) -> None:
    """Raise ValueError on a record without a required key or with the wrong type, and on a duplicate
    (group, condition, seed): a rerun appended to the same file must not be counted twice."""
    seen: dict[tuple[str, str, int], int] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"record {i}: expected an object, got {type(rec).__name__}")
        for key in REQUIRED_KEYS:
            if key not in rec:
                raise ValueError(f"record {i}: missing required key {key!r} (every record needs "
                                 f"{', '.join(REQUIRED_KEYS)})")
        for key in ("condition", "group"):
            if not isinstance(rec[key], str) or not rec[key]:
                raise ValueError(f"record {i}: key {key!r} must be a non-empty string, got {rec[key]!r}")
        if not isinstance(rec["seed"], int) or isinstance(rec["seed"], bool):
            raise ValueError(f"record {i}: key 'seed' must be an integer, got {rec['seed']!r}")
        if not isinstance(rec["eval"], Mapping):
            raise ValueError(f"record {i}: key 'eval' must be an object of metrics, got {type(rec['eval']).__name__}")
        if rec.get("train") is not None and not isinstance(rec["train"], Mapping):
            raise ValueError(f"record {i}: key 'train' must be an object or null, got {type(rec['train']).__name__}")
        ident = (rec["group"], rec["condition"], rec["seed"])
        if ident in seen:
            raise ValueError(f"records {seen[ident]} and {i}: duplicate result for group {ident[0]!r}, condition "
                             f"{ident[1]!r}, seed {ident[2]} (a rerun must not be counted twice; remove one)")
        seen[ident] = i


def _number(value: Any) -> float | None:
    """A finite number as float, else None (null, NaN, booleans and strings are not measurements)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------- aggregation


@dataclass(frozen=True)
class Stat:
    """The values one quantity took over the seeds of a condition (missing ones already dropped)."""

    values: tuple[float, ...] = ()

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None for fewer than two values, where it is undefined."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Summary:
    """Everything the report needs about one (group, condition): per-seed values, not only their moments,
    so that the plots can show the seeds as dots."""

    group: str
    condition: str
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, Stat] = field(default_factory=dict)
    train_seconds: Stat = Stat()
    forward_rows: Stat = Stat()
    reference_rows: Stat = Stat()
    eval_seconds: Stat = Stat()

    @property
    def n_seeds(self) -> int:
        return len(self.seeds)

    def metric(self, name: str) -> Stat:
        return self.metrics.get(name, Stat())


def metric_names(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Eval keys that hold a number in at least one record, in first-appearance order."""
    names: dict[str, None] = {}
    for rec in records:
        for key, value in rec["eval"].items():
            if _number(value) is not None:
                names.setdefault(key, None)
    return list(names)


def summarise(records: Sequence[Mapping[str, Any]]) -> list[Summary]:
    """Validate, then one Summary per (group, condition) in first-appearance order."""
    validate_records(records)
    names = metric_names(records)
    collected: dict[tuple[str, str], dict[str, list[float]]] = {}
    costs: dict[tuple[str, str], dict[str, list[float]]] = {}
    seeds: dict[tuple[str, str], list[int]] = {}
    for rec in records:
        key = (rec["group"], rec["condition"])
        seeds.setdefault(key, []).append(rec["seed"])
        train = rec.get("train") or {}
        _append(collected.setdefault(key, {}), {m: rec["eval"].get(m) for m in names})
        _append(costs.setdefault(key, {}), {"train_seconds": train.get("seconds"),
                                           "forward_rows": train.get("forward_rows"),
                                           "reference_rows": train.get("reference_rows"),
                                           "eval_seconds": rec.get("eval_seconds")})
    out = []
    for key, values in collected.items():
        cost = {name: Stat(tuple(xs)) for name, xs in costs[key].items()}
        out.append(Summary(group=key[0], condition=key[1], seeds=seeds[key],
                           metrics={m: Stat(tuple(values[m])) for m in names}, **cost))
    return out


def _append(into: dict[str, list[float]], raw: Mapping[str, Any]) -> None:
    """Add each value that is a number to its list (a missing one only leaves its list shorter)."""
    for name, value in raw.items():
        x = _number(value)
        into.setdefault(name, [])
        if x is not None:
            into[name].append(x)


def aggregate(records: Sequence[Mapping[str, Any]]) -> pl.DataFrame:
    """One row per (group, condition), first-appearance order: n_seeds, `<metric>_mean`, `<metric>_std` (ddof=1,
    null under two values), `<metric>_n` (seeds with a value) for every numeric eval metric, and the cost:
    train_seconds_mean/std, forward_rows_mean, eval_seconds_mean."""
    summaries = summarise(records)
    names = metric_names(records)
    schema: dict[str, Any] = {"group": pl.Utf8, "condition": pl.Utf8, "n_seeds": pl.Int64}
    for m in names:
        schema.update({f"{m}_mean": pl.Float64, f"{m}_std": pl.Float64, f"{m}_n": pl.Int64})
    schema.update({"train_seconds_mean": pl.Float64, "train_seconds_std": pl.Float64,
                   "forward_rows_mean": pl.Float64, "eval_seconds_mean": pl.Float64})
    rows = []
    for s in summaries:
        row: dict[str, Any] = {"group": s.group, "condition": s.condition, "n_seeds": s.n_seeds}
        for m in names:
            stat = s.metric(m)
            row.update({f"{m}_mean": stat.mean, f"{m}_std": stat.std, f"{m}_n": stat.n})
        row.update({"train_seconds_mean": s.train_seconds.mean, "train_seconds_std": s.train_seconds.std,
                    "forward_rows_mean": s.forward_rows.mean, "eval_seconds_mean": s.eval_seconds.mean})
        rows.append(row)
    return pl.DataFrame(rows, schema=schema, orient="row") if rows else pl.DataFrame(schema=schema)


# ---------------------------------------------------------------------------------------------------- formatting


def direction(metric: str) -> str:
    """`↓` when lower is better (hallucination, prior-driven, empty captions), `↑` when higher is better (recall,
    well-formedness, POPE accuracy/F1/precision), '' for descriptive metrics (length, yes-ratio)."""
    if metric in ("prior_lift", "prior_probe_lift"):  # 1 = errors ignore the prior; lower is better down to 1
        return "↓"
    if metric == "probe_grey_said":  # the hidden object named as the pixels show it
        return "↑"
    if metric.startswith(("chair", "prior")) or metric == "empty":
        return "↓"
    if metric.startswith("recall") or metric == "well_formed":
        return "↑"
    if metric.startswith("pope_") and metric.endswith(("_accuracy", "_f1", "_precision", "_recall")):
        return "↑"
    return ""


def label(metric: str) -> str:
    """A readable column header with its direction hint, e.g. `CHAIR_i object ↓`."""
    text = f" {metric.replace('_', ' ')} "
    for raw, nice in ((" chair i ", " CHAIR_i "), (" chair s ", " CHAIR_s "), (" pope ", " POPE "), (" f1 ", " F1 "),
                      (" mentions per caption ", " mentions/caption "), (" well formed ", " well-formed ")):
        text = text.replace(raw, nice)
    text = text.strip()
    arrow = direction(metric)
    return f"{text} {arrow}" if arrow else text


def plain_metrics(summaries: Sequence[Summary], metrics: Sequence[str]) -> frozenset[str]:
    """Metrics shown as plain numbers: the known counts, and any metric with a value outside [0, 1] (a count
    rendered as percent would be off by 100x and look plausible)."""
    out = set(PLAIN_METRICS) & set(metrics)
    for m in metrics:
        if any(not 0.0 <= x <= 1.0 for s in summaries for x in s.metric(m).values):
            out.add(m)
    return frozenset(out)


def _value(x: float, plain: bool) -> str:
    return f"{x:.2f}" if plain else f"{100 * x:.1f}"


def format_cell(stat: Stat, n_seeds: int, plain: bool = False) -> str:
    """`mean ± std` in percent with one decimal (plain numbers with two); `—` for an undefined std or no value;
    `(n=k)` when only k of the condition's seeds had a value."""
    if stat.n == 0:
        return DASH
    std = DASH if stat.std is None else _value(stat.std, plain)
    cell = f"{_value(stat.mean, plain)} ± {std}"
    return cell if stat.n == n_seeds else f"{cell} (n={stat.n})"


def standard_error(a: Stat, b: Stat) -> float | None:
    """Pooled standard error of a difference of means, sqrt(s1²/n1 + s2²/n2) (Welch); None when a std is
    undefined (one seed), where no claim can be made."""
    if a.std is None or b.std is None:
        return None
    return math.sqrt(a.std ** 2 / a.n + b.std ** 2 / b.n)


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p in (0.5, 1)) of Student's t with `df` degrees of freedom: Newton's method on its CDF (the
    CDF's derivative is the density), the CDF by Simpson's rule on the density (exact to ~1e-6 here; no scipy in
    the environment). A few CDF evaluations per call: the report asks for one per difference cell."""
    if not 0.5 < p < 1 or df <= 0:
        raise ValueError(f"t_quantile(p={p}, df={df}): give 0.5 < p < 1 and df > 0")
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(x: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))

    def cdf(x: float, n: int = 400) -> float:  # 0.5 + integral of the density over [0, x]
        h = x / n
        f = [pdf(i * h) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    # The CDF is concave on x > 0, so Newton from below the root (x = 0) climbs monotonically to it.
    x = 0.0
    for _ in range(100):
        step = (p - cdf(x)) / pdf(x)
        x += step
        if abs(step) < 1e-9 * max(1.0, x):
            break
    return x


def diff_interval(stat: Stat, ref: Stat, level: float = 0.95) -> tuple[float, float] | None:
    """Welch's `level` interval for mean(stat) - mean(ref) over seeds (None with fewer than two seeds on either
    side). Conditions share each seed's batches, so this unpaired interval is conservative."""
    se = standard_error(stat, ref)
    if se is None:
        return None
    diff = stat.mean - ref.mean
    if se == 0:
        return diff, diff
    # Welch-Satterthwaite degrees of freedom
    va, vb = stat.std ** 2 / stat.n, ref.std ** 2 / ref.n
    df = (va + vb) ** 2 / (va ** 2 / (stat.n - 1) + vb ** 2 / (ref.n - 1))
    half = t_quantile(0.5 + level / 2, df) * se
    return diff - half, diff + half


def format_diff(stat: Stat, ref: Stat, plain: bool = False) -> str:
    """Mean difference vs the reference in points (plain units for counts) with its 95% interval over seeds
    (Welch), `*` when the interval excludes 0."""
    if stat.n == 0 or ref.n == 0:
        return DASH
    diff = stat.mean - ref.mean
    scale, digits = (1, 2) if plain else (100, 1)

    def num(x: float) -> str:
        x = x * scale
        return f"{0.0 if round(x, digits) == 0 else x:+.{digits}f}"  # no "-0.0"

    text = num(diff)
    ci = diff_interval(stat, ref)
    if ci is None:
        return text
    # an interval of width 0 (every seed identical on both sides) makes no claim: no spread, no test
    flag = "*" if ci[1] > ci[0] and (ci[0] > 0 or ci[1] < 0) else ""
    return f"{text}{flag} [{num(ci[0])}, {num(ci[1])}]"


def _ratio(x: Stat, ref: Stat) -> str:
    if x.n == 0 or ref.n == 0 or not ref.mean:
        return DASH
    return f"{x.mean / ref.mean:.2f}×"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|")


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """A GitHub Markdown table; columns from `numeric_from` on are right-aligned."""
    align = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- sections


def present(summaries: Sequence[Summary], metrics: Sequence[str]) -> list[str]:
    """The metrics some condition of these summaries has a value for (a column of dashes says nothing)."""
    return [m for m in metrics if any(s.metric(m).n for s in summaries)]


def metrics_table(summaries: Sequence[Summary], metrics: Sequence[str], plain: frozenset[str]) -> str:
    header = ["condition", "n", *(label(m) for m in metrics)]
    rows = [[s.condition, str(s.n_seeds), *(format_cell(s.metric(m), s.n_seeds, m in plain) for m in metrics)]
            for s in summaries]
    return md_table(header, rows, numeric_from=1)


def _units_note(metrics: Sequence[str], plain: frozenset[str]) -> str:
    counts = [label(m) for m in metrics if m in plain]
    extra = f" ({', '.join(counts)}: plain numbers)" if counts else ""
    return (f"Mean ± sample standard deviation over seeds, in percent{extra}; ↓ lower is better, ↑ higher is "
            f"better; {DASH} undefined (one seed, or no value); (n=k): only k seeds had a value.")


def diff_table(summaries: Sequence[Summary], control: Summary, metrics: Sequence[str], plain: frozenset[str],
               skip: Sequence[str]) -> str:
    header = ["condition", "n", *(label(m) for m in metrics)]
    rows = [[s.condition, str(s.n_seeds), *(format_diff(s.metric(m), control.metric(m), m in plain)
                                           for m in metrics)]
            for s in summaries if s.condition not in skip]
    return md_table(header, rows, numeric_from=1)


def _diff_note(control: str) -> str:
    return (f"Mean minus `{control}`'s mean, in percentage points (plain units for counts), and its 95% interval "
            f"over seeds [low, high] (Welch: standard error sqrt(s₁²/n₁ + s₂²/n₂), t quantile at the "
            f"Welch-Satterthwaite degrees of freedom); `*` marks an interval that excludes 0. Conditions share each "
            f"seed's batches, so the unpaired interval is conservative. No interval with a single seed.")


def cost_table(summaries: Sequence[Summary], control: Summary | None) -> str:
    """Training time and VLM rows forwarded, and their ratio to the control: the price of each method."""
    header = ["condition", "n", "train s", "VLM rows forwarded", "reference rows", "eval s"]
    if control is not None:
        header += [f"train s ÷ {control.condition}", f"rows ÷ {control.condition}"]
    rows = []
    for s in summaries:
        rows_fwd = DASH if s.forward_rows.n == 0 else f"{s.forward_rows.mean:,.0f}"
        eval_s = DASH if s.eval_seconds.n == 0 else f"{s.eval_seconds.mean:.1f}"
        train_s = DASH if s.train_seconds.n == 0 else \
            f"{s.train_seconds.mean:.1f} ± {DASH if s.train_seconds.std is None else f'{s.train_seconds.std:.1f}'}"
        ref_rows = DASH if s.reference_rows.n == 0 else f"{s.reference_rows.mean:,.0f}"
        row = [s.condition, str(s.n_seeds), train_s, rows_fwd, ref_rows, eval_s]
        if control is not None:
            row += [_ratio(s.train_seconds, control.train_seconds), _ratio(s.forward_rows, control.forward_rows)]
        rows.append(row)
    return md_table(header, rows, numeric_from=1)


def _find(summaries: Sequence[Summary], condition: str) -> Summary | None:
    return next((s for s in summaries if s.condition == condition), None)


def _image(name: str, plot: Path, md_dir: Path) -> str:
    rel = Path(os.path.relpath(Path(plot).resolve(), Path(md_dir).resolve())).as_posix()
    return f"![{name}]({rel})"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "group"


# ---------------------------------------------------------------------------------------------------- plots


def _figure(width: float, height: float):
    """A Figure on its own Agg canvas: no pyplot, so no global state and no GUI backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    """PNG bytes without the Software/timestamp chunks, so identical records give identical files."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _bar_panel(ax, summaries: Sequence[Summary], metric: str, plain: bool) -> None:
    """Bars = mean, error bars = std, dots = the individual seeds (spread evenly, no random jitter)."""
    scale = 1.0 if plain else 100.0
    xs = list(range(len(summaries)))
    means = [math.nan if s.metric(metric).mean is None else s.metric(metric).mean * scale for s in summaries]
    errs = [0.0 if s.metric(metric).std is None else s.metric(metric).std * scale for s in summaries]
    ax.bar(xs, means, yerr=errs, capsize=3, color=_colors(len(summaries)), alpha=0.75, edgecolor="black",
           linewidth=0.5, error_kw={"linewidth": 1})
    for x, s in zip(xs, summaries):
        vals = s.metric(metric).values
        if not vals:
            continue
        width = 0.25 if len(vals) > 1 else 0.0
        offsets = [x - width / 2 + width * i / max(len(vals) - 1, 1) for i in range(len(vals))]
        ax.scatter(offsets, [v * scale for v in vals], s=10, color="black", zorder=3)
    ax.set_xticks(xs)
    ax.set_xticklabels([s.condition for s in summaries], rotation=35, ha="right", fontsize=8)
    ax.set_title(label(metric), fontsize=10)
    ax.set_ylabel("" if plain else "%", fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_bars(summaries: Sequence[Summary], metrics: Sequence[str], plain: frozenset[str], path: Path,
              title: str, ncols: int = 3) -> Path:
    """A grid of bar charts, one panel per metric."""
    ncols = max(1, min(ncols, len(metrics)))
    nrows = math.ceil(len(metrics) / ncols)
    fig = _figure(3.6 * ncols, 3.0 * nrows + 0.3)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        _bar_panel(ax, summaries, metric, metric in plain)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    return write_bytes_atomic(_png(fig), path)


def plot_cost(summaries: Sequence[Summary], metric: str, plain: bool, path: Path) -> Path | None:
    """Training seconds (x) against a quality metric (y), one labelled point per trained condition with error
    bars; an untrained condition (no train seconds) is a dashed horizontal line. None when nothing to draw."""
    scale = 1.0 if plain else 100.0
    trained = [s for s in summaries if s.train_seconds.n and s.metric(metric).n]
    untrained = [s for s in summaries if not s.train_seconds.n and s.metric(metric).n]
    if not trained and not untrained:
        return None
    fig = _figure(6.4, 4.6)
    ax = fig.subplots()
    colors = _colors(len(summaries))
    for s in trained:
        color = colors[summaries.index(s)]
        y = s.metric(metric)
        ax.errorbar([s.train_seconds.mean], [y.mean * scale], xerr=[s.train_seconds.std or 0.0],
                    yerr=[(y.std or 0.0) * scale], fmt="o", color=color, capsize=3)
        ax.annotate(s.condition, (s.train_seconds.mean, y.mean * scale), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    for s in untrained:
        ax.axhline(s.metric(metric).mean * scale, linestyle="--", color="grey", linewidth=1,
                   label=f"{s.condition} (untrained)")
    if untrained:
        ax.legend(fontsize=8)
    ax.set_xlabel("training seconds (mean ± std over seeds)")
    ax.set_ylabel(label(metric) + ("" if plain else " (%)"))
    ax.set_title(f"Cost vs {label(metric)}", fontsize=11)
    ax.grid(alpha=0.3)
    return write_bytes_atomic(_png(fig), path)


# ---------------------------------------------------------------------------------------------------- report


def _group_order(summaries: Sequence[Summary]) -> list[str]:
    groups = list(dict.fromkeys(s.group for s in summaries))
    return sorted(groups, key=lambda g: g != MAIN_GROUP)  # stable: main first, others as they came


def _comparison(summaries: Sequence[Summary], metrics: Sequence[str], plain: frozenset[str], control: str,
                skip: Sequence[str]) -> list[str]:
    """The metrics table, then the difference table when the group has the control."""
    parts = [metrics_table(summaries, metrics, plain), "", _units_note(metrics, plain), ""]
    ref = _find(summaries, control)
    if ref is not None and any(s.condition not in skip for s in summaries):
        parts += [f"### Difference vs `{control}`", "", diff_table(summaries, ref, metrics, plain, skip), "",
                  _diff_note(control), ""]
    return parts


def _main_section(summaries: Sequence[Summary], metrics: Sequence[str], plain: frozenset[str], control: str,
                  baseline: str, plots_dir: Path, md_dir: Path, plots: list[Path]) -> list[str]:
    parts = [f"## Main comparison (group `{MAIN_GROUP}`)", ""]
    parts += _comparison(summaries, metrics, plain, control, skip=(control, baseline))
    if _find(summaries, control) is None:
        parts += [f"No condition `{control}` in this group: no difference table.", ""]
    panels = present(summaries, [m for m in PLOT_METRICS if m in metrics] or metrics[:6])
    if panels:
        plots.append(plot_bars(summaries, panels, plain, plots_dir / "main_metrics.png",
                               "Main comparison: mean ± std over seeds (dots: seeds)"))
        parts += [_image("main metrics", plots[-1], md_dir), ""]
    parts += ["### Cost", "", cost_table(summaries, _find(summaries, control)), "",
              "Training wall-clock seconds (mean ± std over seeds), VLM rows forwarded during training (mean; a row "
              "is one image-text sequence through the model), reference rows (the one-off reference log-probs the "
              "run needs, cached and shared by runs; with IS the whole candidate pool of each example), evaluation "
              "seconds (mean), and the ratios to the control's means.", ""]
    if "chair_i_object" in present(summaries, ["chair_i_object"]):
        cost = plot_cost(summaries, "chair_i_object", "chair_i_object" in plain, plots_dir / "cost.png")
        if cost is not None:
            plots.append(cost)
            parts += [_image("cost", cost, md_dir), ""]
    return parts


def _ablation_section(group: str, summaries: Sequence[Summary], metrics: Sequence[str], plain: frozenset[str],
                      control: str, baseline: str, plots_dir: Path, md_dir: Path, plots: list[Path],
                      title: str | None = None) -> list[str]:
    against = f", against `{control}`" if _find(summaries, control) is not None else ""
    parts = [f"## {title or f'Ablation: `{group}`{against}'}", ""]
    parts += _comparison(summaries, metrics, plain, control, skip=(control, baseline))
    # The cost of each arm against the group's control (for the IS arms the full pool, which they exist to be
    # cheaper than: experiment.conditions.group_controls), else against its first trained arm.
    trained = [s for s in summaries if s.train_seconds.n] or list(summaries)
    ref = _find(summaries, control) or trained[0]
    parts += [f"Cost (ratios against `{ref.condition}`):", "", cost_table(summaries, ref), ""]
    panels = present(summaries, ABLATION_PLOT_METRICS)
    if panels:
        plots.append(plot_bars(summaries, panels, plain, plots_dir / f"ablation_{_slug(group)}.png",
                               f"Ablation {group}: mean ± std over seeds (dots: seeds)", ncols=2))
        parts += [_image(f"ablation {group}", plots[-1], md_dir), ""]
    return parts


def render_report(records: Sequence[Mapping[str, Any]], out_md: Path, plots_dir: Path, *, title: str,
                  preamble: str = "", control: str = "sft", baseline: str = "base",
                  metrics: Sequence[str] = DEFAULT_METRICS, group_controls: Mapping[str, str] | None = None,
                  group_titles: Mapping[str, str] | None = None) -> tuple[str, list[Path]]:
    """The Markdown text, writing the plots as it goes (their links are relative to `out_md`'s folder)."""
    if not records:
        raise ValueError("no results to report: the record list is empty (did every run fail, or is "
                         "results.jsonl empty?)")
    summaries = summarise(records)
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    md_dir = Path(out_md).parent
    plain = plain_metrics(summaries, metrics)
    parts = [f"# {title}", ""]
    if preamble.strip():
        parts += [preamble.strip("\n"), ""]
    plots: list[Path] = []
    for group in _group_order(summaries):
        members = [s for s in summaries if s.group == group]
        shown = present(members, metrics)
        if not shown:
            parts += [f"## Group `{group}`", "", "None of the report's metrics has a value in this group.", ""]
        elif group == MAIN_GROUP:
            parts += _main_section(members, shown, plain, control, baseline, plots_dir, md_dir, plots)
        else:
            parts += _ablation_section(group, members, shown, plain, (group_controls or {}).get(group, control),
                                       baseline, plots_dir, md_dir, plots, (group_titles or {}).get(group))
    return "\n".join(parts).rstrip("\n") + "\n", plots


def write_report(records: Sequence[Mapping[str, Any]], out_md: Path, plots_dir: Path, *, title: str,
                 preamble: str = "", control: str = "sft", baseline: str = "base",
                 metrics: Sequence[str] = DEFAULT_METRICS, group_controls: Mapping[str, str] | None = None,
                 group_titles: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write the Markdown report (atomically) and its PNG plots; returns {"markdown", "plots", "table"}.

    Sections: the `main` group (metrics table, difference vs `control` with a 2-SE flag, cost table, plots),
    then one per other group (its table, a difference table when it has a condition named `control`, a plot).
    `baseline` (the untrained model) is left out of the difference tables: it is a reference, not a contender.
    `group_controls` / `group_titles`: a group's own control and section title, where not `control` / "Ablation".
    """
    markdown, plots = render_report(records, out_md, plots_dir, title=title, preamble=preamble, control=control,
                                    baseline=baseline, metrics=metrics, group_controls=group_controls,
                                    group_titles=group_titles)
    write_bytes_atomic(markdown.encode("utf-8"), Path(out_md))
    return {"markdown": markdown, "plots": plots, "table": aggregate(records)}


def format_console(records: Sequence[Mapping[str, Any]]) -> str:
    """A compact plain-text table for the end of a run: condition, n, the key metrics (percent, mean±std) and
    training seconds; a group column when there is more than one group."""
    summaries = summarise(records)
    if not summaries:
        return "no results"
    metrics = present(summaries, CONSOLE_METRICS)
    plain = plain_metrics(summaries, metrics)
    groups = len({s.group for s in summaries}) > 1

    def cell(stat: Stat, n: int, is_plain: bool) -> str:
        return format_cell(stat, n, is_plain).replace(" ± ", "±").replace(DASH, "-")

    header = (["group"] if groups else []) + ["condition", "n", *(label(m) for m in metrics), "train s"]
    rows = []
    for s in summaries:
        train = "-" if s.train_seconds.n == 0 else f"{s.train_seconds.mean:.0f}"
        rows.append(([s.group] if groups else []) + [s.condition, str(s.n_seeds),
                                                     *(cell(s.metric(m), s.n_seeds, m in plain) for m in metrics),
                                                     train])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    text_cols = 2 if groups else 1
    lines = ["  ".join(c.ljust(w) if i < text_cols else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)
