"""Issue #17: ``dltemplate predict`` for classification (a line per file, --top-k, --out JSON,
bad files) and objects in the Python API (``train``/``evaluate`` with ``dataset=``/``model=``
built in code, from a fresh process; the command line on such a run; re-registering a name)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_dirs
from test_hostile_images import write_bomb_png
from test_image_folder import make_folder

import dltemplate
from dltemplate.assemble import build_evaluator
from dltemplate.data.base import Batch
from dltemplate.registry import Registry

# Under pytest -n, this file's tests share one worker: its module fixtures (trained runs)
# are built once, not once per worker.
pytestmark = pytest.mark.xdist_group("test_predict_api")

CONFIG = REPO / "configs" / "image_folder_cnn.yaml"


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    return lines[0]


# == predict, classification ====================================================================
@pytest.fixture(scope="session")  # see tests/test_segmentation.py's carvana
def folder_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run directory, data root): one epoch of the small CNN on a generated image folder."""
    from dltemplate.cli import main

    home = tmp_path_factory.mktemp("predict")
    root = make_folder(home / "data", per_class=10)
    out = home / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(home)
        assert main(["train", str(CONFIG), f"data.root={root}", f"experiment.output_dir={out}",
                     "data.args.size=[16,16]", "trainer.epochs=1", "model.args.width=8",
                     "data.batch_size=8", "trainer.progress_bar=off"]) == 0  # fmt: skip
    for handler in list(logging.getLogger("dltemplate").handlers):  # the run's train.log
        logging.getLogger("dltemplate").removeHandler(handler)
        handler.close()
    (run,) = run_dirs(out)
    return run, root


def some_files(root: Path) -> list[Path]:
    return [
        root / "red" / "img000.png",
        root / "blue" / "img001.jpg",
        root / "green" / "img002.bmp",
    ]


def test_predict_prints_a_line_per_file_and_writes_json(cli, folder_run, tmp_path, capsys):
    run, root = folder_run
    files = some_files(root)
    out = tmp_path / "sub" / "preds.json"
    assert cli("predict", run, *files, "--out", out) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    records = json.loads(out.read_text())
    assert [r["file"] for r in records] == [str(f) for f in files]
    for line, record in zip(lines, records, strict=True):
        (best,) = record["predictions"]
        assert best["class"] in ("blue", "green", "red") and 0 < best["probability"] <= 1
        assert line == f"{record['file']}: {best['class']} {best['probability']:.4f}"
    capsys.readouterr()
    assert cli("predict", run, files[0]) == 0  # no --out: the lines alone
    assert capsys.readouterr().out.strip() == lines[0]


def test_top_k_lists_every_class_by_probability_summing_to_one(cli, folder_run, tmp_path, capsys):
    run, root = folder_run
    out = tmp_path / "preds.json"
    assert cli("predict", run, *some_files(root), "--top-k", "3", "--out", out) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    for line, record in zip(lines, json.loads(out.read_text()), strict=True):
        probs = [p["probability"] for p in record["predictions"]]
        assert sorted(p["class"] for p in record["predictions"]) == ["blue", "green", "red"]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1, abs=1e-5)
        assert line.count(", ") == 2
    assert cli("predict", run, root / "red" / "img000.png", "--top-k", "4") == 2
    assert "--top-k 4: must be 1 to 3" in one_error_line(capsys.readouterr().err)


def test_predictions_agree_with_eval_and_with_the_model_on_the_training_tensors(
    cli, folder_run, tmp_path
):
    """The classes predict gives are those ``eval`` gives the same test images, and its
    probabilities those of the model on the dataset's own decoded, normalised tensors."""
    run, root = folder_run
    report = dltemplate.evaluate(run)
    samples = {s["file"]: s["prediction"] for s in report["samples"]}
    out = tmp_path / "preds.json"
    assert cli("predict", run, *[root / name for name in samples], "--out", out) == 0
    records = json.loads(out.read_text())
    got = {Path(r["file"]).relative_to(root).as_posix(): r["predictions"][0] for r in records}
    assert {name: p["class"] for name, p in got.items()} == samples

    evaluator = build_evaluator(run)
    pool, _ = evaluator.task.dataset().load()  # the decoded images, as training read them
    index = torch.tensor([pool.names.index(name) for name in got])
    inputs, labels = pool.gather(index)
    batch = evaluator.task.prepare_batch(Batch(inputs, labels, len(index)), evaluator.device,
                                         evaluator.info)  # fmt: skip
    with torch.no_grad():
        probs = torch.softmax(evaluator.model.eval()(batch.inputs), 1)
    names = evaluator.info.class_names
    for row, p in zip(probs, got.values()):
        assert names[int(row.argmax())] == p["class"]
        assert float(row.max()) == pytest.approx(p["probability"], abs=1e-5)


