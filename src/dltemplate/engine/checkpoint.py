"""Checkpoints: written atomically, loadable with ``torch.load(weights_only=True)``.

A checkpoint holds only tensors and plain types; the model is saved unwrapped (no ``module.``
or ``_orig_mod.`` prefixes), so it loads into a bare model on any device. Each checkpoint also
carries a ``"digest"`` of its content, checked on load, so a damaged file is an error rather
than a run silently resumed from wrong weights; a file without a digest is refused too.
"""

from __future__ import annotations

import codecs
import hashlib
import logging
import numbers
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dltemplate.atomic import atomic_write
from dltemplate.errors import CheckpointError, DataError, UsageError, short_repr
from dltemplate.registry import code_label

FORMAT = "dltemplate-checkpoint-v1"
KINDS = ("best", "last", "interrupt")
DIGEST_KEY = "digest"
DIGEST_PREFIX = "blake2b:"

log = logging.getLogger("dltemplate")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Drop ``module.`` / ``_orig_mod.`` key prefixes that wrapped models leave in state dicts."""
    out = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def checkpoint_name(model_name: str, kind: str) -> str:
    """The seed's file name: ``<Model>_<kind>_ckpt.pth``."""
    safe = code_label(model_name).rsplit(":", 1)[-1].replace("/", "_")  # <code Net>: Net
    return f"{safe}_{kind}_ckpt.pth"


_KIND = re.compile(r".*?_(best_epoch\d+|epoch\d+|best|last|interrupt)_ckpt")


def checkpoint_kind(path: str | Path) -> str:
    """Which of a run's checkpoints ``path`` is: ``best``, ``last``, ``interrupt``,
    ``best_epoch007``, ``epoch010`` (from ``<Model>_<kind>_ckpt.pth``); another file: its stem,
    folder-safe."""
    stem = Path(path).name.removesuffix(".pth").removesuffix(".pt")
    match = _KIND.fullmatch(stem)
    if match is not None:
        return match.group(1)
    return re.sub(r"[^A-Za-z0-9._=+,@-]+", "-", stem).strip(".-") or "checkpoint"


def refuse_overwriting(out: Path, checkpoint: Path, inputs: Sequence[Path] = ()) -> None:
    """A UsageError when an output file (``--out``) would replace ``checkpoint`` (the one read),
    another checkpoint (a ``<Model>_<kind>_ckpt.pth``) or one of ``inputs``: a command's output
    never damages what is already written."""
    if not out.exists():
        return
    target = out.resolve()
    stem = out.name.removesuffix(".pth")
    if target == checkpoint.resolve() or (out.suffix == ".pth" and _KIND.fullmatch(stem)):
        raise UsageError(f"--out {out}: is a checkpoint, not to be overwritten; name another file")
    if any(target == Path(path).resolve() for path in inputs):
        raise UsageError(f"--out {out}: is one of the input files; name another file")


def check_trained_classes(trained: Any, now: Sequence[str], checkpoint: Path) -> None:
    """A DataError naming both lists when the data's classes (an image folder's sub-folders)
    are not those the checkpoint was trained on, in the same order: its outputs would be
    reported under other names. Checkpoints written before they recorded their classes, and
    data without class names, pass."""
    if trained is not None and not (
        isinstance(trained, list) and all(isinstance(name, str) for name in trained)
    ):
        raise CheckpointError(
            f"{checkpoint}: class_names={short_repr(trained)} (must be a list of names)"
        )
    if not trained or not now or list(trained) == list(now):
        return
    gone, new = sorted(set(trained) - set(now)), sorted(set(now) - set(trained))
    what = (
        f"not in the data {short_repr(gone)}, new in the data {short_repr(new)}"
        if gone or new
        else "the same names in another order"
    )
    raise DataError(
        f"{checkpoint}: the model was trained on classes {short_repr(list(trained))}, but the "
        f"data (data.root) now has {short_repr(list(now))}: {what}; its outputs would be named "
        "wrongly: point data.root at the data it was trained on"
    )


