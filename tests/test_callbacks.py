"""Callbacks, checked by what a user sees: the README's example resumes exactly after any stop,
the shipped callbacks do what their table says, and a bad callbacks list stops before any work."""

from __future__ import annotations

import csv
import json
import math
import shlex
import sys
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    assert_identical,
    metric_rows,
    readme_block,
    run_dirs,
    stop_at_training_forward,
)
from conftest import run_results as results

from dltemplate.callbacks import EVENTS, Callback, CallbackList, GradNorm
from dltemplate.cli import main
from dltemplate.engine.trainer import TrainerBase
from dltemplate.registry import CALLBACKS
from dltemplate.tasks.classification import ClassificationTask

DEMO = REPO / "configs" / "digits_mlp.yaml"
# 388 training samples at batch 32: 13 optimizer steps an epoch.
SMALL = [
    "data.train_val_sample_rate=0.3",
    "data.test_sample_rate=0.3",
    "model.args.hidden=[32]",
    "trainer.epochs=2",
]
STEPS_PER_EPOCH = 13
README_COMMAND = "dltemplate train configs/digits_mlp.yaml experiment.imports=[my_callbacks]"


def readme_command(first_line: str) -> list[str]:
    """The one ``dltemplate ...`` command of a README block, split as a shell would, with the
    demo config given by its absolute path (the tests run from tmp_path)."""
    (line,) = readme_block(first_line).splitlines()
    args = shlex.split(line)[1:]
    assert args[1] == "configs/digits_mlp.yaml"
    return [args[0], str(DEMO), *args[2:]]


def saved_states(checkpoint: dict[str, object], name: str) -> list[dict[str, object]]:
    """The saved states of the callbacks of class ``name`` in a checkpoint (saved by state key:
    the class name, with the arguments that tell two apart in braces)."""
    return [
        {"callback": key, "state": state}
        for key, state in checkpoint["callbacks"].items()
        if key == name or key.startswith(name + "{")
    ]


def last_state(run: Path) -> dict[str, object]:
    (last,) = run.glob("*_last_ckpt.pth")
    return torch.load(last, weights_only=True)


@pytest.fixture(autouse=True)
def no_curves(monkeypatch):
    """curves.png is not what these tests look at; drawing it is half of a tiny run."""
    from dltemplate.engine import rundir

    monkeypatch.setattr(rundir, "plot_curves", lambda *a, **k: None)


# == probes: small callbacks that look at the trainer, registered for one test only ===========
class Probe(Callback):
    """Base of the probes: remembers itself and the model, so that the test can look."""

    made: list[Probe] = []

    def __init__(self) -> None:
        Probe.made.append(self)
        self.model = None

    def setup(self, cfg, model) -> None:
        self.model = model  # the bare model, before the trainer exists


class GradProbe(Probe):
    """Hand-computes the gradient norm right after grad_norm measured it, and the size of the
    update the optimizer then made."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, float | None, float, float]] = []
        self.updates: list[float] = []
        self._before: list[torch.Tensor] = []

    def on_before_optimizer_step(self, trainer) -> None:
        params = list(trainer.unwrapped_model.parameters())
        grads = [p.grad for p in params]
        assert all(g is not None for g in grads)
        by_stack = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        by_cat = torch.cat([g.flatten() for g in grads]).double().norm()
        (grad_norm,) = [c for c in trainer.callbacks.callbacks if isinstance(c, GradNorm)]
        step = trainer.state.global_step + 1
        self.seen.append((step, grad_norm.last, float(by_stack), float(by_cat)))
        self._before = [p.detach().clone() for p in params]

    def on_after_optimizer_step(self, trainer) -> None:
        params = list(trainer.unwrapped_model.parameters())
        delta = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, self._before)])
        self.updates.append(float(delta.double().norm()))


class WeightProbe(Probe):
    """The model's weights as training starts and after every epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.start: dict[str, torch.Tensor] = {}
        self.after_epoch: list[dict[str, torch.Tensor]] = []

    def _copy(self, trainer) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in trainer.unwrapped_model.state_dict().items()}

    def on_fit_start(self, trainer) -> None:
        self.start = self._copy(trainer)

    def on_epoch_end(self, trainer, row) -> None:
        self.after_epoch.append(self._copy(trainer))