def bad_files(home: Path) -> dict[str, Path]:
    text = home / "notes.png"
    text.write_text("not an image\n")
    corrupt = home / "cut.png"
    good = make_folder(home / "one", per_class=1) / "red" / "img000.png"
    corrupt.write_bytes(good.read_bytes()[:60])  # a header, pixels cut short
    return {
        "missing": home / "nowhere.png",
        "not an image": text,
        "corrupt": corrupt,
        "decompression bomb": write_bomb_png(home / "huge.png"),
    }


@pytest.mark.parametrize("kind", ["missing", "not an image", "corrupt", "decompression bomb"])
def test_a_bad_file_is_one_line_exit_2_and_nothing_is_written(
    cli, folder_run, tmp_path, capsys, kind
):
    run, root = folder_run
    bad = bad_files(tmp_path)[kind]
    out = tmp_path / "preds.json"
    capsys.readouterr()
    assert cli("predict", run, root / "red" / "img000.png", bad, "--out", out) == 2
    captured = capsys.readouterr()
    line = one_error_line(captured.err)
    assert str(bad) in line
    if kind == "decompression bomb":
        assert "DecompressionBombError" in line
    assert captured.out == "" and not out.exists()


def test_out_naming_a_folder_is_refused_for_classification(cli, folder_run, tmp_path, capsys):
    run, root = folder_run
    (tmp_path / "folder").mkdir()
    assert cli("predict", run, root / "red" / "img000.png", "--out", tmp_path / "folder") == 2
    line = one_error_line(capsys.readouterr().err)
    assert "is a folder" in line and "JSON" in line


def test_any_image_classification_run_predicts_digits_too(cli, tmp_path, capsys):
    """The digits demo's 8x8 grey pictures: a picture file is read grey, at that size."""
    out = tmp_path / "out"
    assert cli("train", REPO / "configs" / "digits_mlp.yaml", f"experiment.output_dir={out}",
               "data.train_val_sample_rate=0.3", "model.args.hidden=[8]", "trainer.epochs=1",
               "trainer.progress_bar=off") == 0  # fmt: skip
    (run,) = run_dirs(out)
    image = make_folder(tmp_path / "pics", per_class=1) / "red" / "img000.png"
    capsys.readouterr()
    assert cli("predict", run, image) == 0  # digits are 8x8 grey pictures: they work
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{image}: ") and len(line.split()) == 3


# == objects in the Python API, from a fresh process ==============================================
SCRIPT = '''
import json, sys
import torch
from torch import nn
from torch.utils.data import Dataset
import dltemplate
from dltemplate.errors import ConfigError


class Halves(Dataset):
    """Grey 8x8 pictures, a bright left (0) or right (1) half; ``offset`` shifts the samples."""

    classes = ["left", "right"]

    def __init__(self, n=160, offset=0):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        label = i % 2
        g = torch.Generator().manual_seed(i + 1000 * self.offset)
        image = torch.rand(1, 8, 8, generator=g) * 0.3
        image[..., 4 * label : 4 * label + 4] += 0.6
        return image, label


class Net(nn.Module):
    def __init__(self, input_shape=(3, 4, 4), num_classes=5):
        super().__init__()
        c, h, w = input_shape
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 16), nn.ReLU(),
                                  nn.Linear(16, num_classes))

    def forward(self, x):
        return self.body(x)


def main(out):
    cfg = {"experiment": {"name": "objs", "output_dir": out},
           "data": {"batch_size": 16, "name": "digits"},
           "model": {"name": "Vanilla", "args": {"hidden": [8]}},
           "trainer": {"epochs": 2, "progress_bar": "off"}}
    said = {}
    # A factory (the class) and a test split of its own.
    first = dltemplate.train(cfg, dataset=Halves(), test_dataset=Halves(40, offset=1), model=Net)
    said["factory"] = {"run": str(first.run_dir), "test": first.test_metrics,
                       "eval": dltemplate.evaluate(first.run_dir, dataset=Halves(),
                               test_dataset=Halves(40, offset=1), model=Net)["metrics"]}
    # An instance, trained in place; the test split carved out by seed.
    net = Net((1, 8, 8), 2)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    second = dltemplate.train(cfg, dataset=Halves(), model=net)
    report = dltemplate.evaluate(second.run_dir, dataset=Halves(), model=Net((1, 8, 8), 2))
    said["instance"] = {"run": str(second.run_dir), "test": second.test_metrics,
                        "eval": report["metrics"],
                        "trained_in_place": any(not torch.equal(before[k], v)
                                                for k, v in net.state_dict().items())}
    errors = {}
    for name, call in {
        "no objects": lambda: dltemplate.evaluate(first.run_dir),
        "no model": lambda: dltemplate.evaluate(first.run_dir, dataset=Halves(),
                                                test_dataset=Halves(40, offset=1)),
        "no test_dataset": lambda: dltemplate.evaluate(first.run_dir, dataset=Halves(), model=Net),
        "not a dataset": lambda: dltemplate.train(cfg, dataset="Dataset/Pics", model=Net),
        "resume without": lambda: dltemplate.resume(first.run_dir),
    }.items():
        try:
            call()
            errors[name] = None
        except ConfigError as exc:
            errors[name] = str(exc)
    said["errors"] = errors
    said["resumed"] = dltemplate.resume(first.run_dir, dataset=Halves(),
                                        test_dataset=Halves(40, offset=1),
                                        model=Net).test_metrics
    print("RESULT " + json.dumps(said))


if __name__ == "__main__":
    main(sys.argv[1])
'''


