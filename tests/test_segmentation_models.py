"""UNet / UNet++ models, segmentation losses and metrics (small tensors, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dltemplate.losses.segmentation  # noqa: F401  (registers the losses)
import dltemplate.metrics.segmentation  # noqa: F401  (registers the metrics)
import dltemplate.models.unet  # noqa: F401  (registers the models)
from dltemplate.errors import ConfigError
from dltemplate.losses.segmentation import BCEDiceLoss, BCELoss, DiceLoss, soft_dice_loss
from dltemplate.metrics.overlap import dice_coefficient
from dltemplate.metrics.segmentation import Dice, IoU
from dltemplate.models.heads import detach_outputs, mean_over_heads, merged_prediction
from dltemplate.models.unet import UNet, UNetPlusPlus
from dltemplate.registry import LOSSES, METRICS, MODELS
from dltemplate.tools.count_params import count_parameters

# -- models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [UNet, UNetPlusPlus])
@pytest.mark.parametrize("bilinear", [True, False])
@pytest.mark.parametrize("size", [(64, 96), (37, 53)])
def test_output_has_input_size(cls, bilinear, size):
    torch.manual_seed(0)
    model = cls(input_shape=(3, *size), base_width=8, depth=3, bilinear=bilinear)
    x = torch.randn(2, 3, *size)
    for mode in (True, False):
        model.train(mode)
        assert model(x).shape == (2, 1, *size)


def test_minimum_size_and_more_classes():
    model = UNet(input_shape=(1, 8, 9), num_classes=3, base_width=4, depth=3).eval()
    assert model(torch.randn(1, 1, 8, 9)).shape == (1, 3, 8, 9)


def test_unetpp_deep_supervision_heads():
    torch.manual_seed(0)
    model = UNetPlusPlus(input_shape=(3, 37, 53), base_width=8, depth=3, deep_supervision=True)
    x = torch.randn(2, 3, 37, 53)
    model.train()
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == 3
    assert all(o.shape == (2, 1, 37, 53) for o in outs)

    model.eval()
    with torch.no_grad():
        averaged = model(x)
        heads = model.heads(x)
    assert isinstance(averaged, torch.Tensor) and averaged.shape == (2, 1, 37, 53)
    assert len(heads) == 3
    torch.testing.assert_close(averaged, torch.stack(heads).mean(0))
    # the heads differ from one another (each has its own 1x1 conv on its own node)
    assert not torch.allclose(heads[0], heads[-1])


def test_unetpp_without_deep_supervision_returns_a_tensor():
    model = UNetPlusPlus(input_shape=(3, 32, 32), base_width=8, depth=3)
    x = torch.randn(1, 3, 32, 32)
    model.train()
    assert isinstance(model(x), torch.Tensor)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.heads(x)[0])


@pytest.mark.parametrize("cls", [UNet, UNetPlusPlus])
def test_too_small_input_is_a_config_error(cls):
    with pytest.raises(ConfigError, match="depth") as info:
        cls(input_shape=(3, 5, 7), depth=4)
    assert "5x7" in str(info.value) and "16" in str(info.value)
    model = cls(input_shape=(3, 32, 32), base_width=4, depth=3)
    with pytest.raises(ConfigError, match="depth"):
        model(torch.randn(1, 3, 6, 32))


def test_registry_and_parameter_count():
    assert MODELS.get("UNet") is UNet
    assert MODELS.get("UNet++") is UNetPlusPlus
    assert MODELS.get("UNetPlusPlus") is UNetPlusPlus
    assert LOSSES.get("bce_dice") is BCEDiceLoss
    assert LOSSES.get("dice") is DiceLoss
    assert LOSSES.get("bce") is BCELoss
    assert METRICS.get("dice") is Dice
    assert METRICS.get("iou") is IoU
    model = MODELS.build("UNet", "model.name", input_shape=(3, 32, 48), base_width=8, depth=3)
    rows = count_parameters(model)
    assert rows[-1][0] == "total"
    assert rows[-1][2] == sum(p.numel() for p in model.parameters())
    assert sum(r[2] for r in rows[:-1]) == rows[-1][2]


# -- losses ---------------------------------------------------------------------------------


def _np_dice_loss(logits: np.ndarray, targets: np.ndarray, smooth: float) -> float:
    p = 1 / (1 + np.exp(-logits.astype(np.float64)))
    t = targets.astype(np.float64)
    axes = tuple(range(1, p.ndim))
    dice = (2 * (p * t).sum(axes) + smooth) / (p.sum(axes) + t.sum(axes) + smooth)
    return float(1 - dice.mean())


def _random_batch(seed: int = 0, shape=(4, 1, 12, 10)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=g) * 3
    targets = (torch.rand(shape, generator=g) > 0.6).to(torch.uint8)
    return logits, targets


@pytest.mark.parametrize("smooth", [1.0, 0.01])
def test_soft_dice_matches_numpy(smooth):
    logits, targets = _random_batch()
    got = soft_dice_loss(logits, targets, smooth)
    want = _np_dice_loss(logits.numpy(), targets.numpy(), smooth)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(want, rel=1e-5)
    assert float(DiceLoss(smooth)(logits, targets.bool())) == pytest.approx(want, rel=1e-5)
    assert float(DiceLoss(smooth)(logits, targets.float())) == pytest.approx(want, rel=1e-5)


def test_bce_matches_torch():
    logits, targets = _random_batch(1)
    want = F.binary_cross_entropy_with_logits(logits, targets.float())
    torch.testing.assert_close(BCELoss()(logits, targets), want)
    want_w = F.binary_cross_entropy_with_logits(
        logits, targets.float(), pos_weight=torch.tensor(3.0)
    )
    torch.testing.assert_close(BCELoss(pos_weight=3.0)(logits, targets), want_w)
    # (N, H, W) masks are taken as (N, 1, H, W)
    torch.testing.assert_close(BCELoss()(logits, targets[:, 0]), want)


def test_bce_dice_weighting():
    logits, targets = _random_batch(2)
    bce = F.binary_cross_entropy_with_logits(logits, targets.float())
    dice = soft_dice_loss(logits, targets)
    for w in (0.0, 0.3, 0.5, 1.0):
        torch.testing.assert_close(
            BCEDiceLoss(bce_weight=w)(logits, targets), w * bce + (1 - w) * dice
        )
    with pytest.raises(ConfigError, match="bce_weight"):
        BCEDiceLoss(bce_weight=1.5)
    with pytest.raises(ConfigError, match="smooth"):
        DiceLoss(smooth=0)


@pytest.mark.parametrize("loss_fn", [DiceLoss(), BCELoss(), BCEDiceLoss()])
@pytest.mark.parametrize("fill", [-50.0, 0.0, 50.0])
def test_empty_masks_give_finite_loss_and_gradients(loss_fn, fill):
    logits = torch.full((2, 1, 8, 8), fill, requires_grad=True)
    targets = torch.zeros(2, 1, 8, 8, dtype=torch.uint8)
    loss = loss_fn(logits, targets)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("loss_fn", [DiceLoss(), BCELoss(), BCEDiceLoss(0.3)])
def test_list_of_heads_is_mean_of_losses(loss_fn):
    heads = [_random_batch(s)[0] for s in range(3)]
    targets = _random_batch(9)[1]
    want = sum(loss_fn(h, targets) for h in heads) / 3
    torch.testing.assert_close(loss_fn(heads, targets), want)
    torch.testing.assert_close(loss_fn(tuple(heads), targets), want)


def test_perfect_prediction_has_near_zero_dice_loss():
    _, targets = _random_batch(3)
    logits = (targets.float() * 2 - 1) * 30
    assert float(DiceLoss()(logits, targets)) < 1e-4
    assert float(BCEDiceLoss()(logits, targets)) < 1e-4


# -- metrics --------------------------------------------------------------------------------


def _np_scores(pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = pred.reshape(len(pred), -1).astype(bool)
    t = true.reshape(len(true), -1).astype(bool)
    inter = (p & t).sum(1)
    union = (p | t).sum(1)
    total = p.sum(1) + t.sum(1)
    dice = np.where(total > 0, 2 * inter / np.maximum(total, 1), 1.0)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return dice, iou


def _metric_data():
    rng = np.random.default_rng(0)
    pred = rng.random((11, 1, 9, 7)) > 0.5
    true = rng.random((11, 1, 9, 7)) > 0.4
    pred[3] = False  # both empty: scores 1
    true[3] = False
    pred[5] = False  # empty prediction, non-empty mask: scores 0
    true[5, 0, 2:4, 2:5] = True
    logits = torch.from_numpy(np.where(pred, 2.0, -2.0)).float()
    logits += torch.from_numpy(rng.random(pred.shape) * 0.5).float() * torch.sign(logits)
    return pred, true, logits, torch.from_numpy(true.astype(np.uint8))


def test_dice_and_iou_match_numpy_over_uneven_batches():
    pred, true, logits, targets = _metric_data()
    dice_np, iou_np = _np_scores(pred, true)
    assert dice_np[3] == 1.0 and iou_np[3] == 1.0
    assert dice_np[5] == 0.0 and iou_np[5] == 0.0
    dice, iou = Dice(), IoU()
    for a, b in ((0, 4), (4, 5), (5, 11)):
        dice.update(logits[a:b], targets[a:b])
        iou.update(logits[a:b], targets[a:b])
    assert dice.compute() == {"dice": pytest.approx(dice_np.mean())}
    assert iou.compute() == {"iou": pytest.approx(iou_np.mean())}
    assert dice.state()[0].dtype == torch.float64 and float(dice.state()[1]) == 11
    dice.reset()
    assert dice.compute() == {"dice": 0.0}


def test_metric_threshold_and_list_of_heads():
    pred, true, logits, targets = _metric_data()
    dice = Dice(threshold=1.0)
    dice.update(logits, targets)
    want, _ = _np_scores(logits.numpy() > 1.0, true)
    assert dice.compute()["dice"] == pytest.approx(want.mean())

    heads = [logits + 1.0, logits - 1.0, logits]  # averages back to logits
    dice = Dice()
    dice.update(heads, targets)
    assert dice.compute()["dice"] == pytest.approx(_np_scores(pred, true)[0].mean())


def _np_dice(p: np.ndarray, t: np.ndarray, smooth: float) -> np.ndarray:
    p, t = p.reshape(len(p), -1).astype(np.float64), t.reshape(len(t), -1).astype(np.float64)
    num, den = 2 * (p * t).sum(1) + smooth, p.sum(1) + t.sum(1) + smooth
    return np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)


@pytest.mark.parametrize("smooth", [0.0, 0.5, 1.0])
def test_one_dice_formula_matches_numpy_hard_and_soft(smooth):
    pred, true, logits, _ = _metric_data()  # image 3: both empty; image 5: prediction empty
    hard = dice_coefficient(
        torch.from_numpy(pred), torch.from_numpy(true), smooth, dtype=torch.float64
    )
    want = _np_dice(pred, true, smooth)
    np.testing.assert_allclose(hard.numpy(), want, rtol=1e-12)
    assert hard[3] == 1.0 and (smooth > 0 or hard[5] == 0.0)
    probs = torch.sigmoid(logits.double())
    soft = dice_coefficient(probs, torch.from_numpy(true).double(), smooth)
    np.testing.assert_allclose(soft.numpy(), _np_dice(probs.numpy(), true, smooth), rtol=1e-12)
    # Both empty and no smooth: the score is ``empty``, and the gradient stays finite.
    zeros = torch.zeros(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    empty = dice_coefficient(zeros, torch.zeros(2, 1, 4, 4), empty=0.25)
    empty.sum().backward()
    assert empty.tolist() == [0.25, 0.25] and torch.isfinite(zeros.grad).all()


def test_the_dice_loss_metric_and_report_share_the_formula():
    pred, true, logits, targets = _metric_data()
    metric = Dice()
    metric.update(logits, targets)
    assert metric.compute()["dice"] == pytest.approx(float(_np_dice(pred, true, 0.0).mean()))
    p = torch.sigmoid(logits).numpy()
    want = 1 - _np_dice(p, true, 1.0).mean()
    assert float(soft_dice_loss(logits, targets)) == pytest.approx(want, rel=1e-6)


def test_heads_helpers():
    a, b = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 5.0])
    assert merged_prediction(a) is a
    assert merged_prediction([a, b]).tolist() == [2.0, 4.0]
    assert float(mean_over_heads((a, b), lambda o: o.sum())) == 6.0
    assert float(mean_over_heads(a, lambda o: o.sum())) == 4.0
    with pytest.raises(ValueError, match="empty"):
        mean_over_heads([], lambda o: o.sum())
    grad = a.clone().requires_grad_()
    detached = detach_outputs((grad * 2, b))
    assert isinstance(detached, tuple) and not detached[0].requires_grad
    assert not detach_outputs(grad * 2).requires_grad


@pytest.mark.parametrize("cls", [Dice, IoU])
def test_summed_states_equal_one_metric(cls):
    _, _, logits, targets = _metric_data()
    whole, first, second = cls(), cls(), cls()
    whole.update(logits, targets)
    first.update(logits[:6], targets[:6])
    second.update(logits[6:], targets[6:])
    for mine, other in zip(first.state(), second.state()):
        mine += other  # what an all-reduce (sum) does in place
    assert first.compute() == pytest.approx(whole.compute())


# -- a tiny training run ----------------------------------------------------------------------


def test_unet_learns_bright_squares():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n, size = 8, 32
    images = torch.rand(n, 3, size, size, generator=g) * 0.3
    masks = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    for i in range(n):
        top, left = torch.randint(0, size - 12, (2,), generator=g).tolist()
        side = int(torch.randint(8, 13, (1,), generator=g))
        images[i, :, top : top + side, left : left + side] += 0.7
        masks[i, 0, top : top + side, left : left + side] = 1

    model = UNet(input_shape=(3, size, size), base_width=8, depth=2)
    criterion = BCEDiceLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(60):
        opt.zero_grad()
        loss = criterion(model(images), masks)
        loss.backward()
        opt.step()

    model.eval()
    metric = Dice()
    with torch.no_grad():
        metric.update(model(images), masks)
    assert metric.compute()["dice"] > 0.8
