"""plot.py: the series it draws are the metrics.jsonl values (gaps NaN, not 0), smoothing is a
trailing mean, every panel labels its runs, the PNG is written and readable, and bad input is one
clear error. The demo run checks it against a real trainer's log."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib.image import imread

import grpo
import plot
from conftest import ROOT, read_metrics

NAN = math.nan
# Two hand-made runs: `a` has a null entropy at step 2, a KL, and its rows out of order with
# step 3 logged twice (the later row is the one kept); `b` never logged kl and skips entropy at
# step 1 (absent, not null).
RUN_A = [dict(step=1, reward_mean=0.1, accuracy=0.0, format_fail=0.5, zero_var_frac=1.0, kl=0.0,
              entropy=2.0, response_len=10, step_time=1.5),
         dict(step=3, reward_mean=9.0, accuracy=9.0),  # replaced by the step-3 row below
         dict(step=2, reward_mean=0.2, accuracy=0.25, format_fail=0.25, zero_var_frac=0.5,
              kl=0.01, entropy=None, response_len=12, step_time=1.25),
         dict(step=3, reward_mean=0.4, accuracy=0.5, format_fail=0.0, zero_var_frac=0.25,
              kl=0.02, entropy=1.5, response_len=14, step_time=1.0)]
RUN_B = [dict(step=1, reward_mean=0.0, accuracy=0.0, format_fail=1.0, zero_var_frac=1.0,
              response_len=8, step_time=2.0, value_loss=3.0),
         dict(step=2, reward_mean=0.3, accuracy=0.5, format_fail=0.5, zero_var_frac=0.5,
              entropy=3.0, response_len=9, step_time=2.0, value_loss=2.0)]


def write_run(path, rows):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


@pytest.fixture
def runs(tmp_path):
    return write_run(tmp_path / "k2", RUN_A), write_run(tmp_path / "k3", RUN_B)


def same(actual, expected):
    """Equal, NaN where expected is NaN (NaN != NaN, and a 0 would be wrong)."""
    np.testing.assert_array_equal(np.asarray(actual, dtype=float), np.array(expected, dtype=float))


def panel(fig, key):
    """The axes whose title holds the metrics.jsonl key (or is its default title)."""
    title = plot.DEFAULT_METRICS.get(key, key)
    found = [ax for ax in fig.axes if ax.get_title().split("\n")[0].startswith(title)]
    assert len(found) == 1, [ax.get_title() for ax in fig.axes]
    return found[0]


def lines_by_label(ax):
    """The visible-in-legend lines of a panel: {label: (x, y)}."""
    return {ln.get_label(): (ln.get_xdata(), ln.get_ydata()) for ln in ax.get_lines()
            if not ln.get_label().startswith("_")}


def test_series_sorted_gaps_nan(runs):
    a = plot.read_run(runs[0], "k2")
    assert [r["step"] for r in a.rows] == [1, 2, 3] and a.lines == [1, 3, 4]
    steps, entropy = plot.series(a, "entropy")
    same(steps, [1, 2, 3])
    same(entropy, [2.0, NAN, 1.5])  # null is a gap
    same(plot.series(a, "reward_mean")[1], [0.1, 0.2, 0.4])  # the later step-3 row wins
    b = plot.read_run(runs[1], "k3")
    same(plot.series(b, "entropy")[1], [NAN, 3.0])  # absent is a gap too
    same(plot.series(b, "kl")[1], [NAN, NAN])
    assert "kl" not in plot.numeric_keys(b) and "value_loss" in plot.numeric_keys(b)
    assert "step" not in plot.numeric_keys(b)


def test_smooth_trailing_mean_keeps_gaps():
    values = np.array([1.0, 2.0, NAN, 4.0, 6.0])
    same(plot.smooth(values, 1), values)
    same(plot.smooth(values, 2), [1.0, 1.5, NAN, 4.0, 5.0])  # the window skips the gap
    same(plot.smooth(values, 3), [1.0, 1.5, NAN, 3.0, 5.0])
    same(plot.smooth(values, 10), [1.0, 1.5, NAN, 7 / 3, 13 / 4])


def test_figure_lines_are_the_file_values(runs):
    a, b = plot.read_run(runs[0], "k2"), plot.read_run(runs[1], "k3")
    metrics = list(plot.DEFAULT_METRICS) + ["value_loss"]
    fig = plot.draw([a, b], metrics)
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 9
    entropy = lines_by_label(panel(fig, "entropy"))
    same(entropy["k2"][1], [2.0, NAN, 1.5])
    same(entropy["k3"][0], [1, 2])
    same(entropy["k3"][1], [NAN, 3.0])
    kl = panel(fig, "kl")
    assert set(lines_by_label(kl)) == {"k2"} and "none in k3" in kl.get_title()
    same(lines_by_label(kl)["k2"][1], [0.0, 0.01, 0.02])
    value_loss = panel(fig, "value_loss")
    assert set(lines_by_label(value_loss)) == {"k3"} and "none in k2" in value_loss.get_title()
    for key in plot.DEFAULT_METRICS:  # every run with data, in every panel, under its name
        ax = panel(fig, key)
        assert set(lines_by_label(ax)) == {"k2", "k3"} - ({"k3"} if key == "kl" else set())
        assert ax.get_xlabel() == "step"
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["k2", "k3"]
    plot.plt.close(fig)


def test_smoothed_figure_and_empty_panel(runs):
    b = plot.read_run(runs[1], "k3")
    fig = plot.draw([b], ["reward_mean", "kl"], smooth_n=2)
    lines = panel(fig, "reward_mean").get_lines()
    assert len(lines) == 2  # the raw curve, faint, behind the smoothed one
    same(lines[0].get_ydata(), [0.0, 0.3])
    same(lines[1].get_ydata(), [0.0, 0.15])
    assert lines[0].get_alpha() < 0.5 and lines[1].get_alpha() in (None, 1)
    kl = panel(fig, "kl")
    assert kl.get_title().endswith("no data") and not kl.get_lines()
    plot.plt.close(fig)


def test_png_written_where_documented(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = plot.main([runs[0]])  # one run: beside its log
    assert out == os.path.join(runs[0], "curves.png")
    assert capsys.readouterr().out.strip() == out
    assert plot.main([*runs, "--labels", "k2 run,k3 run"]) == "curves.png"  # several: here
    for path in (out, tmp_path / "curves.png"):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        image = imread(path)
        assert image.shape[:2] == (700, 1680), image.shape  # 2 x 4 panels at --dpi 100
        assert image[..., :3].std() > 0.05  # not blank


def test_demo_run(tmp_path):
    """A real trainer's log: every default metric it logged is plotted, value for value."""
    out = str(tmp_path / "demo")
    grpo.main(["--model", "tiny", "--max-new-tokens", "4", "--batch-prompts", "4",
               "--num-samples", "4", "--steps", "3", "--kl-coef", "0.01", "--out", out])
    rows = read_metrics(out)
    run = plot.read_run(out, "demo")
    fig = plot.draw([run], list(plot.DEFAULT_METRICS) + ["grad_norm"])
    for key in plot.DEFAULT_METRICS:
        assert key in rows[0], f"the trainer no longer logs {key}: update plot.DEFAULT_METRICS"
        x, y = lines_by_label(panel(fig, key))["demo"]
        same(x, [r["step"] for r in rows])
        same(y, [NAN if r.get(key) is None else r[key] for r in rows])
    plot.plt.close(fig)
    assert imread(plot.main([out, "--smooth", "2"])).shape[:2] == (700, 1680)
    with pytest.raises(ValueError, match="is a checkpoint.*its run dir .*demo has the metrics"):
        plot.main([os.path.join(out, "step-000003")])
    os.remove(os.path.join(out, "metrics.jsonl"))
    with pytest.raises(ValueError, match=r"demo/metrics.jsonl: no such file.*step-000003"):
        plot.main([out])


