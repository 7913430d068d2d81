"""``dltemplate export``: a run's model as one ONNX or TorchScript file, checked after export.

The file holds :class:`~dltemplate.engine.inference.InferenceModel` — what
``dltemplate.load_model`` returns: raw float32 inputs in [0, 1], ``(N, C, H, W)`` at the trained
size with N free, the dataset's normalisation inside, probabilities out — and its metadata
(:data:`~dltemplate.engine.inference.METADATA_KEYS`: ONNX ``metadata_props``, TorchScript
``_extra_files``). Before the file is written, the exported model is run (onnxruntime,
``torch.jit.load``) on a few samples of the run's test split, in a batch of another size than
the one it was traced with, and compared with PyTorch: a difference above the tolerance writes
nothing and is an :class:`ExportError` (exit status 1).
"""

from __future__ import annotations

import importlib
import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dltemplate.assemble import build_evaluator
from dltemplate.atomic import atomic_write, refuse_path_under_a_file
from dltemplate.data.loader import IndexLoader
from dltemplate.engine.build import read_options
from dltemplate.engine.checkpoint import refuse_overwriting
from dltemplate.engine.evaluator import EvaluatorBase
from dltemplate.engine.inference import METADATA_KEYS, ON_CPU, InferenceModel, inference_model
from dltemplate.errors import UsageError

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
TOLERANCE = {"onnx": 1e-4, "torchscript": 1e-5}  # the largest |difference| to PyTorch allowed
TRACE_BATCH = 2  # the batch size the module is traced with
CHECK_BATCH = 5  # the batch size it is checked with: neither 1 nor TRACE_BATCH
ONNX_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "input", "probabilities"
ONNX_PACKAGES = ("onnx", "onnxruntime")


class ExportError(RuntimeError):
    """The model could not be converted, or the converted model's outputs differ from
    PyTorch's by more than the tolerance (exit status 1, one line): nothing was written."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how well the file agrees with PyTorch."""

    path: Path
    format: str
    checkpoint: Path
    max_difference: float  # the largest |exported - PyTorch| over the check batch
    tolerance: float
    checked_on: str  # e.g. "5 test samples", "5 random inputs"
    metadata: dict[str, str] = field(default_factory=dict)
    note: str | None = None  # why the check used random inputs, if it did


def require_onnx() -> None:
    """A UsageError saying what to install when onnx or onnxruntime cannot be imported."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UsageError(
            f"--format onnx needs {' and '.join(missing)}: pip install 'dltemplate[export]' "
            f"(or pip install {' '.join(ONNX_PACKAGES)}); --format torchscript needs nothing more"
        )


def export_model(
    target: str | Path,
    format: str = "onnx",
    out: str | Path | None = None,
    overrides: Sequence[str] | None = None,
    *,
    trust_code: bool = False,
) -> ExportResult:
    """Export a run directory's best (else last) checkpoint, or a checkpoint file, as
    ``format`` (``onnx`` or ``torchscript``) to ``out`` (default: beside the checkpoint,
    ``<checkpoint stem>.onnx`` / ``.pt``), after checking the file against PyTorch.

    ``overrides`` may change what does not change the model (``data.root``). Bad input (not a
    checkpoint, ``out`` a folder, onnx missing) is a UsageError; a model that cannot be
    converted, or whose file disagrees with PyTorch, an :class:`ExportError`: nothing is
    written then.
    """
    if format not in FORMATS:
        raise UsageError(f"format={format!r}: must be one of {', '.join(FORMATS)}")
    if out is not None and Path(out).is_dir():
        raise UsageError(f"--out {out}: is a folder; give the file to write")
    if format == "onnx":
        require_onnx()  # before the checkpoint is read: say what is missing at once
    evaluator = build_evaluator(target, [*ON_CPU, *(overrides or [])], trust_code)
    module = inference_model(evaluator)
    path = Path(out) if out is not None else evaluator.checkpoint_path.with_suffix(FORMATS[format])
    refuse_path_under_a_file(path, "--out")
    refuse_overwriting(path, evaluator.checkpoint_path)
    example = torch.rand(
        (TRACE_BATCH, *module.input_shape), generator=torch.Generator().manual_seed(0)
    )
    try:
        data = to_onnx(module, example) if format == "onnx" else to_torchscript(module, example)
    except Exception as exc:  # an operation the format lacks, a model tracing cannot follow
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        said = lines[0] if len(lines[0]) <= 300 else lines[0][:297] + "..."  # never in full
        name = module.metadata["model"]
        raise ExportError(f"cannot export model {name} as {format}: {said}") from exc
    inputs, checked_on, note = check_inputs(evaluator, CHECK_BATCH)
    run = run_onnx if format == "onnx" else run_torchscript
    with torch.no_grad():
        expected = module(inputs).numpy()
    got = run(data, inputs)
    tolerance = TOLERANCE[format]
    if got.shape != expected.shape:
        raise ExportError(
            f"the exported {format} model returns shape {got.shape} for {checked_on}, PyTorch "
            f"{expected.shape}: nothing written to {path}"
        )
    diff = float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64))))
    if not diff <= tolerance:  # NaN fails too
        raise ExportError(
            f"the exported {format} model differs from PyTorch by up to {diff:.3g} on "
            f"{checked_on} (tolerance {tolerance:g}): nothing written to {path}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: fh.write(data))
    return ExportResult(
        path=path,
        format=format,
        checkpoint=evaluator.checkpoint_path,
        max_difference=diff,
        tolerance=tolerance,
        checked_on=checked_on,
        metadata=dict(module.metadata),
        note=note,
    )


# == writing =====================================================================================
def to_onnx(module: InferenceModel, example: torch.Tensor) -> bytes:
    """``module`` as an ONNX model (batch axis free) with its metadata, serialised."""
    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice and tracer notes
        # The TorchScript-based exporter (dynamo=False): it needs no onnxscript, frees the batch
        # axis with dynamic_axes, and takes a second where the dynamo one takes many.
        torch.onnx.export(
            module,
            (example,),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=ONNX_OPSET,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.helper.set_model_props(proto, module.metadata)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def to_torchscript(module: InferenceModel, example: torch.Tensor) -> bytes:
    """``module`` traced to TorchScript, with its metadata as extra files, serialised."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        # torch.jit's deprecation notice (torch 2.13 still reads and writes TorchScript) and
        # the tracer's notes on shapes read as Python numbers
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
        torch.jit.save(traced, buffer, _extra_files=dict(module.metadata))
    return buffer.getvalue()