@pytest.fixture
def probes(monkeypatch):
    """Register the probes under test-only names for this test; return the made instances."""
    monkeypatch.setitem(CALLBACKS._items, "test_grad_probe", GradProbe)
    monkeypatch.setitem(CALLBACKS._items, "test_weight_probe", WeightProbe)
    Probe.made.clear()
    yield Probe.made
    Probe.made.clear()


# == the README's example =====================================================================
def _write_readme_callbacks(folder: Path) -> None:
    (folder / "my_callbacks.py").write_text(readme_block("# my_callbacks.py"))


@pytest.fixture(scope="module")
def readme_reference(tmp_path_factory) -> Path:
    """The README's loss_history run, never stopped (once for the module)."""
    home = tmp_path_factory.mktemp("readme_reference")
    _write_readme_callbacks(home)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        mp.setattr("dltemplate.engine.rundir.plot_curves", lambda *a, **k: None)
        out = home / "out"
        assert main([*readme_command(README_COMMAND), *SMALL, f"experiment.output_dir={out}"]) == 0
    (run,) = run_dirs(out)
    return run


def test_readme_loss_history_logs_every_five_steps(readme_reference):
    history = json.loads((readme_reference / "loss_history.json").read_text())
    steps = [step for step, _ in history]
    assert steps == list(range(5, 2 * STEPS_PER_EPOCH + 1, 5))  # 5, 10, ..., 25
    assert all(isinstance(loss, float) and math.isfinite(loss) and loss > 0 for _, loss in history)
    # the state the README's callback returns travels in every checkpoint
    (saved,) = saved_states(last_state(readme_reference), "LossHistory")
    assert saved == {"callback": "LossHistory", "state": {"history": history}}


@pytest.mark.parametrize(
    "way, at_call, status, stopped_at",
    [
        ("exception", STEPS_PER_EPOCH + 5, 1, STEPS_PER_EPOCH + 4),  # last boundary: step 17
        ("sigterm", 20, 130, 20),  # a logged step: stops right after it, at that boundary
    ],
)
def test_readme_loss_history_resumes_exactly(
    way, at_call, status, stopped_at, readme_reference, cli, tmp_path, monkeypatch
):
    _write_readme_callbacks(tmp_path)
    out = tmp_path / "out"
    original = stop_at_training_forward(monkeypatch, at_call, way)
    assert cli(*readme_command(README_COMMAND), *SMALL, f"experiment.output_dir={out}") == status
    monkeypatch.setattr(ClassificationTask, "forward", original)
    (run,) = run_dirs(out)
    assert not (run / "loss_history.json").exists()
    interrupt = torch.load(run / "Vanilla_interrupt_ckpt.pth", weights_only=True)
    assert interrupt["global_step"] == stopped_at
    expected = json.loads((readme_reference / "loss_history.json").read_text())
    (saved,) = saved_states(interrupt, "LossHistory")
    assert saved["state"]["history"] == [p for p in expected if p[0] <= stopped_at]

    assert cli("resume", run, "--trust-code") == 0  # its saved config imports my_callbacks
    assert run_dirs(out) == [run]
    assert json.loads((run / "loss_history.json").read_text()) == expected
    assert_identical(last_state(run)["callbacks"], last_state(readme_reference)["callbacks"])
    assert_identical(results(run), results(readme_reference), way)


