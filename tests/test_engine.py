import pytest
import torch
from torch import nn

from sarvit.config import ConfigError
from sarvit.distributed import Dist
from sarvit.engine import LoopState, SupervisedStep, TrainForward, autocast, resolve_amp, train_one_epoch

CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)  # a device object only: nothing runs on it


@pytest.mark.parametrize("amp,want", [("auto", "none"), ("none", "none"), ("bf16", "bf16"), ("fp16", "fp16")])
def test_resolve_amp_on_the_cpu(amp, want):
    assert resolve_amp(amp, CPU) == want


@pytest.mark.parametrize("bf16_supported,want", [(True, "bf16"), (False, "fp16")])
def test_resolve_amp_auto_on_cuda(monkeypatch, bf16_supported, want):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    assert resolve_amp("auto", CUDA) == want
    assert resolve_amp("none", CUDA) == "none"  # an explicit choice is kept


@pytest.mark.parametrize("amp", ["fp32", "float16", "BF16", ""])
def test_unknown_amp_is_refused_not_read_as_fp16(amp):
    with pytest.raises(ConfigError, match="amp must be one of"):
        resolve_amp(amp, CPU)
    with pytest.raises(ConfigError, match="amp must be one of"):
        autocast(CPU, amp)


@pytest.mark.parametrize("amp,dtype", [("none", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_context_dtype(amp, dtype):
    a, b = torch.ones(4, 4), torch.ones(4, 4)
    with autocast(CPU, amp):
        assert torch.is_autocast_enabled("cpu") == (amp != "none")
        out = a @ b
    assert out.dtype == dtype
    assert not torch.is_autocast_enabled("cpu")  # left as it was found


class FakeObjective(nn.Module):
    """``mse(logits, y) + lam * ||W||^2`` with the lambdas it was given."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = weight
        self.lams = []

    def forward(self, logits, y, S, lam):
        assert S is None
        self.lams.append(lam)
        mse = ((logits - y) ** 2).mean()
        return {"loss": mse + lam * (self.weight ** 2).sum(), "ce": mse}


class FakeScheduler:
    def __init__(self) -> None:
        self.updates = []

    def step_update(self, num_updates: int) -> None:
        self.updates.append(num_updates)


def hand_sgd(w, b, batches, lr, lams, clip, ema_decay, steps_before):
    """Plain gradient steps by hand: the same loss, gradients clipped by their global norm, and an EMA
    that starts from the initial weights, is a copy after the very first step of training and then
    averages (timm's ``ModelEmaV3`` counting: the first update is step 1)."""
    ema = (w.clone(), b.clone())
    losses, mses = [], []
    for n, ((x, y), lam) in enumerate(zip(batches, lams, strict=True), start=steps_before + 1):
        wv, bv = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
        mse = ((x @ wv.T + bv - y) ** 2).mean()
        loss = mse + lam * (wv ** 2).sum()
        gw, gb = torch.autograd.grad(loss, [wv, bv])
        if clip is not None:
            norm = torch.sqrt((gw ** 2).sum() + (gb ** 2).sum()).item()
            scale = min(1.0, clip / (norm + 1e-6))
            gw, gb = gw * scale, gb * scale
        w, b = w - lr * gw, b - lr * gb
        decay = 0.0 if n == 1 else ema_decay
        ema = tuple(decay * e + (1 - decay) * v for e, v in zip(ema, (w, b), strict=True))
        losses.append(loss.item())
        mses.append(mse.item())
    return w, b, ema, losses, mses


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("start", [(0, 0, 0), (2, 1, 5)])  # (epoch, step in epoch, global step): new, resumed
def test_train_one_epoch_equals_a_hand_written_sgd_loop(clip, start):
    from timm.utils import ModelEmaV3

    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    w0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)) for _ in range(3)]
    lr, decay = 0.1, 0.5
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    objective = FakeObjective(model.weight)
    scheduler = FakeScheduler()
    ema = ModelEmaV3(model, decay=decay)
    epoch, step_in_epoch, global_step = start
    steps_per_epoch = step_in_epoch + len(batches)
    state = LoopState(epoch=epoch, step_in_epoch=step_in_epoch, global_step=global_step)
    hooks = []
    out = train_one_epoch(
        net=TrainForward(model), optimizer=optimizer, scheduler=scheduler, loader=batches,
        step=SupervisedStep(objective, lambda e: 0.2 * e, CPU, ema=ema, model=model),
        state=state, steps_per_epoch=steps_per_epoch, dist=Dist(0, 1, 0, CPU), clip_grad=clip, log_interval=1,
        on_step=lambda: hooks.append(state.global_step),
    )
    # lambda at the fractional epoch: epoch + steps already taken in it / steps per epoch
    lams = [0.2 * (epoch + (step_in_epoch + i) / steps_per_epoch) for i in range(3)]
    w, b, ema_ref, losses, mses = hand_sgd(w0, b0, batches, lr, lams, clip, decay, global_step)
    assert objective.lams == pytest.approx(lams, rel=1e-15)
    torch.testing.assert_close(model.weight.detach(), w, rtol=0, atol=1e-12)
    torch.testing.assert_close(model.bias.detach(), b, rtol=0, atol=1e-12)
    assert not torch.allclose(w, w0)  # the steps did move the weights
    torch.testing.assert_close(ema.module.weight, ema_ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(ema.module.bias, ema_ref[1], rtol=0, atol=1e-12)
    assert out["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-6)  # summed in float32
    assert out["train_ce"] == pytest.approx(sum(mses) / 3, rel=1e-6)
    assert out["lambda"] == pytest.approx(lams[-1]) and out["lr"] == lr
    assert (state.epoch, state.step_in_epoch, state.global_step) == (epoch, steps_per_epoch, global_step + 3)
    done = [global_step + 1, global_step + 2, global_step + 3]
    assert scheduler.updates == done and hooks == done


def _drloc_rank(rank: int, world: int, port: int, folder: str) -> None:
    """One DDP process: the DRLoc objective's gradients with and without DistributedDataParallel."""
    import copy
    import os

    import torch.distributed as torch_dist

    import sarvit
    from sarvit.objectives import classification_loss, build_objective

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = sarvit.create_model("vit_tiny_patch16_224", 4, img_size=16, layout="A",
                                model_kwargs=dict(patch_size=4, embed_dim=24, depth=2, num_heads=2))
    objective = build_objective("drloc", classification_loss(False, 0.0), dim=24, drloc_pairs=8)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(10 + rank))  # each rank its own data
    y = torch.tensor([rank, 3 - rank])

    def grads(net, obj):
        torch.manual_seed(100 + rank)  # the same pairs with and without DDP
        logits, outputs = net(x, obj.needs)
        obj(logits, y, outputs, lam=0.5)["loss"].backward()
        return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    local_net = TrainForward(copy.deepcopy(model), None)
    local_obj = copy.deepcopy(objective)
    local_net.inner = local_obj.inner
    local = grads(local_net, local_obj)
    ddp = torch.nn.parallel.DistributedDataParallel(TrainForward(model, objective.inner))
    reduced = {n.removeprefix("module."): g for n, g in grads(ddp, objective).items()}
    torch.save({"local": local, "reduced": reduced}, f"{folder}/rank{rank}.pt")
    torch_dist.destroy_process_group()


@pytest.mark.slow
def test_drloc_mlp_gradients_are_averaged_over_ddp_processes(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_drloc_rank, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    head = [n for n in ranks[0]["local"] if n.startswith("inner.")]
    assert len(head) == 6  # the MLP's 3 weights and 3 biases reach DDP through TrainForward
    for name in head + ["model.blocks.0.attn.qkv.weight", "model.head.weight"]:
        mean = (ranks[0]["local"][name] + ranks[1]["local"][name]) / 2
        assert not torch.allclose(ranks[0]["local"][name], ranks[1]["local"][name])  # the ranks did differ
        for r in range(2):
            torch.testing.assert_close(ranks[r]["reduced"][name], mean, rtol=1e-5, atol=1e-7, msg=name)


def test_evaluate_per_head_means_match_a_loop_over_images():
    from sarvit.engine import evaluate
    from sarvit.entropy import spatial_entropy
    from sarvit.factory import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", 3, img_size=16, drop_path=0.0,
                         model_kwargs={"patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2}).eval()
    x, y = torch.randn(10, 3, 16, 16), torch.randint(0, 3, (10,))
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    dist = Dist(rank=0, world=1, local_rank=0, device=torch.device("cpu"))
    out = evaluate(model, loader, dist, per_head=True)
    entropies, counts = [], []
    with torch.no_grad():
        for i in range(10):  # one image at a time
            _, S = model.forward_with_similarity(x[i:i + 1])
            H, n = spatial_entropy(S, return_num_components=True)  # (1, heads)
            entropies.append(H[0])
            counts.append(n[0].double())
    assert out["se_heads"] == pytest.approx(torch.stack(entropies).mean(0).tolist(), rel=1e-5)
    assert out["components_heads"] == pytest.approx(torch.stack(counts).mean(0).tolist(), rel=1e-12)
    assert sum(out["se_heads"]) / 2 == pytest.approx(out["se"], rel=1e-6)
    assert "se_heads" not in evaluate(model, loader, dist)
