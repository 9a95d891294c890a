"""The curves of one or more training runs, side by side, as one PNG.

    python plot.py out/grpo_k3                                    # -> out/grpo_k3/curves.png
    python plot.py out/k2 out/k3 out/k3_clip_higher --smooth 10   # -> ./curves.png
    python plot.py out/a out/b --labels k2,k3 --metrics clip_frac,grad_norm --out /tmp/ab.png

Reads each RUN_DIR's metrics.jsonl (one JSON object per step, written by grpo.py and ppo.py) and
draws one panel per metric, one line per run in every panel, x = step; a run's colour is the same
in every panel and the legend above the panels names it (RUN_DIR's name, or --labels).

Choices and the flag that changes each:
  panels     reward_mean, accuracy, format_fail, zero_var_frac (dead groups), kl, entropy,
             response_len, step_time, then every --metrics name not among them.
  missing    a metric a run never logged (kl without a KL term, value_loss in GRPO) has no line for
             that run, and the panel's title names the runs without it; a null or absent value in
             some rows is a gap in the line (NaN), never a 0. A point with gaps on both sides (a
             validation metric logged every --val-every steps) is drawn as a dot.
  smoothing  --smooth N: the trailing mean of the last N steps' values that exist (a gap stays a
             gap), drawn over the raw curve, which stays faintly behind.
  steps      rows are sorted by step; a step logged twice keeps its later row (the resumed run).
  output     --out (default: RUN_DIR/curves.png for one run, ./curves.png for several); the
             Agg backend, so no display is needed.
"""
import json
import math
import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # training machines have no display; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

import flags  # noqa: E402

# The default panels: metrics.jsonl key -> panel title.
DEFAULT_METRICS = {
    "reward_mean": "reward",
    "accuracy": "accuracy",
    "format_fail": "format failures",
    "zero_var_frac": "dead groups",
    "kl": "KL to the reference",
    "entropy": "entropy",
    "response_len": "response length (tokens)",
    "step_time": "step time (s)",
}
NOT_METRICS = ("step", "time")  # the x axis and the wall clock: not curves
PANEL_COLUMNS = 4


@dataclass
class Run:
    label: str
    path: str  # its metrics.jsonl
    rows: list[dict]  # sorted by step, one per step
    lines: list[int]  # each row's line number in path, for errors


def parse_args(argv=None):
    p = flags.Parser(description=__doc__, formatter_class=flags.HelpFormatter)
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a training run's --out dir (holding metrics.jsonl), or a metrics.jsonl")
    p.add_argument("--out", default=None,
                   help="the PNG to write; None: RUN_DIR/curves.png for one run, "
                        "./curves.png for several")
    p.add_argument("--smooth", type=int, default=1,
                   help="trailing moving average over N steps (1 = the raw values)")
    p.add_argument("--metrics", default=None,
                   help="comma-separated metrics.jsonl keys to plot after the default panels "
                        f"({', '.join(DEFAULT_METRICS)}); None: those alone")
    p.add_argument("--labels", default=None,
                   help="comma-separated legend names, one per RUN_DIR; None: each dir's name")
    p.add_argument("--dpi", type=int, default=100, help="resolution of the PNG")
    args = p.parse_args(argv)
    if args.smooth < 1:
        p.error(f"--smooth {args.smooth}: must be at least 1")
    if args.labels is not None and len(args.labels.split(",")) != len(args.run_dirs):
        p.error(f"--labels has {len(args.labels.split(','))} names for "
                f"{len(args.run_dirs)} RUN_DIRs")
    return args


# ----------------------------------------------------------------------------- reading