# == grad_norm ================================================================================
def test_grad_norm_is_the_global_l2_norm_every_step_in_tensorboard(cli, tmp_path, probes):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    callbacks = "callbacks=[{name: grad_norm, args: {every: 1}}, test_grad_probe]"
    common = [*SMALL, "trainer.epochs=1", "trainer.limit_train_batches=5", "optimizer.name=sgd"]
    assert cli("train", DEMO, f"experiment.output_dir={out}", *common, callbacks) == 0
    (probe,) = probes
    assert [step for step, *_ in probe.seen] == [1, 2, 3, 4, 5]
    for step, reported, by_stack, by_cat in probe.seen:
        assert reported == by_stack, step  # the same sum, the same float
        assert reported == pytest.approx(by_cat, rel=1e-5), step
        assert reported > 0
    (run,) = run_dirs(out)
    acc = EventAccumulator(str(run / "summary"))
    acc.Reload()
    points = acc.Scalars("train/grad_norm")
    assert [p.step for p in points] == [1, 2, 3, 4, 5]
    for point, (_, reported, _, _) in zip(points, probe.seen):
        assert point.value == pytest.approx(reported, rel=1e-6)
    log = (run / "train.log").read_text()
    assert f"step 5: gradient norm {probe.seen[-1][1]:.4g}" in log


def test_grad_norm_reports_the_norm_before_clipping(cli, tmp_path, probes):
    out = tmp_path / "out"
    callbacks = "callbacks=[{name: grad_norm, args: {every: 1}}, test_grad_probe]"
    lr = 0.1
    common = [*SMALL, "trainer.epochs=1", "trainer.limit_train_batches=3",
              "optimizer.name=sgd", f"optimizer.lr={lr}", "scheduler.name=none",
              "trainer.clip_grad_norm=0.01"]  # fmt: skip
    assert cli("train", DEMO, f"experiment.output_dir={out}", *common, callbacks) == 0
    (probe,) = probes
    assert len(probe.seen) == 3
    for (step, reported, by_stack, _), update in zip(probe.seen, probe.updates):
        assert reported == by_stack, step  # what the gradients were before clipping
        assert reported > 0.01 * 10, step  # far above the clip: unclipped
        # plain SGD: the update is lr x the clipped gradient, whose norm is the clip
        assert update == pytest.approx(lr * 0.01, rel=1e-3), step


