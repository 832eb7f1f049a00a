"""What every SAR surgery family must satisfy, checked on any tiny model of the family.

``check_contract(make_model, x, num_classes)`` takes a factory of fresh, plain (not
attached) models and an input, and checks what does not depend on the family:

- layout A (``"standard"``) keeps the model's function: ``forward_with_similarity(x)[0]``
  and ``model(x)`` equal the plain model's ``model(x)`` with the same weights;
- layout C (Eq. 10-11, the default): the logits of ``forward_with_similarity`` equal
  ``model(x)``; ``S`` is float32 ``(B, heads, h, w)`` on the grid of the patch tokens that
  ``tokens=True`` returns (``(B, h, w, C)``); ``similarity=None`` gives ``S=None`` and the
  same logits; the rewired block changes the function;
- every trainable parameter gets a non-zero gradient through ``CE + 0.1 * SE(S)``; the
  parameters attach froze (LN2, LayerScale on the dropped skip) get none, live in the last
  block, and do not change the logits or ``S`` when perturbed;
- state dicts load strictly both ways between plain and attached models (same keys, same
  order), with equal outputs;
- ``detach`` gives back the plain model's modules and forward, with the current weights;
- optionally, ``torch.compile`` of the attached model and of ``forward_with_similarity`` gives
  the same result (:func:`check_compile`).

Families test the numbers only they can (``S`` and the rewired block written out from
the block's own weights) in their own modules.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

import sarvit

__all__ = ["check_contract", "check_compile"]

TOL = dict(rtol=1e-5, atol=1e-5)


def check_contract(
    make_model: Callable[[], nn.Module],
    x: torch.Tensor,
    num_classes: int,
    *,
    compile: bool = False,
    grid: tuple[int, int] | None = None,
    heads: int | None = None,
    frozen: Iterable[str] | None = None,
    token_grid: tuple[int, int] | None = None,
    no_gradient: Iterable[str] | None = None,
) -> None:
    """Run every generic check on the family of ``make_model()``.

    Args:
        make_model: returns a fresh, plain, tiny model (a few thousand parameters) with
            ``num_classes`` outputs and no dropout.
        x: ``(B, 3, H, W)`` input, ``B >= 2``.
        num_classes: the model's number of classes.
        compile: also run :func:`check_compile` (slow).
        grid: the ``(h, w)`` key grid the family should report for ``x``, when known.
        heads: the number of heads of the last block, when known.
        frozen: the exact names of the parameters layout C must freeze, when known.
        token_grid: the ``(h, w)`` grid of the tokens leaving the last block, when the keys lie on
            a coarser one (CvT's stride-2 keys, PVT v2's reduced keys); default: the key grid.
        no_gradient: trainable parameters that get an exactly zero gradient in the plain model
            too (CvT's patch-query projection of the last block when the class token is the query).
    """
    plain = _perturbed(make_model().eval())
    _check_standard_layout_keeps_the_function(plain, x)
    _check_sar_outputs(plain, x, num_classes, grid, heads, token_grid)
    _check_state_dicts(make_model, plain, x)
    _check_gradients_and_frozen(plain, x, num_classes, frozen, set(no_gradient or ()))
    _check_detach(make_model, plain, x)
    if compile:
        check_compile(make_model, x)


def _perturbed(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every parameter off its initial value (LayerNorm ones and zeros, zero biases),
    so that a wrong wiring cannot hide behind an identity-like initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _attached(plain: nn.Module, layout: str = "sar") -> nn.Module:
    return sarvit.attach(copy.deepcopy(plain), layout=layout).eval()


def _check_standard_layout_keeps_the_function(plain: nn.Module, x: torch.Tensor) -> None:
    want = plain(x)
    model = _attached(plain, "standard")
    torch.testing.assert_close(model(x), want, **TOL, msg="layout A must keep model(x)")
    torch.testing.assert_close(model.forward_with_similarity(x)[0], want, **TOL,
                               msg="layout A: forward_with_similarity's logits must equal the plain model(x)")


def _check_sar_outputs(plain: nn.Module, x: torch.Tensor, num_classes: int, grid, heads, token_grid) -> None:
    model = _attached(plain)
    assert sarvit.is_attached(model)
    logits, S = model.forward_with_similarity(x)
    B = x.shape[0]
    assert logits.shape == (B, num_classes), logits.shape
    torch.testing.assert_close(logits, model(x), **TOL, msg="forward_with_similarity's logits must equal model(x)")
    assert not torch.allclose(logits, plain(x), atol=1e-4), "layout C must change the last block's function"
    assert S.dtype == torch.float32 and S.dim() == 4 and S.shape[0] == B, (S.dtype, S.shape)
    assert torch.isfinite(S).all()
    if heads is not None:
        assert S.shape[1] == heads, (S.shape, heads)
    if grid is not None:
        assert tuple(S.shape[2:]) == tuple(grid), (S.shape, grid)
    logits_t, S_t, tokens = model.forward_with_similarity(x, tokens=True)
    expected = tuple(token_grid) if token_grid is not None else tuple(S.shape[2:])
    assert tokens.dim() == 4 and tokens.shape[:3] == (B, *expected), (tokens.shape, S.shape, token_grid)
    torch.testing.assert_close(logits_t, logits, **TOL)
    torch.testing.assert_close(S_t, S, **TOL)
    logits_n, S_n = model.forward_with_similarity(x, similarity=None)
    assert S_n is None
    torch.testing.assert_close(logits_n, logits, **TOL, msg="similarity=None must not change the logits")
    for kind in ("softmax", "cosine"):
        logits_k, S_k = model.forward_with_similarity(x, kind)
        torch.testing.assert_close(logits_k, logits, **TOL)
        assert S_k.shape == S.shape and S_k.dtype == torch.float32
    _, S_soft = model.forward_with_similarity(x, "softmax")
    torch.testing.assert_close(S_soft, torch.softmax(S.flatten(2), -1).reshape(S.shape), **TOL,
                               msg="'softmax' must be the softmax of the 'dot' map over the key grid")


def _check_state_dicts(make_model, plain: nn.Module, x: torch.Tensor) -> None:
    model = _attached(plain)
    sd_attached, sd_plain = model.state_dict(), plain.state_dict()
    assert list(sd_attached) == list(sd_plain), "attach must keep the family's parameter names and order"
    fresh_plain = make_model().eval()
    fresh_plain.load_state_dict(sd_attached, strict=True)
    torch.testing.assert_close(fresh_plain(x), plain(x), **TOL, msg="attached weights -> plain model")
    fresh_attached = sarvit.attach(_perturbed(make_model(), seed=1)).eval()
    fresh_attached.load_state_dict(sd_plain, strict=True)
    torch.testing.assert_close(fresh_attached(x), model(x), **TOL, msg="plain weights -> attached model")
    torch.testing.assert_close(fresh_attached.forward_with_similarity(x)[1], model.forward_with_similarity(x)[1],
                               **TOL)


def _check_gradients_and_frozen(plain: nn.Module, x: torch.Tensor, num_classes: int, frozen,
                                no_gradient: set[str]) -> None:
    model = _attached(plain).train()
    y = torch.arange(x.shape[0]) % num_classes
    logits, S = model.forward_with_similarity(x)
    loss = F.cross_entropy(logits, y) + 0.1 * sarvit.SpatialEntropyLoss()(S)
    loss.backward()
    names = {n for n, _ in plain.named_parameters()}
    frozen_now = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable_before = {n for n, p in plain.named_parameters() if p.requires_grad}
    assert no_gradient <= names, sorted(no_gradient - names)
    for name, p in model.named_parameters():
        if p.requires_grad and name in no_gradient:
            assert p.grad is None or p.grad.abs().sum() == 0, f"{name} was expected to get no gradient"
        elif p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"
        else:
            assert p.grad is None, f"frozen {name} got a gradient"
    assert frozen_now, "layout C drops LN2: its parameters must be frozen"
    assert frozen_now <= names and frozen_now <= trainable_before
    if frozen is not None:
        assert frozen_now == set(frozen), sorted(frozen_now ^ set(frozen))
    last = _last_block_prefix(model)
    assert all(n.startswith(last) for n in frozen_now), (last, sorted(frozen_now))
    _check_frozen_do_not_matter(model.eval(), x, frozen_now)


def _check_frozen_do_not_matter(model: nn.Module, x: torch.Tensor, frozen: set[str]) -> None:
    logits, S = model.forward_with_similarity(x)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in frozen:
            params[name].add_(1.0)
    logits_p, S_p = model.forward_with_similarity(x)
    torch.testing.assert_close(logits_p, logits, **TOL, msg="a frozen parameter changes the logits")
    torch.testing.assert_close(S_p, S, **TOL, msg="a frozen parameter changes S")


def _last_block_prefix(model: nn.Module) -> str:
    from sarvit.surgery import SARBlock

    found = [name for name, m in model.named_modules() if isinstance(m, SARBlock)]
    assert len(found) == 1, f"attach must wrap exactly one block, wrapped {found}"
    return found[0] + "."


def _check_detach(make_model, plain: nn.Module, x: torch.Tensor) -> None:
    model = _attached(plain)
    with torch.no_grad():  # "training": the detached model must keep the new weights
        for p in model.parameters():
            p.mul_(1.01)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    detached = sarvit.detach(model)
    assert detached is model and not sarvit.is_attached(model)
    assert not hasattr(model, "forward_with_similarity")
    reference = make_model().eval()
    types = [type(m) for m in model.modules()]
    assert types == [type(m) for m in reference.modules()], "detach must restore the blocks"
    assert [p.requires_grad for p in model.parameters()] == [p.requires_grad for p in reference.parameters()]
    reference.load_state_dict(trained, strict=True)
    torch.testing.assert_close(model(x), reference(x), **TOL, msg="detach must give back the plain forward")


def check_compile(make_model: Callable[[], nn.Module], x: torch.Tensor) -> None:
    """``torch.compile`` of the attached model (its ``forward``) and of its ``forward_with_similarity``
    give the eager logits and ``S``."""
    model = _attached(_perturbed(make_model().eval()))
    logits, S = model.forward_with_similarity(x)
    torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)
    logits_c, S_c = torch.compile(model.forward_with_similarity)(x)
    torch.testing.assert_close(logits_c, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(S_c, S, rtol=1e-4, atol=1e-4)
