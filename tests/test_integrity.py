"""Run-directory integrity: checkpoint digests, damaged files, resuming, temp files, run order."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import dltemplate.engine.checkpoint as ckpt_module
import dltemplate.engine.rundir as rundir_module
from dltemplate.atomic import atomic_write_text
from dltemplate.engine.checkpoint import (
    FORMAT,
    content_digest,
    load_checkpoint,
    newest_checkpoint,
    newest_intact_checkpoint,
    save_checkpoint,
)
from dltemplate.engine.rundir import (
    MetricsTable,
    latest_run_dir,
    remove_stale_temp_files,
    save_config,
)
from dltemplate.errors import CheckpointError, UsageError

# a flipped byte may turn the pickle's protocol number into something torch warns about
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def same(a: Any, b: Any) -> bool:
    """Strict equality: same types, dict key order, tensor dtypes, shapes and values."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and torch.equal(a, b)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return type(a) is type(b) and a == b


def training_state(step: int = 7, size: int = 16) -> dict[str, Any]:
    torch.manual_seed(step)
    return {
        "model": {"0.weight": torch.randn(size, 4), "0.bias": torch.zeros(size)},
        "optimizer": {
            "state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(size, 4)}},
            "param_groups": [{"lr": 0.01, "betas": (0.9, 0.999), "params": [0, 1]}],
        },
        "scheduler": None,
        "epoch": 1,
        "global_step": step,
        "rng": [{"python": (3, (1, 2, 3), None), "torch": torch.arange(5, dtype=torch.uint8)}],
        "best_score": 0.5,
        "finished": False,
        "config": {"model": {"name": "Vanilla"}, "trainer": {"epochs": 3}},
    }


def flipped(src: Path, dst: Path, start: int, length: int, mask: int = 0xFF) -> Path:
    data = bytearray(src.read_bytes())
    for i in range(max(0, start), min(len(data), start + length)):
        data[i] ^= mask
    dst.write_bytes(bytes(data))
    return dst