def _frame(tag: bytes, text: str) -> bytes:
    # a length prefix keeps the encoding unambiguous ("ab"+"c" differs from "a"+"bc")
    data = text.encode("utf-8", "surrogatepass")
    return tag + len(data).to_bytes(8, "little") + data


def _feed(h: Any, obj: Any) -> None:
    """Feed ``obj`` into the hash ``h`` by a canonical walk (see :func:`content_digest`)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        if t.layout != torch.strided:  # sparse: hash the values it stands for
            t = t.to_dense()
        t = t.cpu().resolve_conj().resolve_neg().contiguous()
        # a uint8 view works for every dtype numpy lacks (bf16) and for 0-dim tensors
        raw = t.reshape(-1).view(torch.uint8).numpy()
        h.update(_frame(b"T", f"{t.dtype}|{tuple(t.shape)}|{raw.nbytes}"))
        h.update(memoryview(raw))
    elif isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        h.update(_frame(b"A", f"{arr.dtype.str}|{arr.shape}|{arr.nbytes}"))
        h.update(memoryview(arr.reshape(-1).view(np.uint8)))
    elif isinstance(obj, Mapping):  # dict, OrderedDict: keys in order, with their names
        h.update(b"D" + len(obj).to_bytes(8, "little"))
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):  # one tag: a tuple may come back as a list
        h.update(b"L" + len(obj).to_bytes(8, "little"))
        for item in obj:
            _feed(h, item)
    elif obj is None:
        h.update(b"N")
    elif isinstance(obj, (bool, np.bool_)):
        h.update(b"B1" if obj else b"B0")
    elif isinstance(obj, numbers.Integral):  # int and numpy integers hash alike
        h.update(_frame(b"I", repr(int(obj))))
    elif isinstance(obj, numbers.Real):  # float repr round-trips exactly
        h.update(_frame(b"F", float.__repr__(float(obj))))
    elif isinstance(obj, numbers.Complex):
        h.update(_frame(b"C", repr(complex(obj))))
    elif isinstance(obj, str):
        h.update(_frame(b"S", obj))
    elif isinstance(obj, (bytes, bytearray)):
        h.update(b"Y" + len(obj).to_bytes(8, "little"))
        h.update(memoryview(obj))
    else:  # torch.dtype, torch.device...: reprs that survive a save/load round trip
        h.update(_frame(b"O", f"{type(obj).__module__}.{type(obj).__qualname__}:{obj!r}"))


def content_digest(state: Mapping[str, Any]) -> str:
    """``"blake2b:<hex>"`` of a checkpoint's content; a top-level ``"digest"`` key is left out.

    The walk is canonical: dict keys in order with their names, lists and tuples item by item,
    tensors by dtype, shape and raw bytes, plain values by a type tag and their repr. So the
    digest of a loaded checkpoint equals the one of the state that was saved.
    """
    h = hashlib.blake2b()
    _feed(h, {k: v for k, v in state.items() if k != DIGEST_KEY})
    return DIGEST_PREFIX + h.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a crash mid-write leaves the old file intact.

    The file holds ``state`` with a ``"format"`` marker and a ``"digest"`` of its content.
    """
    path = Path(path)
    content = {"format": FORMAT, **{k: v for k, v in state.items() if k != DIGEST_KEY}}
    content[DIGEST_KEY] = content_digest(content)
    atomic_write(path, lambda fh: torch.save(content, fh))


def link_checkpoint(source: Path, path: Path) -> None:
    """Make ``path`` the same file as ``source`` (a hard link, else a copy), atomically.

    Used when two checkpoints hold the same state (best and last): written once, linked once.
    Rewriting ``source`` later renames a new file over it, so ``path`` keeps this content.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:  # a file system without hard links
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# One state that newest_intact_checkpoint loaded and checked, handed to the next
# load_checkpoint of the same unchanged file, so that resuming does not read it twice.
_handoff: tuple[tuple[Any, ...], dict[str, Any]] | None = None


def _file_signature(path: Path) -> tuple[Any, ...]:
    st = path.stat()  # os.replace gives a new inode, an in-place write a new mtime
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a dltemplate checkpoint on the CPU; anything else is a CheckpointError naming it.

    The content must match the checkpoint's digest (a damaged file, or one without a digest,
    is a CheckpointError).
    """
    global _handoff
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    handed, _handoff = _handoff, None  # never keep a big state alive longer than this
    if handed is not None and handed[0] == _file_signature(path):
        return handed[1]
    return _load_and_verify(path)


