"""A trained model on its own: raw inputs in, what ``predict`` reports out.

:class:`InferenceModel` wraps a run's model with its task's input normalisation and output
activation, so that it takes what ``predict`` reads — float32 in [0, 1], ``(N, C, H, W)`` at the
trained size — and returns probabilities: class probabilities (softmax) for classification, mask
probabilities (sigmoid of the mean of the heads) for segmentation. ``dltemplate.load_model``
returns one; ``dltemplate export`` writes one as ONNX or TorchScript, with
:func:`inference_metadata` inside the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dltemplate.data.base import Batch, DataInfo
from dltemplate.engine.evaluator import EvaluatorBase
from dltemplate.engine.rundir import package_version
from dltemplate.engine.task import Task
from dltemplate.errors import DataError

# The keys of the metadata in an exported file (ONNX metadata_props, TorchScript _extra_files),
# each a string (lists as JSON).
METADATA_KEYS = (
    "dltemplate_version",
    "task",
    "model",
    "checkpoint",
    "epoch",
    "input_shape",
    "input",
    "output",
    "class_names",
    "mean",
    "std",
)

# The overrides that build a run's model on the CPU, whatever device it was trained on.
ON_CPU = ("experiment.device=cpu", "experiment.gpu_devices=null")

OUTPUTS = {
    "classification": "class probabilities (softmax of the logits), N x classes",
    "segmentation": "mask probabilities (sigmoid of the logits), N x 1 x H x W",
}


class InferenceModel(nn.Module):
    """``model`` between its task's :meth:`~Task.normalize_inputs` and
    :meth:`~Task.predictions`: raw float inputs in [0, 1] in, probabilities out.

    ``metadata`` (strings, see :data:`METADATA_KEYS`) says what it takes and returns;
    ``class_names`` and ``input_shape`` come from the run's data.
    """

    def __init__(
        self, model: nn.Module, task: Task, info: DataInfo, metadata: dict[str, str]
    ) -> None:
        super().__init__()
        self.model = model
        self.task, self.info = task, info
        self.metadata = dict(metadata)
        self.class_names = list(info.class_names)
        self.input_shape = tuple(int(d) for d in info.input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities for a batch of raw inputs ``(N, *input_shape)``, float in [0, 1].

        Inputs that would give wrong probabilities without an error, or fail deep inside the
        model, are a DataError saying what to pass: not a tensor (a NumPy array, a PIL image),
        uint8 pixels (0..255, not divided by 255), no batch axis or another channel count."""
        if not torch.jit.is_tracing():  # export traces a right example: nothing to check
            self.check_inputs(x)
        inputs = self.task.normalize_inputs(x, self.info)
        # The task's own forward hook: a task may feed its model otherwise than model(inputs).
        outputs = self.task.forward(self.model, Batch(inputs, inputs[:0], inputs.shape[0]))
        return self.task.predictions(outputs)

    def check_inputs(self, x: object) -> None:
        """A DataError unless ``x`` is a floating-point tensor ``(N, C, ...)`` with the run's
        channels ``C`` (the other sizes are left to the model: a UNet takes any)."""
        want = " x ".join(["N", *(str(d) for d in self.input_shape)])
        takes = f"the model takes a float32 tensor {want} in [0, 1]"
        if not isinstance(x, torch.Tensor):
            how = "torch.from_numpy(array)" if type(x).__module__ == "numpy" else "a tensor"
            raise DataError(f"{takes}; got {type(x).__name__}: pass {how}")
        got = f"got a {str(x.dtype).removeprefix('torch.')} tensor {tuple(x.shape)}"
        if not x.is_floating_point():
            raise DataError(f"{takes}; {got}: convert it (x.float() / 255 for 0..255 pixels)")
        rank = 1 + len(self.input_shape)  # a batch axis first; then channels, if any
        if x.dim() != rank or (rank > 1 and x.shape[1] != self.input_shape[0]):
            hint = " (x[None] adds the batch axis)" if tuple(x.shape) == self.input_shape else ""
            raise DataError(f"{takes}; {got}{hint}")


def inference_metadata(
    task_name: str, model_name: str, info: DataInfo, checkpoint: str | Path, epoch: int
) -> dict[str, str]:
    """What an exported file says about itself (see :data:`METADATA_KEYS`)."""
    shape = " x ".join(str(int(d)) for d in info.input_shape)
    return {
        "dltemplate_version": package_version(),
        "task": task_name,
        "model": model_name,
        "checkpoint": str(Path(checkpoint).absolute()),
        "epoch": str(int(epoch)),
        "input_shape": json.dumps([int(d) for d in info.input_shape]),
        "input": f"float32 N x {shape} in [0, 1] (normalised inside)",
        "output": OUTPUTS.get(task_name, "the task's predictions"),
        "class_names": json.dumps(list(info.class_names)),
        "mean": json.dumps([float(m) for m in info.mean]),
        "std": json.dumps([float(s) for s in info.std]),
    }


def inference_model(evaluator: EvaluatorBase) -> InferenceModel:
    """The :class:`InferenceModel` of an :class:`~dltemplate.engine.evaluator.EvaluatorBase`'s
    checkpoint, on the CPU, in eval mode, without gradients."""
    model = evaluator.model.to("cpu").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    experiment, info = evaluator.cfg.experiment, evaluator.info
    where, epoch = evaluator.checkpoint_path, evaluator.epoch
    metadata = inference_metadata(experiment.task, evaluator.cfg.model.name, info, where, epoch)
    return InferenceModel(model, evaluator.task, evaluator.info, metadata).eval()
