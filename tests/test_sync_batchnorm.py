"""GlooSyncBatchNorm: plain BatchNorm on one process, whole-batch BatchNorm across processes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dltemplate.engine.sync_batchnorm import GlooSyncBatchNorm, convert_sync_batchnorm

TOL = 1e-5
STEPS = 3
BATCH = 32
# Each case: (name, per-rank batch sizes, wrap in DistributedDataParallel).
CASES = [("even", (16, 16), True), ("uneven", (20, 12), False), ("empty", (32, 0), False)]


class Net(nn.Module):
    """A small conv net with two BatchNorm2d and one BatchNorm1d (cumulative-average momentum)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 6, 3, stride=2, padding=1),
            nn.BatchNorm2d(6, momentum=0.3),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(24, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 3)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def make_net() -> Net:
    torch.manual_seed(0)
    return Net()


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, 3, 8, 8, generator=g) * 2.0 + 0.5
    y = torch.randint(0, 3, (STEPS, BATCH), generator=g)
    return x, y


def bn_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Running statistics (and batch counters) of every BatchNorm, by state-dict key."""
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def reference_run() -> dict:
    """One process, plain BatchNorm, full batch of 32, STEPS SGD steps."""
    model = make_net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_data()
    outs, grads = [], []
    for step in range(STEPS):
        opt.zero_grad()
        out = model(x[step])
        F.cross_entropy(out, y[step]).backward()
        outs.append(out.detach().clone())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    return {"outs": outs, "grads": grads, "params": params, "bn": bn_state(model)}


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank: run every case on its share of the batch and save what it saw."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        x, y = make_data()
        for name, sizes, use_ddp in CASES:
            start = sum(sizes[:rank])
            local = slice(start, start + sizes[rank])
            model = convert_sync_batchnorm(make_net(), torch.device("cpu"))
            net = nn.parallel.DistributedDataParallel(model) if use_ddp else model
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            outs, grads = [], []
            for step in range(STEPS):
                opt.zero_grad()
                out = net(x[step, local])
                if use_ddp:
                    # DDP averages gradients over ranks; even shares make that the global mean.
                    F.cross_entropy(out, y[step, local]).backward()
                else:
                    # Local sum over the global count, gradients summed: the global-mean loss.
                    loss = F.cross_entropy(out, y[step, local], reduction="sum") / BATCH
                    loss.backward()
                    for p in model.parameters():
                        dist.all_reduce(p.grad)
                outs.append(out.detach().clone())
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
                opt.step()
            params = {n: p.detach().clone() for n, p in model.named_parameters()}
            result = {"outs": outs, "grads": grads, "params": params, "bn": bn_state(model)}
            torch.save(result, Path(out_dir) / f"{name}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("momentum", [0.1, None])
def test_single_process_matches_batchnorm(momentum: float | None) -> None:
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(5, momentum=momentum)
    nn.init.uniform_(ref.weight, 0.5, 1.5)
    nn.init.uniform_(ref.bias, -0.5, 0.5)
    sync = GlooSyncBatchNorm(5, momentum=momentum)
    sync.load_state_dict(ref.state_dict())
    for step in range(3):
        x = torch.randn(6, 5, 4, 3) * 3 + step
        xr, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
        upstream = torch.randn_like(x)
        out_r, out_s = ref(xr), sync(xs)
        (out_r * upstream).sum().backward()
        (out_s * upstream).sum().backward()
        torch.testing.assert_close(out_s, out_r, rtol=0, atol=0)
        torch.testing.assert_close(xs.grad, xr.grad, rtol=0, atol=0)
        torch.testing.assert_close(sync.weight.grad, ref.weight.grad, rtol=0, atol=0)
        torch.testing.assert_close(sync.bias.grad, ref.bias.grad, rtol=0, atol=0)
    assert max_diff(bn_state(sync), bn_state(ref)) == 0.0
    ref.eval()
    sync.eval()
    x = torch.randn(4, 5, 2, 2)
    torch.testing.assert_close(sync(x), ref(x), rtol=0, atol=0)


def test_accepts_any_rank_with_channels_at_dim_1() -> None:
    bn = GlooSyncBatchNorm(3)
    for shape in [(8, 3), (8, 3, 5), (4, 3, 2, 2, 2)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(bn(x), F.batch_norm(x, None, None, training=True))
    with pytest.raises(ValueError):
        bn(torch.randn(3))


def test_conversion_keeps_state_dict_and_flags() -> None:
    model = make_net()
    model.features[1].weight.requires_grad_(False)
    model.head.eval()
    with torch.no_grad():
        model(torch.randn(4, 3, 8, 8))  # Non-trivial running statistics.
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bn_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}

    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3 and all(type(m) is GlooSyncBatchNorm for m in bns)
    assert {id(m.weight) for m in bns[:2]} == bn_params
    assert converted.features[1].weight.requires_grad is False
    assert converted.features[4].weight.requires_grad is True
    assert converted.features[1].training and not converted.head[1].training
    assert converted.head[1].momentum is None and converted.features[4].momentum == 0.3

    after = converted.state_dict()
    assert list(after) == list(before)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0)
    plain = Net()
    plain.load_state_dict(after)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_cuda_conversion_uses_torch_syncbatchnorm() -> None:
    converted = convert_sync_batchnorm(make_net(), torch.device("cuda"))
    bns = [m for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 3 and all(type(m) is nn.SyncBatchNorm for m in bns)


@pytest.mark.slow  # two gloo processes (~11 s); the single-process tests above are quick
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is unavailable")
def test_two_gloo_processes_match_one_process_full_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ref = reference_run()
    for name, sizes, _ in CASES:
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt") for r in range(2)]
        for step in range(STEPS):
            assert [len(r["outs"][step]) for r in ranks] == list(sizes), name
            out = torch.cat([r["outs"][step] for r in ranks])
            assert out.shape == ref["outs"][step].shape, name
            assert (out - ref["outs"][step]).abs().max().item() <= TOL, name
            for r in ranks:
                assert max_diff(r["grads"][step], ref["grads"][step]) <= TOL, name
        for r in ranks:
            assert max_diff(r["params"], ref["params"]) <= TOL, name
            assert max_diff(r["bn"], ref["bn"]) <= TOL, name
            assert r["bn"].keys() == ref["bn"].keys()
