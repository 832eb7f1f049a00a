import pytest
import torch
from torch import nn

from sarvit.config import ConfigError
from sarvit.distributed import Dist
from sarvit.engine import LoopState, TrainForward, autocast, resolve_amp, train_one_epoch

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
        net=TrainForward(model), optimizer=optimizer, scheduler=scheduler, loader=batches, objective=objective,
        state=state, steps_per_epoch=steps_per_epoch, dist=Dist(0, 1, 0, CPU), amp="none", use_se=False,
        lambda_fn=lambda e: 0.2 * e, ema=ema, clip_grad=clip, log_interval=1,
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