def assert_error_or_intact(path: Path, original: dict[str, Any]) -> str:
    """A damaged file is a CheckpointError naming it, or (padding hit) loads unchanged."""
    try:
        loaded = load_checkpoint(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
        return "error"
    assert same(loaded, original), "a damaged checkpoint loaded with different contents"
    return "intact"


# == the digest ==================================================================================
def test_save_adds_a_digest_that_weights_only_loading_keeps(tmp_path):
    path = tmp_path / "Net_last_ckpt.pth"
    state = training_state()
    save_checkpoint(path, state)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == FORMAT
    assert isinstance(raw["digest"], str) and raw["digest"].startswith("blake2b:")
    assert raw["digest"] == content_digest(raw) == content_digest({"format": FORMAT, **state})
    assert same(load_checkpoint(path), raw)


def test_digest_covers_values_dtypes_shapes_and_key_names():
    base = {"w": torch.arange(6.0).reshape(2, 3), "n": 1, "s": "a", "x": None, "f": 0.1}
    d = content_digest(base)
    assert d == content_digest({**base})  # deterministic
    assert d == content_digest({**base, "digest": "blake2b:whatever"})  # the digest is left out
    variants = [
        {**base, "w": base["w"].clone().index_fill_(1, torch.tensor([2]), 9.0)},
        {**base, "w": base["w"].double()},
        {**base, "w": base["w"].reshape(3, 2)},
        {**base, "n": 2},
        {**base, "n": True},
        {**base, "n": 1.0},
        {**base, "n": "1"},
        {**base, "s": "b"},
        {**base, "x": 0},
        {**base, "f": 0.1 + 1e-16},
        {("v" if k == "w" else k): v for k, v in base.items()},  # a renamed key
        dict(reversed(list(base.items()))),  # key order
        {**base, "extra": None},
    ]
    digests = {content_digest(v) for v in variants}
    assert d not in digests and len(digests) == len(variants)
    # the framing is unambiguous: moving a boundary changes the digest
    assert content_digest({"a": ["bc"]}) != content_digest({"a": ["b", "c"]})
    assert content_digest({"ab": "c"}) != content_digest({"a": "bc"})


def test_digest_of_bf16_zero_dim_and_empty_tensors_round_trips(tmp_path):
    path = tmp_path / "odd.pth"
    state = {
        "bf16": torch.randn(3, 5).to(torch.bfloat16),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "bool": torch.tensor([True, False]),
        "strided": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        "tuple": (1, 2.5, "x"),
    }
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["digest"] == content_digest({"format": FORMAT, **state})
    assert torch.equal(loaded["bf16"], state["bf16"]) and loaded["scalar"].dim() == 0
    other = dict(state, scalar=torch.tensor(3.25))
    assert content_digest(other) != content_digest(state)


def test_a_checkpoint_whose_content_does_not_match_its_digest_is_damaged(tmp_path):
    path = tmp_path / "Net_last_ckpt.pth"
    state = {"format": FORMAT, "w": torch.ones(4), "global_step": 3}
    forged = {**state, "w": torch.tensor([1.0, 1.0, 1.0, 2.0])}
    torch.save({**forged, "digest": content_digest(state)}, path)
    with pytest.raises(CheckpointError) as exc:
        load_checkpoint(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: the checkpoint is damaged (its content does not match")

    torch.save({**state, "digest": 12}, path)  # not even a string
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_digest_is_refused(tmp_path):
    path = tmp_path / "old_last_ckpt.pth"
    torch.save({"format": FORMAT, "w": torch.ones(2), "global_step": 4}, path)
    with pytest.raises(CheckpointError, match="has no digest"):
        load_checkpoint(path)


def test_a_digest_under_a_damaged_key_name_is_not_taken_for_an_old_checkpoint(tmp_path):
    path = tmp_path / "x.pth"
    state = {"format": FORMAT, "w": torch.ones(2)}
    torch.save({**state, "dhgest": content_digest(state)}, path)
    with pytest.raises(CheckpointError, match="is damaged"):
        load_checkpoint(path)


def test_re_saving_a_loaded_checkpoint_gets_a_fresh_digest(tmp_path):
    path = tmp_path / "Net_last_ckpt.pth"
    save_checkpoint(path, training_state())
    state = load_checkpoint(path)
    save_checkpoint(path, {**state, "finished": True})  # the stale digest is replaced
    assert load_checkpoint(path)["finished"] is True


# == damaged files ===============================================================================
@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    path = tmp_path_factory.mktemp("big") / "Net_last_ckpt.pth"
    state = training_state()
    state["model"]["big"] = torch.randn(512, 512)  # 1 MiB of float32
    save_checkpoint(path, state)
    return path, load_checkpoint(path)


def test_4kib_flipped_in_the_middle_of_a_1mb_checkpoint_is_an_error(big_checkpoint, tmp_path):
    path, original = big_checkpoint
    size = path.stat().st_size
    assert size > 1_000_000
    bad = flipped(path, tmp_path / "bad.pth", size // 2 - 2048, 4096)
    with pytest.raises(CheckpointError) as exc:  # tensor bytes: torch.load reads them happily
        load_checkpoint(bad)
    assert str(bad) in str(exc.value) and "damaged" in str(exc.value)


@pytest.mark.parametrize("where", [0.0, 0.001, 0.01, 0.1, 0.3, 0.7, 0.99, 0.999, 1.0])
@pytest.mark.parametrize("length", [1, 4096])
def test_flips_anywhere_in_a_1mb_checkpoint_are_errors_or_harmless(
    big_checkpoint, tmp_path, where, length
):
    path, original = big_checkpoint
    start = int(where * (path.stat().st_size - length))
    bad = flipped(path, tmp_path / "bad.pth", start, length)
    assert_error_or_intact(bad, original)


def test_byte_flips_all_over_a_small_checkpoint_are_errors_or_harmless(tmp_path):
    path = tmp_path / "Net_last_ckpt.pth"
    save_checkpoint(path, training_state(size=2))
    original = load_checkpoint(path)
    data = path.read_bytes()
    bad = tmp_path / "bad.pth"
    outcomes = []
    for i in range(0, len(data), 2):  # every other byte: headers, pickle, tensors, directory
        mask = (0xFF, 0x01, 0x20)[i % 3]  # all bits, the low bit, ASCII case
        outcomes.append(assert_error_or_intact(flipped(path, bad, i, 1, mask), original))
    assert outcomes.count("error") > len(outcomes) // 3  # most bytes matter


def test_a_truncated_checkpoint_is_an_error(tmp_path, big_checkpoint):
    path, _ = big_checkpoint
    for keep in (10, 5000, path.stat().st_size // 2, path.stat().st_size - 30):
        cut = tmp_path / f"cut{keep}.pth"
        cut.write_bytes(path.read_bytes()[:keep])
        with pytest.raises(CheckpointError, match=f"cut{keep}.pth"):
            load_checkpoint(cut)


# == choosing where to resume ====================================================================
def _save(path: Path, step: int, mtime: float | None = None, **extra: Any) -> Path:
    save_checkpoint(path, {**training_state(step), **extra})
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    offset = data.find(b"data/0") + 200  # into the first tensor's bytes
    data[offset : offset + 16] = bytes(16)
    path.write_bytes(bytes(data))


def test_newest_intact_checkpoint_picks_the_most_steps(tmp_path):
    last = _save(tmp_path / "Net_last_ckpt.pth", 10)
    interrupt = _save(tmp_path / "Net_interrupt_ckpt.pth", 12)
    _save(tmp_path / "Net_best_ckpt.pth", 50)  # best is a last resort only
    assert newest_intact_checkpoint(tmp_path) == (interrupt, [])
    _save(interrupt, 8)
    assert newest_intact_checkpoint(tmp_path) == (last, [])
    assert newest_checkpoint(tmp_path) == last


def test_a_tie_in_steps_goes_to_the_newest_file(tmp_path):
    now = time.time()
    last = _save(tmp_path / "Net_last_ckpt.pth", 10, mtime=now - 100)
    interrupt = _save(tmp_path / "Net_interrupt_ckpt.pth", 10, mtime=now)
    assert newest_intact_checkpoint(tmp_path)[0] == interrupt
    os.utime(last, (now + 5, now + 5))
    assert newest_intact_checkpoint(tmp_path)[0] == last


def test_a_damaged_checkpoint_is_skipped_and_reported(tmp_path, caplog):
    last = _save(tmp_path / "Net_last_ckpt.pth", 10)
    interrupt = _save(tmp_path / "Net_interrupt_ckpt.pth", 12)
    _damage(interrupt)
    path, skipped = newest_intact_checkpoint(tmp_path)
    assert path == last
    assert [p for p, _ in skipped] == [interrupt]
    assert "damaged" in skipped[0][1] and str(interrupt) not in skipped[0][1]

    with caplog.at_level(logging.WARNING, logger="dltemplate"):
        assert newest_checkpoint(tmp_path) == last
    assert "skipping damaged checkpoint" in caplog.text and interrupt.name in caplog.text


def test_an_unreadable_checkpoint_is_skipped_too(tmp_path):
    last = _save(tmp_path / "Net_last_ckpt.pth", 10)
    interrupt = tmp_path / "Net_interrupt_ckpt.pth"
    interrupt.write_bytes(b"PK\x03\x04 cut short")
    path, skipped = newest_intact_checkpoint(tmp_path)
    assert path == last and [p for p, _ in skipped] == [interrupt]
    assert "not a dltemplate checkpoint (not readable" in skipped[0][1]


def test_when_last_and_interrupt_are_damaged_a_full_best_checkpoint_is_used(tmp_path):
    last = _save(tmp_path / "Net_last_ckpt.pth", 10)
    interrupt = _save(tmp_path / "Net_interrupt_ckpt.pth", 12)
    best = _save(tmp_path / "Net_best_ckpt.pth", 6)
    _damage(last)
    _damage(interrupt)
    path, skipped = newest_intact_checkpoint(tmp_path)
    assert path == best
    assert sorted(p for p, _ in skipped) == sorted([last, interrupt])


def test_a_weights_only_best_checkpoint_is_no_resume_point(tmp_path):
    last = _save(tmp_path / "Net_last_ckpt.pth", 10)
    _damage(last)
    best = tmp_path / "Net_best_ckpt.pth"
    save_checkpoint(best, {"model": training_state()["model"], "epoch": 1})
    with pytest.raises(CheckpointError) as exc:
        newest_intact_checkpoint(tmp_path)
    msg = str(exc.value)
    assert str(tmp_path) in msg and "no intact checkpoint" in msg
    assert last.name in msg and "damaged" in msg and best.name not in msg


def test_when_every_checkpoint_is_damaged_the_error_names_them(tmp_path):
    last = _save(tmp_path / "Net_last_ckpt.pth", 10)
    interrupt = _save(tmp_path / "Net_interrupt_ckpt.pth", 12)
    best = _save(tmp_path / "Net_best_ckpt.pth", 6)
    for p in (last, interrupt, best):
        _damage(p)
    with pytest.raises(CheckpointError) as exc:
        newest_checkpoint(tmp_path)
    for p in (last, interrupt, best):
        assert p.name in str(exc.value)


def test_nothing_to_resume_keeps_its_message(tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume \\(no \\*_last_ckpt.pth"):
        newest_intact_checkpoint(tmp_path)


def test_the_chosen_checkpoint_is_not_read_twice(tmp_path, monkeypatch):
    last = _save(tmp_path / "Net_last_ckpt.pth", 10)
    _save(tmp_path / "Net_interrupt_ckpt.pth", 4)
    reads = []
    real_load = torch.load
    monkeypatch.setattr(
        ckpt_module.torch, "load", lambda f, *a, **k: reads.append(Path(f)) or real_load(f, *a, **k)
    )
    path, _ = newest_intact_checkpoint(tmp_path)
    assert path == last and len(reads) == 2
    state = load_checkpoint(path)
    assert state["global_step"] == 10 and len(reads) == 2  # handed over, not re-read
    assert load_checkpoint(path)["global_step"] == 10 and len(reads) == 3  # only once

    newest_intact_checkpoint(tmp_path)
    _save(last, 11)  # rewritten meanwhile: read again
    assert load_checkpoint(last)["global_step"] == 11 and len(reads) == 6


# == leftover temp files =========================================================================
def test_remove_stale_temp_files(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        keep = [
            "Net_last_ckpt.pth",
            "metrics.csv",
            "curves.png",
            "config_x_20240101_000000.json",
            "notes.tmp",  # not hidden, not ours
            f".Net_last_ckpt.pth.{alive.pid}.tmp",  # another process, writing right now
        ]
        stale = [
            f".Net_last_ckpt.pth.{dead.pid}.tmp",
            f".Net_interrupt_ckpt.pth.{os.getpid()}.tmp",  # our own, from before
            f".metrics.csv.{dead.pid}.tmp",
            ".config.json.tmp",  # hidden, no pid
            "metrics.csv.tmp",
            "other.csv.tmp",
            "curves.tmp.png",
        ]
        for name in keep + stale:
            (tmp_path / name).write_bytes(b"x")
        (tmp_path / ".dir.1.tmp").mkdir()  # a folder is not a temp file
        (tmp_path / "summary").mkdir()
        (tmp_path / "summary" / "metrics.csv.tmp").write_bytes(b"x")  # only the top level

        removed = remove_stale_temp_files(tmp_path)
        assert sorted(p.name for p in removed) == sorted(stale)
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left == sorted([*keep, ".dir.1.tmp", "summary"])
        assert (tmp_path / "summary" / "metrics.csv.tmp").exists()
        assert remove_stale_temp_files(tmp_path) == []
    finally:
        alive.kill()
        alive.wait()
    # once its writer is gone, the last one goes too
    assert [p.name for p in remove_stale_temp_files(tmp_path)] == [keep[-1]]


def test_a_killed_save_leaves_a_temp_file_that_the_cleaner_removes(tmp_path):
    path = tmp_path / "Net_last_ckpt.pth"
    code = (
        "import os, torch, dltemplate.engine.checkpoint as c\n"
        "def killed(obj, fh, *a, **k):\n"
        "    fh.write(b'PK partial'); fh.flush(); os._exit(9)\n"
        "torch.save = killed\n"
        f"c.save_checkpoint({str(path)!r}, {{'w': torch.ones(3)}})\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], timeout=120)
    assert proc.returncode == 9
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and not path.exists()
    assert remove_stale_temp_files(tmp_path) == leftovers
    assert list(tmp_path.iterdir()) == []


# == atomic text writes ==========================================================================
def test_atomic_write_text(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "zweite Zeile \u00e9\r\n")
    assert path.read_bytes() == "zweite Zeile \u00e9\r\n".encode()  # as given, in UTF-8

    def broken_replace(src, dst):
        raise OSError("rename failed")

    monkeypatch.setattr(rundir_module.os, "replace", broken_replace)
    with pytest.raises(OSError, match="rename failed"):
        atomic_write_text(path, "third")
    monkeypatch.undo()
    assert path.read_bytes() == "zweite Zeile \u00e9\r\n".encode()
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left


def test_save_config_and_metrics_table_write_atomically(tmp_path, monkeypatch):
    run = tmp_path / "20240101_120000"
    run.mkdir()
    written = []
    real = rundir_module.atomic_write_text
    monkeypatch.setattr(
        rundir_module, "atomic_write_text", lambda p, t: written.append(Path(p).name) or real(p, t)
    )
    path = save_config(run, "exp", {"lr": 0.1})
    assert json.loads(path.read_text())["lr"] == 0.1

    table = MetricsTable(run / "metrics.csv")
    table.append({"epoch": 1, "train/loss": 0.5})
    table.append({"epoch": 2, "train/loss": 0.25, "val/loss": 0.3})
    assert written == [path.name, "metrics.csv", "metrics.csv"]
    assert MetricsTable(run / "metrics.csv").rows[1] == {
        "epoch": "2",
        "train/loss": "0.25",
        "val/loss": "0.3",
    }
    assert (run / "metrics.csv").read_bytes().startswith(b"epoch,train/loss,val/loss\r\n")
    assert sorted(p.name for p in run.iterdir()) == [path.name, "metrics.csv"]


# == which run is the latest =====================================================================
def _run(output: Path, name: str) -> Path:
    run = output / name
    run.mkdir(parents=True)
    (run / f"config_exp_{name}.json").write_text("{}")
    return run


def test_latest_run_dir_goes_by_the_timestamp_not_the_mtime(tmp_path):
    old = _run(tmp_path, "20240101_120000")
    new = _run(tmp_path, "20240102_080000")
    now = time.time()
    os.utime(new, (now - 1000, now - 1000))
    (old / "eval_metrics.json").write_text("{}")  # evaluating the old run writes into it
    os.utime(old, (now, now))
    assert latest_run_dir(tmp_path) == new


def test_latest_run_dir_orders_n_suffixes_after_the_bare_stamp(tmp_path):
    bare = _run(tmp_path, "20240102_080000")
    assert latest_run_dir(tmp_path) == bare
    _run(tmp_path, "20240102_080000_2")
    ten = _run(tmp_path, "20240102_080000_10")  # numerically, not as text
    os.utime(bare, (time.time() + 100, time.time() + 100))
    assert latest_run_dir(tmp_path) == ten


def test_latest_run_dir_ignores_other_names_unless_none_is_a_timestamp(tmp_path):
    stamped = _run(tmp_path, "20240101_120000")
    mine = _run(tmp_path, "my_run")
    _run(tmp_path, "20241399_999999")  # looks like one, is no date
    os.utime(mine, (time.time() + 100, time.time() + 100))
    assert latest_run_dir(tmp_path) == stamped

    other = tmp_path / "other"
    a, b = _run(other, "a"), _run(other, "b")
    os.utime(a, (time.time() + 100, time.time() + 100))
    assert latest_run_dir(other) == a
    assert b.exists()
    with pytest.raises(UsageError, match="no run directory"):
        latest_run_dir(tmp_path / "empty")


def test_a_full_disk_while_writing_a_checkpoint_is_one_line_and_keeps_the_last(
    cli, tmp_path, capsys, monkeypatch
):
    """A full disk mid-write: exit status 1, one line naming the file, no traceback, and the
    previous checkpoint intact (torch itself would say "inline_container.cc ... unexpected pos")."""
    import errno
    import io

    from conftest import REPO, run_dirs

    from dltemplate import atomic

    demo = REPO / "configs" / "digits_mlp.yaml"
    out = tmp_path / "out"
    real_open = open
    writes = {"last": 0}

    class FullDisk(io.FileIO):
        def write(self, data):  # the disk fills up part-way through the file
            if self.tell() > 1000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    def fake_open(path, mode="r", *args, **kwargs):
        if "last_ckpt" in str(path) and "w" in mode:
            writes["last"] += 1
            if writes["last"] == 2:  # the second epoch's last checkpoint
                return FullDisk(path, "wb")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic, "open", fake_open, raising=False)
    small = ["data.train_val_sample_rate=0.3", "model.args.hidden=[16]", "trainer.epochs=3"]
    assert cli("train", demo, f"experiment.output_dir={out}", *small) == 1
    err = capsys.readouterr().err
    (run,) = run_dirs(out)
    last = run / "Vanilla_last_ckpt.pth"
    assert f"dltemplate: error: no space left on device while writing {last}" in err
    assert "Traceback" not in err and "inline_container" not in err
    state = load_checkpoint(last)  # intact, with its digest: the first epoch's
    assert state["epoch"] == 1
    assert not list(run.glob(".*.tmp"))