def test_clear_errors(runs, tmp_path):
    with pytest.raises(ValueError, match=r"nowhere: no such run directory"):
        plot.main([str(tmp_path / "nowhere")])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"empty/metrics.jsonl: no such file"):
        plot.main([str(tmp_path / "empty")])
    bad = tmp_path / "bad"
    write_run(bad, RUN_B)
    with open(bad / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward_mean": 0.1\n')
    with pytest.raises(ValueError, match=r"bad/metrics.jsonl:3: not JSON"):
        plot.main([str(bad)])
    write_run(bad, RUN_B + [dict(reward_mean=1.0)])
    with pytest.raises(ValueError, match=r"bad/metrics.jsonl:3: not a metrics row"):
        plot.main([str(bad)])
    write_run(bad, RUN_B + [dict(step=3, entropy="high")])
    with pytest.raises(ValueError, match=r"bad/metrics.jsonl:3: entropy is 'high', not a number"):
        plot.main([str(bad)])
    with pytest.raises(ValueError, match=r"--metrics entropyy: .*keys with numbers are: accuracy"
                                         r".*, value_loss, zero_var_frac"):
        plot.main([*runs, "--metrics", "entropy,entropyy"])
    for flags in (["--labels", "only-one"], ["--smooth", "0"]):
        with pytest.raises(SystemExit) as e:
            plot.main([*runs, *flags])
        assert e.value.code == 2


def test_cli_one_line_error(runs):
    """As a user runs it (the path on success is checked in-process above): a bad input is one
    `error:` line and exit status 1, not a traceback."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MEDRL_DEBUG", None)
    bad = subprocess.run([sys.executable, str(ROOT / "plot.py"), runs[0], "--metrics", "nope"],
                         env=env, capture_output=True, text=True, timeout=60)
    err = bad.stderr.splitlines()
    assert bad.returncode == 1 and len(err) == 1 and err[0].startswith("error: --metrics nope")