def keep_for_next_load(path: str | Path, state: dict[str, Any]) -> None:
    """Hand ``state`` (just loaded from ``path``) to the next :func:`load_checkpoint` of the same
    unchanged file, so that a caller that reads a checkpoint's config first does not make the
    next reader load and verify the whole file again."""
    global _handoff
    _handoff = (_file_signature(Path(path)), state)


def _not_saved_by_torch(path: Path) -> str | None:
    """Why ``path`` cannot be a file ``torch.save`` wrote (a zip archive, or an old-style pickle
    starting with its protocol byte), in a few words; None when it may be one."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None  # torch.load says what is wrong with it
    if head.startswith((b"\x80", b"PK")):  # a pickle or a zip, whole or not: torch.load says
        return None
    if not head:
        return "an empty file"
    try:  # final=False: the 512 bytes may end inside a character
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return "not a file torch.save wrote"
    guess = " (a YAML config? train and config take those)" if path.suffix in _YAML else ""
    return f"a text file{guess}, not a file torch.save wrote"


_YAML = (".yaml", ".yml", ".json")


def _load_and_verify(path: Path) -> dict[str, Any]:
    why = _not_saved_by_torch(path)
    if why is not None:
        raise CheckpointError(
            f"{path} is not a dltemplate checkpoint: {why}; give a run directory or a "
            "checkpoint in it (<Model>_best_ckpt.pth, <Model>_last_ckpt.pth)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds on foreign files (KeyError, IndexError...)
        raise CheckpointError(
            f"{path} is not a dltemplate checkpoint (not readable: {_load_failure(exc)})"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a dltemplate checkpoint (no '{FORMAT}' marker)")
    digest = state.get(DIGEST_KEY)
    if digest is None:
        # A digest-like value under another key means the key's name itself was damaged.
        if any(isinstance(v, str) and v.startswith(DIGEST_PREFIX) for v in state.values()):
            raise CheckpointError(_damaged(path))
        raise CheckpointError(
            f"{path}: the checkpoint has no digest, so its content cannot be trusted (every "
            "checkpoint dltemplate writes has one): it is not loaded"
        )
    if not isinstance(digest, str) or digest != content_digest(state):
        raise CheckpointError(_damaged(path))
    return state


def _load_failure(exc: Exception) -> str:
    """Why ``torch.load`` failed, in a few words on one line (never torch's advice to load
    with ``weights_only=False``, which would let the file run code)."""
    text = str(exc)
    if "Weights only load failed" in text:
        return "it holds Python objects other than tensors and plain data, which are not loaded"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    first = first.split(". ")[0]  # torch appends paragraphs of guesses
    return first if len(first) <= 120 else first[:117] + "..."


def _damaged(path: Path) -> str:
    return (
        f"{path}: the checkpoint is damaged (its content does not match its digest); "
        "the file changed after it was written (disk or copy error): use another checkpoint"
    )


def find_checkpoint(run_dir: Path, kinds: tuple[str, ...] = ("best", "last")) -> Path:
    """The first existing ``*_<kind>_ckpt.pth`` in ``run_dir``, trying ``kinds`` in order."""
    for kind in kinds:
        found = sorted(Path(run_dir).glob(f"*_{kind}_ckpt.pth"))
        if found:
            return found[0]
    raise CheckpointError(f"{run_dir}: no checkpoint ({', '.join(kinds)}) in this directory")


def newest_checkpoint(run_dir: Path) -> Path:
    """The intact checkpoint in ``run_dir`` that got furthest: where to resume.

    See :func:`newest_intact_checkpoint`; damaged checkpoints it skips are logged as warnings.
    """
    path, skipped = newest_intact_checkpoint(run_dir)
    for bad, reason in skipped:
        log.warning("skipping damaged checkpoint %s (%s); resuming from %s", bad, reason, path)
    return path


def newest_intact_checkpoint(run_dir: Path) -> tuple[Path, list[tuple[Path, str]]]:
    """The intact checkpoint in ``run_dir`` to resume from, and the ``(path, reason)`` skipped.

    Among ``*_last_ckpt.pth`` and ``*_interrupt_ckpt.pth`` it picks the intact one with the
    most optimizer steps (``global_step``; a tie goes to the newest file). Only when none of
    them is intact does it fall back on a ``*_best_ckpt.pth`` that holds a training state
    (``global_step`` and ``optimizer``). No intact candidate is a CheckpointError naming the
    damaged files. The chosen state is kept for the next :func:`load_checkpoint` of that file,
    so it is not read twice.
    """
    global _handoff
    run_dir = Path(run_dir)
    skipped: list[tuple[Path, str]] = []
    primary = sorted(p for k in ("last", "interrupt") for p in run_dir.glob(f"*_{k}_ckpt.pth"))
    chosen = _furthest(primary, ("global_step",), skipped)
    if chosen is None:
        best = sorted(run_dir.glob("*_best_ckpt.pth"))
        chosen = _furthest(best, ("global_step", "optimizer"), skipped, quiet=True)
    if chosen is None:
        if not skipped:
            raise CheckpointError(
                f"{run_dir}: nothing to resume (no *_last_ckpt.pth or *_interrupt_ckpt.pth)"
            )
        listing = "; ".join(f"{p.name}: {reason}" for p, reason in skipped)
        raise CheckpointError(f"{run_dir}: nothing to resume, no intact checkpoint ({listing})")
    path, state, signature = chosen
    _handoff = (signature, state)
    return path, skipped


def _furthest(
    paths: list[Path],
    needed: tuple[str, ...],
    skipped: list[tuple[Path, str]],
    quiet: bool = False,
) -> tuple[Path, dict[str, Any], tuple[Any, ...]] | None:
    """The intact one of ``paths`` with the most steps; unusable ones go to ``skipped``.

    With ``quiet``, an intact file that lacks ``needed`` keys is passed over silently.
    """
    best: tuple[tuple[int, int], Path, dict[str, Any], tuple[Any, ...]] | None = None
    for path in paths:
        try:
            signature = _file_signature(path)  # before loading: a later rewrite won't match
            state = _load_and_verify(path)
        except (CheckpointError, OSError) as exc:
            skipped.append((path, _reason(path, exc)))
            continue
        missing = [k for k in needed if k not in state]
        if missing:
            if not quiet:
                skipped.append((path, f"no training state (no {', '.join(missing)})"))
            continue
        key = (int(state["global_step"]), signature[-1])
        if best is None or key > best[0]:
            best = (key, path, state, signature)  # drops the previous state: one in memory
    return None if best is None else best[1:]


def _reason(path: Path, exc: Exception) -> str:
    # the message without its leading "<path>: " or "<path> ", which the caller shows anyway
    msg = str(exc)
    for prefix in (f"{path}: ", f"{path} "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def load_model_weights(model: nn.Module, state_dict: dict[str, Any], source: str) -> None:
    """Load weights strictly; a checkpoint of another model is a CheckpointError saying how."""
    state_dict = strip_prefixes(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append("shape mismatch: " + "; ".join(wrong[:3]))
        if missing:
            parts.append("missing keys: " + ", ".join(missing[:5]))
        if unexpected:
            parts.append("unexpected keys: " + ", ".join(unexpected[:5]))
        raise CheckpointError(
            f"{source}: checkpoint does not match the configured model ({'; '.join(parts)})"
        )
    model.load_state_dict(state_dict)