@pytest.fixture(scope="session")  # see tests/test_segmentation.py's carvana
def objects_script(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """(home, what the script printed): the script run once, in a fresh interpreter."""
    home = tmp_path_factory.mktemp("objects")
    (home / "objs_script.py").write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.run([sys.executable, "objs_script.py", str(home / "out")], cwd=home,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    return home, json.loads(line[len("RESULT ") :])


def test_train_and_evaluate_take_objects_built_in_code(objects_script):
    home, said = objects_script
    for key in ("factory", "instance"):
        run = said[key]
        assert run["test"]["accuracy"] > 0.9  # the halves are easy
        assert run["eval"] == pytest.approx(run["test"])  # the same checkpoint, the same data
    assert said["instance"]["trained_in_place"]
    assert said["resumed"] == pytest.approx(said["factory"]["test"])  # finished: as it was
    first = Path(said["factory"]["run"])
    (config,) = first.glob("config_*.json")
    saved = json.loads(config.read_text())
    assert saved["data"]["name"] == "<code Halves>" and saved["model"]["name"] == "<code Net>"
    assert saved["data"]["args"] == {} and saved["data"]["test_args"] == {}
    assert saved["model"]["args"] == {}
    assert (first / "Net_best_ckpt.pth").exists()
    log = (first / "train.log").read_text()
    assert "evaluate with: dltemplate.evaluate(run, dataset=..., model=...) in Python" in log


def test_calls_missing_objects_say_what_to_pass(objects_script):
    _, said = objects_script
    errors = said["errors"]
    both = errors["no objects"]
    assert "dataset (data.name='<code Halves>') and model (model.name='<code Net>')" in both
    assert "were objects given in Python" in both
    assert "dltemplate.evaluate(run, dataset=..., model=...)" in both
    assert "model (model.name='<code Net>') was an object" in errors["no model"]
    assert "pass test_dataset= again" in errors["no test_dataset"]
    assert "dataset= got a str" in errors["not a dataset"]
    assert "dltemplate.resume(run, dataset=..., model=...)" in errors["resume without"]


@pytest.mark.parametrize("command", ["eval", "resume", "predict"])
def test_the_command_line_on_a_run_of_objects_exits_2_saying_what_to_pass(
    objects_script, cli, command, capsys
):
    _, said = objects_script
    run = said["factory"]["run"]
    args = [command, run, *(["x.png"] if command == "predict" else [])]
    assert cli(*args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "dataset (data.name='<code Halves>') and model (model.name='<code Net>')" in line
    assert "were objects given in Python" in line
    assert "dltemplate.evaluate(run, dataset=..., model=...)" in line
    assert "data.name=package.module:Class model.name=package.module:Class" in line


def test_the_command_line_evaluates_such_a_run_with_importable_names(
    objects_script, cli, monkeypatch, tmp_path
):
    """Naming the same classes by module path evaluates the run (the data is not re-split:
    a dataset given in code may be named otherwise later)."""
    home, said = objects_script
    monkeypatch.syspath_prepend(str(home))  # objs_script.py, importable
    out = tmp_path / "eval.json"
    names = ["data.name=objs_script:Halves", "model.name=objs_script:Net"]
    assert cli("eval", said["instance"]["run"], *names, "--out", out) == 0
    report = json.loads(out.read_text())
    assert report["metrics"] == pytest.approx(said["instance"]["test"])


# == re-registering a name =======================================================================
def test_registering_a_name_again_replaces_it_with_a_warning(caplog):
    reg = Registry("widget")

    @reg.register("double")
    def double(x: int) -> int:
        return 2 * x

    logger = logging.getLogger("dltemplate")
    logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.WARNING, logger="dltemplate"):
            reg.register("double")(lambda x: 3 * x)  # the notebook cell, run again
    finally:
        logger.removeHandler(caplog.handler)
    assert reg.build("double", x=2) == 6
    (record,) = [r for r in caplog.records if "registered again" in r.getMessage()]
    assert record.levelno == logging.WARNING and "widget 'double'" in record.getMessage()
    reg.register("double")(reg.get("double"))  # the same object again: nothing to say
    assert len([r for r in caplog.records if "registered again" in r.getMessage()]) == 1
    with pytest.raises(ValueError, match="reserved"):
        reg.register("<code Net>")(double)