# == tensorboard ==============================================================================
def test_tensorboard_logs_the_hyperparameters_with_the_final_metrics(cli, tmp_path):
    """TensorBoard's HPARAMS view reads these: the config flattened, and the metric tags to
    show beside it, each of which holds its final value as a scalar of the run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "out"
    args = [f"experiment.output_dir={out}", *SMALL, "optimizer.lr=0.0123", "model.args.hidden=[32]"]
    assert cli("train", DEMO, *args) == 0
    (run,) = run_dirs(out)
    acc = EventAccumulator(str(run / "summary"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["optimizer.lr"].number_value == pytest.approx(0.0123)
    assert hp["trainer.epochs"].number_value == 2
    assert hp["model.name"].string_value == "Vanilla"
    assert hp["model.args.hidden"].string_value == "[32]"  # a list, as JSON text
    assert hp["trainer.monitor"].string_value == "val/accuracy"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"test/accuracy", "val/accuracy", "train/loss", "best/val/accuracy"} <= tags
    for tag in tags:  # each has its final value where the view looks for it
        assert acc.Scalars(tag), tag
    test_metrics = json.loads((run / "test_metrics.json").read_text())
    assert acc.Scalars("test/accuracy")[-1].value == pytest.approx(test_metrics["accuracy"])
    best = max(float(r["val/accuracy"]) for r in metric_rows(run))
    assert acc.Scalars("best/val/accuracy")[-1].value == pytest.approx(best)


def test_a_resume_that_only_tests_logs_the_hyperparameters_with_every_final_metric(
    cli, tmp_path, monkeypatch
):
    """The last epoch's metrics come from the checkpoint: the resumed session trains none."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = tmp_path / "out"
    original_test = TrainerBase.test

    def test(self):
        monkeypatch.setattr(TrainerBase, "test", original_test)  # once
        raise RuntimeError("injected during the final test")

    monkeypatch.setattr(TrainerBase, "test", test)
    assert cli("train", DEMO, f"experiment.output_dir={out}", *SMALL) == 1
    (run,) = run_dirs(out)
    assert cli("resume", run) == 0  # the final test only
    log = (run / "train.log").read_text()
    assert "at epoch 3" not in log  # a 2-epoch run has none
    assert "Vanilla_last_ckpt.pth with training complete (2 epochs, step 26)" in log
    acc = EventAccumulator(str(run / "summary"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    tags = {m.name.tag for m in experiment.experiment.metric_infos}
    last = metric_rows(run)[-1]
    expected = {key for key in last if "/" in key}
    assert expected and expected | {"test/accuracy", "best/val/accuracy"} <= tags
    assert last_state(run)["callbacks"]["TensorBoard"]["final"]["val/accuracy"] == (
        pytest.approx(float(last["val/accuracy"]))
    )


# == freeze ===================================================================================
def test_freeze_keeps_a_layer_for_the_first_epoch_then_trains_it(cli, tmp_path, probes):
    # Vanilla with hidden=[32]: net.0 Flatten, net.1 Linear(64, 32), net.2 ReLU, net.3 Linear.
    out = tmp_path / "out"
    callbacks = "callbacks=[{name: freeze, args: {modules: [net.1], epochs: 1}}, test_weight_probe]"
    common = [*SMALL, "trainer.limit_train_batches=3"]
    assert cli("train", DEMO, f"experiment.output_dir={out}", *common, callbacks) == 0
    (probe,) = probes
    assert isinstance(probe.model.net[1], torch.nn.Linear)
    start, (epoch1, epoch2) = probe.start, probe.after_epoch
    for key in ("net.1.weight", "net.1.bias"):
        assert torch.equal(epoch1[key], start[key]), key  # frozen in epoch 1
        assert not torch.equal(epoch2[key], epoch1[key]), key  # released in epoch 2
    for key in ("net.3.weight", "net.3.bias"):
        assert not torch.equal(epoch1[key], start[key]), key  # the rest trains from the start
    log = (run_dirs(out)[0] / "train.log").read_text()
    assert "freeze: net.1 frozen for 1 epoch(s)" in log and "freeze: net.1 released" in log


def test_freeze_of_a_module_the_model_lacks_stops_before_any_work(cli, tmp_path, capsys):
    out = tmp_path / "out"
    callbacks = "callbacks=[{name: freeze, args: {modules: [net1]}}]"
    assert cli("train", DEMO, f"experiment.output_dir={out}", *SMALL, callbacks) == 2
    err = capsys.readouterr().err
    assert "net1" in err and "did you mean 'net.1'" in err
    assert not out.exists()


# == max_time =================================================================================
@pytest.fixture(scope="module")
def plain_reference(tmp_path_factory) -> dict[str, object]:
    """The small run without callbacks, never stopped."""
    out = tmp_path_factory.mktemp("plain_reference")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("dltemplate.engine.rundir.plot_curves", lambda *a, **k: None)
        assert main(["train", str(DEMO), *SMALL, f"experiment.output_dir={out}"]) == 0
    (run,) = run_dirs(out)
    return results(run)


def test_max_time_stops_at_the_first_boundary_and_resumes_exactly(cli, tmp_path, plain_reference):
    out = tmp_path / "out"
    callbacks = "callbacks=[{name: max_time, args: {seconds: 0.000001}}]"
    assert cli("train", DEMO, f"experiment.output_dir={out}", *SMALL, callbacks) == 130
    (run,) = run_dirs(out)
    interrupt = torch.load(run / "Vanilla_interrupt_ckpt.pth", weights_only=True)
    assert (interrupt["epoch"], interrupt["global_step"]) == (0, 1)
    assert "stopped by max_time" in (run / "train.log").read_text()
    assert not list(run.glob("*_last_ckpt.pth"))

    assert cli("resume", run, "callbacks=[]") == 0  # a changed config: no budget any more
    assert run_dirs(out) == [run]
    assert_identical(results(run), plain_reference, "max_time")


# == a bad callbacks list =====================================================================
@pytest.mark.parametrize(
    "override, words",
    [
        ("callbacks=[grad_nrom]", ["grad_nrom", "did you mean 'grad_norm'"]),
        ("callbacks=[{name: grad_norm, args: {evry: 5}}]", ["grad_norm", "evry"]),
        ("callbacks=[{name: grad_norm, args: {every: 0}}]", ["grad_norm", "every=0"]),
        ("callbacks=[{name: max_time}]", ["max_time"]),  # no budget at all
        ("callbacks=5", ["callbacks", "must be a list"]),
        ("callbacks=[{nme: grad_norm}]", ["nme", "did you mean 'callbacks[0].name'"]),
    ],
)
def test_a_bad_callbacks_list_stops_before_any_work(cli, tmp_path, capsys, override, words):
    out = tmp_path / "out"
    assert cli("train", DEMO, f"experiment.output_dir={out}", *SMALL, override) == 2
    err = capsys.readouterr().err
    for word in words:
        assert word in err, err
    assert not out.exists()


def test_an_unknown_callback_argument_suggests_the_right_one(cli, tmp_path, capsys):
    out = tmp_path / "out"
    override = "callbacks=[{name: grad_norm, args: {evry: 5}}]"
    assert cli("train", DEMO, f"experiment.output_dir={out}", *SMALL, override) == 2
    assert "did you mean 'every'" in capsys.readouterr().err


def test_callbacks_section_in_a_yaml_file_must_be_a_list(cli, tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text(DEMO.read_text() + "callbacks: 5\n")
    assert cli("train", config, f"experiment.output_dir={tmp_path / 'out'}") == 2
    assert "must be a list" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# == no listener costs nothing ================================================================
def test_an_event_nobody_overrides_has_no_listener():
    empty = CallbackList([])
    for event in EVENTS:
        assert getattr(empty, event) == [], event

    class OnlyEpochEnd(Callback):
        def on_epoch_end(self, trainer, row):
            pass

    only = OnlyEpochEnd()
    listening = CallbackList([GradNorm(), only])
    for event in EVENTS:
        expected = {
            "on_epoch_end": [only.on_epoch_end],
            "on_before_optimizer_step": [listening.callbacks[0].on_before_optimizer_step],
        }.get(event, [])
        assert getattr(listening, event) == expected, event
    assert set(EVENTS) == {n for n in vars(Callback) if n == "setup" or n.startswith("on_")}


# == a callback by path, and a bare name ======================================================
def test_a_callback_by_module_path_and_a_bare_name(cli, tmp_path, monkeypatch):
    package = tmp_path / "cbtest_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "marks.py").write_text(
        "from dltemplate.callbacks import Callback\n\n\n"
        "class FitEndMark(Callback):\n"
        "    def __init__(self, text='done'):\n"
        "        self.text = text\n\n"
        "    def on_fit_end(self, trainer):\n"
        "        kinds = [type(c).__name__ for c in trainer.callbacks.callbacks]\n"
        "        every = trainer.callbacks.callbacks[4].every\n"
        "        (trainer.run_dir / 'fit_end.txt').write_text(f'{self.text} {kinds} {every}')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in [m for m in sys.modules if m.startswith("cbtest_pkg")]:
        monkeypatch.delitem(sys.modules, name)
    out = tmp_path / "out"
    callbacks = "callbacks=[grad_norm, {name: 'cbtest_pkg.marks:FitEndMark', args: {text: hi}}]"
    common = [*SMALL, "trainer.epochs=1", "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]  # fmt: skip
    assert cli("train", DEMO, f"experiment.output_dir={out}", *common, callbacks) == 0
    (run,) = run_dirs(out)
    # the built-in callbacks first, the config's in their order, the checkpoints last
    kinds = ["Progress", "TensorBoard", "MetricsTableCallback", "EarlyStoppingCallback",
             "GradNorm", "FitEndMark", "Checkpoint"]  # fmt: skip
    assert (run / "fit_end.txt").read_text() == f"hi {kinds} 50"


# == ema ======================================================================================
class EmaProbe(Probe):
    """Computes the moving average by hand, from the weights after every optimizer step."""

    decay = 0.9

    def __init__(self) -> None:
        super().__init__()
        self.average: dict[str, torch.Tensor] = {}
        self.per_epoch: list[dict[str, torch.Tensor]] = []  # the average after each epoch

    def on_fit_start(self, trainer) -> None:
        if not self.average:  # a resumed run gets its average from the test, not from here
            self.average = {k: v.detach().clone() for k, v in self._params(trainer).items()}

    def on_after_optimizer_step(self, trainer) -> None:
        for name, value in self._params(trainer).items():
            self.average[name] = self.decay * self.average[name] + (1 - self.decay) * value

    def on_epoch_end(self, trainer, row) -> None:
        self.per_epoch.append(dict(self.average))

    @staticmethod
    def _params(trainer) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in trainer.unwrapped_model.named_parameters()}


@pytest.fixture
def ema_probe(monkeypatch):
    monkeypatch.setitem(CALLBACKS._items, "test_ema_probe", EmaProbe)
    Probe.made.clear()
    yield Probe.made
    Probe.made.clear()


EMA = "callbacks=[{name: ema, args: {decay: 0.9}}, test_ema_probe]"


def test_ema_is_the_hand_computed_average_and_is_what_gets_evaluated(cli, tmp_path, ema_probe):
    out = tmp_path / "out"
    assert cli("train", DEMO, f"experiment.output_dir={out}", *SMALL, EMA) == 0
    (probe,) = ema_probe
    (run,) = run_dirs(out)
    last = last_state(run)
    (saved,) = saved_states(last, "EMA")
    for name, expected in probe.average.items():
        assert torch.allclose(saved["state"]["average"][name], expected, rtol=0, atol=1e-6), name
    # last keeps the trained weights (to resume); best holds the average, which was evaluated
    trained = dict(probe.model.named_parameters())
    for name in probe.average:
        assert torch.equal(last["model"][name], trained[name].detach()), name
        assert not torch.equal(last["model"][name], saved["state"]["average"][name]), name
    best = torch.load(run / "Vanilla_best_ckpt.pth", weights_only=True)
    assert "optimizer" not in best  # an average cannot resume training
    best_average = probe.per_epoch[best["epoch"] - 1]  # the best epoch's average, by hand
    for name, expected in best_average.items():
        assert torch.allclose(best["model"][name], expected, rtol=0, atol=1e-6), name
    assert cli("eval", run, "--out", tmp_path / "eval.json") == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert evaluated == pytest.approx(json.loads((run / "test_metrics.json").read_text()))


def test_ema_resumes_exactly_after_a_stop(cli, tmp_path, monkeypatch, ema_probe):
    reference = tmp_path / "reference"
    assert cli("train", DEMO, f"experiment.output_dir={reference}", *SMALL, EMA) == 0
    out = tmp_path / "out"
    original = stop_at_training_forward(monkeypatch, STEPS_PER_EPOCH + 4, "sigterm")
    assert cli("train", DEMO, f"experiment.output_dir={out}", *SMALL, EMA) == 130
    monkeypatch.setattr(ClassificationTask, "forward", original)
    (run,) = run_dirs(out)
    assert cli("resume", run) == 0  # the saved config: the same callbacks
    (ref_run,) = run_dirs(reference)
    ema_of = [saved_states(last_state(r), "EMA") for r in (run, ref_run)]
    assert_identical(ema_of[0], ema_of[1], "ema")
    assert_identical(results(run), results(ref_run), "ema resume")


# == the built-in callbacks: configured, or turned off ========================================
def test_checkpoint_keeps_the_top_k_epochs_and_every_nth(cli, tmp_path):
    out = tmp_path / "out"
    args = "{save_top_k: 2, every_n_epochs: 2}"
    common = [*SMALL, "trainer.epochs=5", "trainer.monitor=val/loss", "trainer.monitor_mode=min"]
    assert cli("train", DEMO, f"experiment.output_dir={out}", *common,
               f"callbacks=[{{name: checkpoint, args: {args}}}]") == 0  # fmt: skip
    (run,) = run_dirs(out)
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    by_loss = sorted(rows, key=lambda r: (float(r["val/loss"]), int(r["epoch"])))
    top2 = sorted(int(r["epoch"]) for r in by_loss[:2])
    kept = sorted(int(p.name.split("epoch")[1][:3]) for p in run.glob("Vanilla_best_epoch*"))
    assert kept == top2
    for epoch in top2:
        state = torch.load(run / f"Vanilla_best_epoch{epoch:03d}_ckpt.pth", weights_only=True)
        assert state["epoch"] == epoch
    every = sorted(p.name for p in run.glob("Vanilla_epoch*_ckpt.pth"))
    assert every == ["Vanilla_epoch002_ckpt.pth", "Vanilla_epoch004_ckpt.pth"]
    snapshot = torch.load(run / "Vanilla_epoch002_ckpt.pth", weights_only=True)
    assert (snapshot["epoch"], snapshot["global_step"]) == (2, 2 * STEPS_PER_EPOCH)
    best = torch.load(run / "Vanilla_best_ckpt.pth", weights_only=True)
    assert best["epoch"] == int(by_loss[0]["epoch"])


def test_a_built_in_callback_can_be_turned_off(cli, tmp_path):
    out = tmp_path / "out"
    off = "callbacks=[{name: tensorboard, enabled: false}, {name: metrics_table, enabled: false}]"
    assert cli("train", DEMO, f"experiment.output_dir={out}", *SMALL, off) == 0
    (run,) = run_dirs(out)
    assert not (run / "summary").exists() and not (run / "metrics.csv").exists()
    assert (run / "Vanilla_last_ckpt.pth").exists() and (run / "test_metrics.json").exists()


def test_early_stopping_is_a_callback_with_its_own_patience(cli, tmp_path, monkeypatch):
    out = tmp_path / "out"
    common = [
        *SMALL,
        "trainer.epochs=6",
        "optimizer.lr=0",
        "trainer.monitor=val/loss",
        "trainer.monitor_mode=min",
    ]  # fmt: skip  (lr 0: nothing ever improves)
    stop = "callbacks=[{name: early_stopping, args: {patience: 2}}]"
    # the final test is interrupted: training had ended early, so the resume only tests
    original_test = TrainerBase.test

    def test(self):
        monkeypatch.setattr(TrainerBase, "test", original_test)  # once
        raise RuntimeError("injected during the final test")

    monkeypatch.setattr(TrainerBase, "test", test)
    assert cli("train", DEMO, f"experiment.output_dir={out}", *common, stop) == 1
    (run,) = run_dirs(out)
    assert not (run / "test_metrics.json").exists()
    log = (run / "train.log").read_text()
    assert "early stopping: val/loss did not improve for 2 epochs" in log
    assert cli("resume", run) == 0  # no more epochs: the final test only
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 3  # best, then 2 without
    assert (run / "test_metrics.json").exists()
    assert last_state(run)["finished"]
    assert cli("resume", run) == 0  # finished: nothing to do
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 3
    # a larger patience continues the run: 3 more epochs without improvement
    assert cli("resume", run, "callbacks=[{name: early_stopping, args: {patience: 5}}]") == 0
    assert len(list(csv.DictReader(open(run / "metrics.csv")))) == 6