def metrics_path(run_dir: str) -> str:
    """RUN_DIR's metrics.jsonl, or an error that says what RUN_DIR is instead."""
    if os.path.isfile(run_dir) and run_dir.endswith(".jsonl"):
        return run_dir
    path = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(path):
        return path
    if not os.path.isdir(run_dir):
        raise ValueError(f"{run_dir}: no such run directory")
    parent = os.path.dirname(os.path.abspath(run_dir))
    is_checkpoint = (os.path.basename(os.path.normpath(run_dir)).startswith("step-")
                     or os.path.isfile(os.path.join(run_dir, "config.json")))
    if is_checkpoint:
        hint = (f"; its run dir {parent} has the metrics"
                if os.path.isfile(os.path.join(parent, "metrics.jsonl")) else "")
        raise ValueError(f"{path}: no such file: {run_dir} is a checkpoint, not a run dir{hint}")
    steps = sorted(n for n in os.listdir(run_dir) if n.startswith("step-"))
    if steps:
        raise ValueError(f"{path}: no such file, though {run_dir} holds checkpoints "
                         f"({', '.join(steps[:3])}{', ...' if len(steps) > 3 else ''}): "
                         "its log was deleted or written elsewhere")
    raise ValueError(f"{path}: no such file (RUN_DIR is a training run's --out)")


def read_run(run_dir: str, label: str) -> Run:
    """A run's rows sorted by step. A line that is not a JSON object with a numeric step is an
    error naming file:line, not a skipped row."""
    path = metrics_path(run_dir)
    by_step = {}  # step -> (line, row); a later row of the same step replaces an earlier one
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e.msg})") from None
            if not isinstance(row, dict) or not plottable(row.get("step")):
                raise ValueError(f"{path}:{line_no}: not a metrics row (a JSON object with a "
                                 f"numeric 'step'): {line.strip()[:80]}")
            by_step[row["step"]] = (line_no, row)
    if not by_step:
        raise ValueError(f"{path}: no rows (the run has not finished a step yet)")
    ordered = [by_step[s] for s in sorted(by_step)]
    return Run(label, path, [row for _, row in ordered], [line for line, _ in ordered])


def plottable(value) -> bool:
    """A JSON number; a bool too (update_skipped is logged as a 0/1 flag)."""
    return isinstance(value, (int, float))


def numeric_keys(run: Run) -> set[str]:
    """The keys of `run` that hold a number in at least one row: what can be plotted."""
    return {k for row in run.rows for k, v in row.items()
            if k not in NOT_METRICS and plottable(v)}


