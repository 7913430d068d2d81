"""What a new user sees: the curves picture, help and config printing, the end-of-run summary,
rates and counts in messages, metrics that make sense for the data, compare-configs, threads."""

from __future__ import annotations

import csv
import re
import shlex
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO, metric_rows, run_dirs
from stop_injection import install

from dltemplate.assemble import build_trainer
from dltemplate.cli import main
from dltemplate.config import Config, config_to_dict, load_config
from dltemplate.data.base import DataInfo
from dltemplate.engine import threads
from dltemplate.engine.rundir import best_epoch, curves_figure
from dltemplate.engine.runlog import format_duration
from dltemplate.progress import _rate
from dltemplate.tasks.classification import ClassificationTask


def _rows(names: list[str], epochs: int) -> list[dict[str, Any]]:
    """metrics.csv rows: train and val of each name, for ``epochs`` epochs."""
    return [
        {
            "epoch": str(e),
            "lr": "0.01",
            **{f"{s}/{n}": str(1 / (e + i)) for i, n in enumerate(names) for s in ("train", "val")},
        }
        for e in range(1, epochs + 1)
    ]


@pytest.mark.parametrize("names", [["loss"], ["loss", "accuracy", "dice"], list("abcdefgh")])
@pytest.mark.parametrize("epochs", [2, 5])
def test_curves_have_integer_epoch_ticks_and_nothing_clipped(names, epochs):
    fig = curves_figure(_rows(names, epochs))
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    box = fig.bbox
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [*sorted(names), "learning rate"]
    for ax in panels:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
        for label in ax.get_xticklabels():
            if label.get_text():
                assert label.get_text().lstrip("−-").isdigit(), label.get_text()
        # the x label, and everything drawn around the panel (tick labels, title, legend)
        for extent in (ax.xaxis.label.get_window_extent(renderer), ax.get_tightbbox(renderer)):
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1, (ax.get_title(), extent)
            assert box.y0 <= extent.y0 and extent.y1 <= box.y1, (ax.get_title(), extent)


def test_curves_have_a_title_y_labels_a_learning_rate_panel_and_the_best_epoch():
    rows = [
        {"epoch": str(e), "lr": str(lr), "train/loss": str(1 / e), "val/loss": str(v),
         "train/accuracy": "0.5", "val/accuracy": str(a)}
        for e, lr, v, a in [(1, 0.1, 0.9, 0.5), (2, 0.05, 0.4, 0.8), (3, 0.01, 0.6, 0.8)]
    ]  # fmt: skip
    fig = curves_figure(rows, title="20260101_120000", monitor="val/accuracy", mode="max")
    assert fig.get_suptitle() == "20260101_120000"
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert {t: ax.get_ylabel() for t, ax in panels.items()} == {
        "accuracy": "accuracy", "loss": "loss", "learning rate": "learning rate"}  # fmt: skip
    lr_line = panels["learning rate"].get_lines()[0]
    assert list(lr_line.get_xdata()) == [1, 2, 3]
    assert list(lr_line.get_ydata()) == [0.1, 0.05, 0.01]

    def stars(ax):
        return [(list(ln.get_xdata()), list(ln.get_ydata()), ln.get_label())
                for ln in ax.get_lines() if ln.get_marker() == "*"]  # fmt: skip

    # the first of equal best accuracies (epoch 2), as the checkpoint keeps it
    assert stars(panels["accuracy"]) == [([2], [0.8], "best: epoch 2")]
    assert stars(panels["loss"]) == []
    for ax in panels.values():  # the best epoch shown on every panel
        assert [2, 2] in [list(ln.get_xdata()) for ln in ax.get_lines()]
    # min mode: epoch 2 has the lowest validation loss
    fig = curves_figure(rows, monitor="val/loss", mode="min")
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert stars(panels["loss"]) == [([2], [0.4], "best: epoch 2")] and not fig.get_suptitle()
    # trainer.early_stopping_min_delta: an epoch must beat the best by more, as for the checkpoint
    rows[2]["val/accuracy"] = "0.805"
    assert best_epoch(rows, "val/accuracy", "max") == 3
    assert best_epoch(rows, "val/accuracy", "max", min_delta=0.01) == 2
    fig = curves_figure(rows, monitor="val/accuracy", mode="max", min_delta=0.01)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    assert stars(panels["accuracy"]) == [([2], [0.8], "best: epoch 2")]