def load_torchscript(
    source: str | Path | io.BytesIO, extra: dict[str, str] | None = None
) -> torch.jit.ScriptModule:
    """A TorchScript file (or buffer) loaded on the CPU; ``extra`` is filled with the extra
    files it names."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's deprecation notice
        return torch.jit.load(source, map_location="cpu", _extra_files=extra)


# == checking ====================================================================================
def run_onnx(data: bytes, inputs: torch.Tensor) -> np.ndarray:
    """The outputs of the serialised ONNX model ``data`` on ``inputs``, by onnxruntime."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    return session.run(None, {INPUT_NAME: inputs.numpy()})[0]


def run_torchscript(data: bytes, inputs: torch.Tensor) -> np.ndarray:
    """The outputs of the serialised TorchScript module ``data`` on ``inputs``."""
    loaded = load_torchscript(io.BytesIO(data))
    with torch.no_grad():
        return loaded(inputs).numpy()


def check_inputs(evaluator: EvaluatorBase, count: int) -> tuple[torch.Tensor, str, str | None]:
    """``count`` raw inputs (float32 in [0, 1]) from the run's test split, what they are, and,
    when the data cannot be loaded, why random inputs in [0, 1] stand in (topped up with random
    ones when the split is smaller)."""
    shape = tuple(int(d) for d in evaluator.info.input_shape)
    generator = torch.Generator().manual_seed(1)
    try:
        samples = first_test_samples(evaluator, count)
    except (UsageError, OSError) as exc:
        note = f"the run's data cannot be loaded ({exc}): checked on random inputs in [0, 1]"
        return torch.rand((count, *shape), generator=generator), f"{count} random inputs", note
    taken = len(samples)
    if taken < count:
        extra = torch.rand((count - taken, *shape), generator=generator)
        samples = torch.cat([samples, extra])
        return samples, f"{taken} test samples and {count - taken} random inputs", None
    return samples, f"{count} test samples", None


def first_test_samples(evaluator: EvaluatorBase, count: int) -> torch.Tensor:
    """Up to ``count`` samples of the run's test split, read as ``eval`` reads them, as raw
    float32 inputs: uint8 data divided by 255, other data as it is."""
    cfg = evaluator.cfg
    split = evaluator._same_groups_as_the_run(evaluator.task.load_data(), "test")
    if len(split) == 0:
        return torch.empty((0, *evaluator.info.input_shape))
    loader = IndexLoader(
        split,
        count,
        training=False,
        seed=cfg.experiment.seed,
        limit_batches=1,
        read=read_options(cfg, training=False),
    )
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    x = batch.inputs
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


def read_metadata(path: str | Path) -> dict[str, str]:
    """The dltemplate metadata of an exported file (``.onnx``: ONNX, else TorchScript)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        return {
            p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props
        }
    extra = dict.fromkeys(METADATA_KEYS, "")
    load_torchscript(str(path), extra)
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()}