def series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key`: NaN where a row has it null or absent (a gap, not a 0)."""
    steps = np.array([row["step"] for row in run.rows], dtype=float)
    values = np.full(len(run.rows), np.nan)
    for i, row in enumerate(run.rows):
        value = row.get(key)
        if value is None:
            continue
        if not plottable(value):
            raise ValueError(f"{run.path}:{run.lines[i]}: {key} is {value!r}, not a number")
        values[i] = float(value)
    return steps, values


def smooth(values: np.ndarray, n: int) -> np.ndarray:
    """The trailing mean of the last n values that are not NaN; NaN where values is NaN, so
    smoothing never draws across a gap."""
    finite = np.isfinite(values)
    sums = np.cumsum(np.where(finite, values, 0.0))  # (T,)
    counts = np.cumsum(finite)  # (T,)
    sums[n:] = sums[n:] - sums[:-n]  # the window [t-n+1, t]
    counts[n:] = counts[n:] - counts[:-n]
    out = np.full(len(values), np.nan)
    out[finite] = sums[finite] / counts[finite]
    return out


def check_metrics(runs: list[Run], asked: list[str]):
    """Every --metrics name is logged by at least one run; otherwise name what can be plotted."""
    available = set().union(*(numeric_keys(r) for r in runs))
    unknown = [k for k in asked if k not in available]
    if unknown:
        paths = " or ".join(run.path for run in runs)
        raise ValueError(f"--metrics {','.join(unknown)}: not in {paths}; "
                         f"the keys with numbers are: {', '.join(sorted(available))}")


# ----------------------------------------------------------------------------- drawing

def draw(runs: list[Run], metrics: list[str], smooth_n: int = 1) -> plt.Figure:
    """One panel per metric, one line per run (colour C<i> for run i in every panel)."""
    cols = min(PANEL_COLUMNS, len(metrics))
    rows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows + 0.6), squeeze=False)
    first = min(run.rows[0]["step"] for run in runs)
    last = max(run.rows[-1]["step"] for run in runs)
    pad = max(0.5, 0.01 * (last - first))  # a dot at either end stays whole
    step_range = (first - pad, last + pad)
    for ax, key in zip(axes.flat, metrics):
        draw_panel(ax, runs, key, smooth_n, step_range)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], color=f"C{i}", label=run.label) for i, run in enumerate(runs)]
    fig.legend(handles=handles, loc="upper center", ncols=min(len(runs), 6), frameon=False)
    if smooth_n > 1:
        fig.text(0.99, 0.99, f"trailing mean over {smooth_n} steps (raw: faint)",
                 ha="right", va="top", fontsize="small", color="0.4")
    top = 1 - 0.45 / fig.get_figheight() * math.ceil(len(runs) / 6)  # room for the legend
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def draw_panel(ax, runs: list[Run], key: str, smooth_n: int, step_range: tuple[float, float]):
    """`key` of every run that logged it; the title names the runs that did not."""
    name = DEFAULT_METRICS.get(key, key)
    title = name if name == key else f"{name}  [{key}]"  # the key: what --metrics and jq call it
    missing = []
    for i, run in enumerate(runs):
        steps, values = series(run, key)
        if not np.isfinite(values).any():
            missing.append(run.label)
            continue
        color = f"C{i}"
        if smooth_n > 1:
            ax.plot(steps, values, color=color, alpha=0.25, linewidth=1, label="_raw")
            values = smooth(values, smooth_n)
        ax.plot(steps, values, color=color, linewidth=1.5, label=run.label)
        alone = isolated(values)
        if alone.any():  # a line needs two neighbouring points: show lone ones as dots
            ax.plot(steps[alone], values[alone], "o", color=color, markersize=3, label="_dots")
    if len(missing) == len(runs):
        title += ": no data"
        ax.text(0.5, 0.5, f"no run logged {key}", ha="center", va="center",
                transform=ax.transAxes, color="0.5")
    elif missing:
        title += f"\n(none in {', '.join(missing)})"
    ax.set_title(title, fontsize="medium")
    ax.set_xlim(*step_range)  # the same steps in every panel, even for sparse metrics
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def isolated(values: np.ndarray) -> np.ndarray:
    """The finite values whose neighbours on both sides are gaps (or the ends)."""
    finite = np.isfinite(values)
    before = np.concatenate([[False], finite[:-1]])
    after = np.concatenate([finite[1:], [False]])
    return finite & ~before & ~after


# ----------------------------------------------------------------------------- main

def run_name(run_dir: str) -> str:
    """The run dir's own name (out/k3/ -> k3; out/k3/metrics.jsonl -> k3)."""
    path = os.path.normpath(os.path.abspath(run_dir))
    return os.path.basename(os.path.dirname(path) if os.path.isfile(path) else path)


def default_out(runs: list[Run]) -> str:
    """Beside the one run's logs, or in the current dir when several runs are compared."""
    if len(runs) == 1:
        return os.path.join(os.path.dirname(runs[0].path), "curves.png")
    return "curves.png"


def main(argv=None) -> str:
    args = parse_args(argv)
    labels = (args.labels.split(",") if args.labels is not None
              else [run_name(d) for d in args.run_dirs])
    runs = [read_run(d, label) for d, label in zip(args.run_dirs, labels)]
    asked = [k.strip() for k in (args.metrics or "").split(",") if k.strip()]
    check_metrics(runs, asked)
    metrics = list(DEFAULT_METRICS) + [k for k in asked if k not in DEFAULT_METRICS]
    fig = draw(runs, metrics, args.smooth)
    out = args.out or default_out(runs)
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=args.dpi)
    plt.close(fig)
    print(out)
    return out


if __name__ == "__main__":
    flags.run_main(main)