def test_a_run_draws_its_curves_titled_with_its_name_and_its_monitor_marked(
    cli, tmp_path, monkeypatch
):
    from dltemplate.engine import rundir

    drawn = []

    def spy(rows, **kwargs):
        drawn.append(kwargs)
        return curves_figure(rows, **kwargs)

    monkeypatch.setattr(rundir, "curves_figure", spy)
    out = tmp_path / "out"
    args = [*SMALL_DIGITS, f"experiment.output_dir={out}", "trainer.monitor=val/loss",
            "trainer.monitor_mode=min", "trainer.early_stopping_min_delta=0.02"]  # fmt: skip
    assert cli("train", *args) == 0
    (run,) = run_dirs(out)
    assert (run / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert drawn[-1] == {"title": run.name, "monitor": "val/loss", "mode": "min", "min_delta": 0.02}
    (last,) = run.glob("*_last_ckpt.pth")
    kept = torch.load(last, weights_only=True)["best_epoch"]
    assert best_epoch(metric_rows(run), "val/loss", "min", 0.02) == kept


def test_train_help_explains_overrides_with_examples_that_work(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit:
        main(["train", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert "section.key=value" in out
    examples = [
        shlex.split(line.split("#")[0])
        for line in out.splitlines()
        if line.strip().startswith("dltemplate ")
    ]
    assert len(examples) >= 3 and any("trainer.epochs=5" in ex for ex in examples)
    # every example is a valid config with valid overrides: `config` resolves it
    monkeypatch.chdir(REPO)
    for ex in examples:
        assert main(["config", *ex[2:]]) == 0, ex
    assert "trainer:" in capsys.readouterr().out


def test_config_prints_the_resolved_config_as_yaml(cli, tmp_path, capsys):
    cfg_file = tmp_path / "small.yaml"
    cfg_file.write_text("model:\n  name: Vanilla\ntrainer:\n  epochs: 7\n")
    assert cli("config", cfg_file, "optimizer.lr=3e-4", "model.args.hidden=[16]") == 0
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert set(resolved) == set(config_to_dict(Config()))  # every section, defaults included
    assert resolved["trainer"]["epochs"] == 7 and resolved["optimizer"]["lr"] == 3e-4
    assert resolved["model"]["args"] == {"hidden": [16]}
    assert resolved["data"]["batch_size"] == Config().data.batch_size
    # what it prints is a config train accepts, resolving to the same
    again = tmp_path / "printed.yaml"
    again.write_text(printed)
    assert load_config(again, name_run=False) == load_config(
        cfg_file, ["optimizer.lr=3e-4", "model.args.hidden=[16]"], name_run=False
    )  # each names its runs after itself (the printed file has no run_name)


def test_config_of_a_bad_key_is_one_line_and_exit_2(cli, tmp_path, capsys):
    cfg_file = tmp_path / "small.yaml"
    cfg_file.write_text("trainer:\n  epochs: 7\n")
    assert cli("config", cfg_file, "trainer.epoch=3") == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "trainer.epochs" in captured.err and len(captured.err.strip().splitlines()) == 1


SMALL_DIGITS = [
    str(REPO / "configs" / "digits_mlp.yaml"),
    "data.train_val_sample_rate=0.15",
    "data.test_sample_rate=0.2",
    "model.args.hidden=[32]",
    "trainer.epochs=3",
]


@pytest.fixture
def no_curves(monkeypatch):
    """curves.png is not what these tests look at."""
    from dltemplate.engine import rundir

    monkeypatch.setattr(rundir, "plot_curves", lambda *a, **k: None)


@pytest.mark.parametrize("way", ["sigint", "sigterm"])
def test_a_stopped_run_says_how_to_resume_and_the_resumed_one_ends_with_a_summary(
    cli, tmp_path, no_curves, way
):
    out = tmp_path / "out"
    # the highest validation loss is best: epoch 1's, known after the resume only if restored
    args = [*SMALL_DIGITS, f"experiment.output_dir={out}", "trainer.monitor=val/loss",
            "trainer.monitor_mode=max"]  # fmt: skip
    undo = install("after_optimizer_step", way, 3)  # in the second epoch
    try:
        assert cli("train", *args) == 130
    finally:
        undo()
    (run,) = run_dirs(out)
    stopped = (run / "train.log").read_text().splitlines()[-1]
    assert f"run stopped by {way.upper()} at epoch 2" in stopped
    assert f"dltemplate resume {run}" in stopped
    assert "finished" not in (run / "train.log").read_text()

    assert cli("resume", run) == 0
    log = (run / "train.log").read_text().splitlines()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    best = max(rows, key=lambda r: float(r["val/loss"]))
    assert best["epoch"] == "1"
    summary, where = log[-2], log[-1]
    assert f"run {run.name} finished: 3 epoch(s)" in summary
    assert f"best val/loss {float(best['val/loss']):.4f} at epoch 1" in summary
    assert re.search(r"\d+\.\d s in this session", summary)
    assert str(run) in where and "Vanilla_best_ckpt.pth" in where and "Vanilla_last_ckpt" in where
    assert torch.load(run / "Vanilla_last_ckpt.pth", weights_only=True)["best_epoch"] == 1


def test_an_uninterrupted_run_ends_with_its_summary(cli, tmp_path, no_curves):
    out = tmp_path / "out"
    assert cli("train", *SMALL_DIGITS, f"experiment.output_dir={out}", "trainer.epochs=2") == 0
    (run,) = run_dirs(out)
    log = (run / "train.log").read_text().splitlines()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    best = max(rows, key=lambda r: float(r["val/accuracy"]))
    assert (
        f"best val/accuracy {float(best['val/accuracy']):.4f} at epoch {best['epoch']}" in (log[-2])
    )
    assert f"dltemplate eval {run}" in log[-1]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.04, "0.0 s"), (8.25, "8.2 s"), (185, "3 min 05 s"), (7620, "2 h 07 min")],
)
def test_durations_read_as_people_say_them(seconds, text):
    assert format_duration(seconds) == text


@pytest.mark.parametrize(("rate", "text"), [(0.42, "0.42"), (0.051, "0.051"), (3.14159, "3.14")])
def test_rates_below_one_are_not_rounded_to_a_whole_number(rate, text):
    assert _rate(rate) == text


@pytest.mark.parametrize(("classes", "top5"), [(2, False), (5, False), (6, True), (10, True)])
def test_top5_accuracy_is_logged_only_with_more_than_five_classes(classes, top5):
    info = DataInfo((1, 4, 4), classes, [str(i) for i in range(classes)])
    metrics = ClassificationTask(Config()).build_metrics(info)
    outputs = torch.randn(8, classes)
    metrics.update(outputs, torch.arange(8) % classes)
    assert ("top5_accuracy" in metrics.compute()) is top5
    assert "accuracy" in metrics.compute()


def test_eval_viz_of_a_classification_run_says_it_draws_no_pictures(
    cli, tmp_path, capsys, no_curves
):
    out = tmp_path / "out"
    assert cli("train", *SMALL_DIGITS, f"experiment.output_dir={out}", "trainer.epochs=1") == 0
    (run,) = run_dirs(out)
    capsys.readouterr()
    assert cli("eval", run, "--viz") == 0
    captured = capsys.readouterr()
    assert "task 'classification' draws no pictures: --viz ignored" in captured.err
    assert "written to" in captured.out and "pictures written" not in captured.out
    assert not (run / "viz").exists()


@pytest.fixture
def keep_threads():
    """Tests that set torch's thread count give the old one back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("requested", "local_processes", "cores", "expected"),
    [
        (None, 1, 8, None),  # one process: torch's default stays
        (3, 1, 8, 3),
        (3, 4, 8, 3),  # asked for: as asked, under torchrun too
        (None, 4, 8, 2),  # torchrun: an equal share of the cores
        (None, 3, 8, 2),
        (None, 4, 2, 1),  # at least one
    ],
)
def test_thread_count(monkeypatch, requested, local_processes, cores, expected):
    monkeypatch.setattr(threads, "available_cores", lambda: cores)
    assert threads.thread_count(requested, local_processes) == expected


def test_under_torchrun_each_process_takes_its_share_of_the_cores(monkeypatch, keep_threads):
    monkeypatch.setattr(threads, "available_cores", lambda: 6)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert threads.apply_threads(None, distributed=True) == 2 == torch.get_num_threads()
    assert threads.apply_threads(5, distributed=True) == 5 == torch.get_num_threads()


def test_threads_null_gives_torchs_default_back_after_a_run_that_set_another(
    monkeypatch, keep_threads
):
    """In one process (a notebook, the Python API, the tests) a run with
    ``experiment.threads: null`` does not keep an earlier run's count: thread counts change
    how CPU sums are split, so results would depend on what ran before."""
    monkeypatch.setattr(threads, "STARTUP_THREADS", 2)
    assert threads.apply_threads(1) == 1 == torch.get_num_threads()
    assert threads.apply_threads(None) == 2 == torch.get_num_threads()


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_threads_below_one_is_a_config_error(cli, tmp_path, capsys, bad):
    out = tmp_path / "out"
    assert (
        cli("train", *SMALL_DIGITS, f"experiment.output_dir={out}", f"experiment.threads={bad}")
        == 2
    )
    assert f"experiment.threads={bad}" in capsys.readouterr().err
    assert not out.exists()


def test_a_run_uses_and_logs_its_thread_count(cli, tmp_path, no_curves, keep_threads):
    seen = []

    class Probe(ClassificationTask):
        def forward(self, model, batch):
            seen.append(torch.get_num_threads())
            return super().forward(model, batch)

    torch.set_num_threads(2)
    out = tmp_path / "out"
    args = [*SMALL_DIGITS, f"experiment.output_dir={out}", "trainer.epochs=1"]
    trainer = build_trainer(
        load_config(args[0], [*args[1:], "experiment.threads=1"]),
        Probe(load_config(args[0], args[1:])),
    )
    trainer.fit()
    assert set(seen) == {1}
    (run,) = run_dirs(out)
    assert "1 CPU thread(s) each" in (run / "train.log").read_text()
