import math
from pathlib import Path

import numpy as np
import pytest
import torch

import sarvit
from tests.masks import checkerboard, random_masks, scipy_labels, serpentine, spiral

PINNED = Path(__file__).parent / "data" / "official_spatial_entropy.npz"


def loop_entropy(S: torch.Tensor, connectivity: int = 8) -> torch.Tensor:
    """The straightforward implementation: one map at a time, one tensor per component."""
    h, w = S.shape[-2:]
    maps = S.reshape(-1, h, w)
    out = []
    for s in maps:
        b = torch.relu(s - s.mean())
        labels = torch.from_numpy(scipy_labels((b > 0).detach().numpy(), connectivity))
        total = b.sum()
        entropy = s.new_zeros(())
        for j in range(1, int(labels.max()) + 1):
            p = b[labels == j].sum() / total
            entropy = entropy - p * torch.log(p)
        out.append(entropy)
    return torch.stack(out).reshape(S.shape[:-2])


def blob_map(h, w, blobs):
    """A map that is 0 except for the given rectangles (r0, r1, c0, c1, value)."""
    s = torch.zeros(h, w, dtype=torch.float64)
    for r0, r1, c0, c1, value in blobs:
        s[r0:r1, c0:c1] = value
    return s


@pytest.mark.parametrize("family", ["white", "smooth", "blobby"])
def test_matches_published_code_pinned_values(family):
    data = np.load(PINNED)
    S = torch.tensor(data[f"{family}_S"], requires_grad=True)
    per_map = sarvit.spatial_entropy(S)
    loss = sarvit.SpatialEntropyLoss()(S)
    loss.backward()
    np.testing.assert_allclose(per_map.detach().numpy(), data[f"{family}_per_map"], atol=1e-5)
    np.testing.assert_allclose(loss.item(), data[f"{family}_loss"], atol=1e-5)
    np.testing.assert_allclose(S.grad.numpy(), data[f"{family}_grad"], atol=1e-5)


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("shape", [(4, 3, 14, 14), (2, 2, 7, 7), (3, 1, 5, 9), (2, 4, 1, 6), (6, 16, 16)])
@pytest.mark.parametrize("backend", ["auto", "scipy", "torch"])
def test_value_and_gradient_equal_a_per_map_loop(shape, connectivity, backend):
    torch.manual_seed(sum(shape) + connectivity)
    base = torch.randn(shape, dtype=torch.float64)
    smooth = torch.nn.functional.avg_pool2d(base.reshape(-1, 1, *shape[-2:]), 3, 1, 1).reshape(shape)
    for S0 in (base, smooth):
        S = S0.clone().requires_grad_(True)
        ref = S0.clone().requires_grad_(True)
        got = sarvit.spatial_entropy(S, connectivity=connectivity, backend=backend)
        want = loop_entropy(ref, connectivity)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        weights = torch.rand(shape[:-2], dtype=torch.float64)
        (got * weights).sum().backward()
        (want * weights).sum().backward()
        torch.testing.assert_close(S.grad, ref.grad, rtol=1e-9, atol=1e-12)


def masks_as_maps(masks: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """Float64 maps whose entries above the map mean are exactly ``masks`` (unless empty or full)."""
    n = masks.shape[-1] * masks.shape[-2]
    noise = rng.random(masks.shape)
    return torch.from_numpy(np.where(masks, n + noise, noise))  # foreground >= n > mean >= 1 > background


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize(
    "size",
    [(1, 1), (1, 9), (9, 1), (2, 2), (7, 7), (14, 14), (5, 11), (16, 9), (18, 14), (14, 18), (16, 16), (32, 32)],
    ids=lambda s: f"{s[0]}x{s[1]}",
)
def test_cpu_kernel_partitions_like_scipy(size, connectivity):
    # The CPU kernels label by themselves (8-connectivity: bit-parallel flood fill over the
    # 2 x 2 blocks up to 63 blocks, as 18 x 14 and 14 x 18; union-find over blocks beyond,
    # as 16 x 16; 4-connectivity: union-find over pixels). Their component counts must be
    # scipy's and their entropies the per-map loop's, on masks of every density, odd sizes
    # (partial blocks) and the adversarial shapes.
    h, w = size
    rng = np.random.default_rng(h * 100 + w)
    masks = [random_masks(rng, 300, h, w)]
    if min(h, w) >= 3:
        n = min(h, w)
        shapes = [serpentine(h, w), serpentine(w, h, transpose=True), checkerboard(h, w), np.zeros((h, w), bool)]
        square = [spiral(n), spiral(n)[::-1, ::-1], serpentine(n, n)[:, ::-1]]
        masks.append(np.stack(shapes))
        masks.append(np.stack([np.pad(m, ((0, h - n), (0, w - n))) for m in square]))
    masks = np.concatenate(masks)
    S = masks_as_maps(masks, rng)
    H, count = sarvit.spatial_entropy(S, connectivity=connectivity, return_num_components=True)
    above = (S > S.mean(dim=(-2, -1), keepdim=True)).numpy()
    mixed = masks.any(axis=(1, 2)) & ~masks.all(axis=(1, 2))
    assert (above[mixed] == masks[mixed]).all()  # the maps reproduce every mask but the empty and full ones
    np.testing.assert_array_equal(count.numpy(), [scipy_labels(m, connectivity).max() for m in above])
    torch.testing.assert_close(H, loop_entropy(S, connectivity), rtol=1e-10, atol=1e-12)


def test_cpu_kernel_on_float32_and_strided_input():
    torch.manual_seed(4)
    base = torch.randn(3, 4, 14, 11)
    S = base.transpose(-1, -2).requires_grad_(True)  # (3, 4, 11, 14), not contiguous
    ref = S.detach().double().requires_grad_(True)
    H = sarvit.spatial_entropy(S)
    want = loop_entropy(ref)
    assert H.dtype == torch.float32 and H.shape == (3, 4)
    torch.testing.assert_close(H, want.float(), rtol=1e-6, atol=1e-6)
    H.sum().backward()
    want.sum().backward()
    assert S.grad.dtype == torch.float32
    torch.testing.assert_close(S.grad, ref.grad.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("connectivity", [4, 8])
def test_gradcheck_cpu_kernel_odd_sizes(connectivity):
    # The CPU backward is written by hand: check it against finite differences.
    torch.manual_seed(connectivity)
    S = torch.randn(3, 2, 5, 7, dtype=torch.float64)
    S = torch.nn.functional.avg_pool2d(S.reshape(-1, 1, 5, 7), 3, 1, 1).reshape(3, 2, 5, 7)
    with torch.no_grad():  # keep every entry 1e-3 away from its map's mean (the threshold)
        gap = S - S.mean(dim=(-2, -1), keepdim=True)
        S += torch.where(gap.abs() < 1e-3, 1e-2 * torch.sign(gap + 1e-12), torch.zeros_like(gap))
    S.requires_grad_(True)
    fn = lambda s: sarvit.spatial_entropy(s, connectivity=connectivity)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (S,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "scipy", "torch"])
def test_maps_without_entries_and_empty_batches(backend):
    # (2, 3, 0, 0): six maps without entries, so without components -> entropy 0
    S = torch.zeros(2, 3, 0, 0, requires_grad=True)
    H, count = sarvit.spatial_entropy(S, backend=backend, return_num_components=True)
    assert H.shape == (2, 3) and H.dtype == torch.float32 and (H == 0).all()
    assert count.shape == (2, 3) and count.dtype == torch.int64 and (count == 0).all()
    H.sum().backward()
    assert S.grad.shape == (2, 3, 0, 0)
    # an empty batch: empty per-map result, and the loss is 0 (no component), not NaN
    E = torch.zeros(0, 6, 14, 14, dtype=torch.float64, requires_grad=True)
    assert sarvit.spatial_entropy(E, backend=backend).shape == (0, 6)
    loss = sarvit.SpatialEntropyLoss(backend=backend)(E)
    assert loss.item() == 0.0 and loss.dtype == torch.float64
    loss.backward()
    assert E.grad.shape == (0, 6, 14, 14)


@pytest.mark.parametrize("backend", ["auto", "scipy", "torch"])
@pytest.mark.parametrize(
    ("dtype", "expected"),
    [(torch.float64, torch.float64), (torch.float32, torch.float32),
     (torch.float16, torch.float32), (torch.bfloat16, torch.float32)],
)
def test_result_dtype(backend, dtype, expected):
    S = torch.randn(2, 3, 6, 6).to(dtype)
    assert sarvit.spatial_entropy(S, backend=backend).dtype == expected
    assert sarvit.SpatialEntropyLoss(backend=backend)(S).dtype == expected


def test_cpu_path_runs_no_torch_kernel_over_the_maps():
    # torch splits kernels over >= 32768 elements across its thread team; on a machine
    # whose cores are busy (data-loading workers) every such kernel waits for descheduled
    # threads. The CPU loss must touch the (256, 6, 14, 14) maps only through numpy.
    from torch.profiler import ProfilerActivity, profile

    S = torch.randn(256, 6, 14, 14, requires_grad=True)
    loss_fn = sarvit.SpatialEntropyLoss()
    loss_fn(S).backward()  # compile the kernels outside the profile
    S.grad = None
    no_compute = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::detach",
                  "aten::alias", "aten::expand", "aten::lift_fresh", "aten::empty", "aten::empty_strided",
                  "aten::to", "aten::resolve_conj", "aten::resolve_neg"}
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss_fn(S).backward()
    large = [
        (e.name, e.input_shapes) for e in prof.events()
        if e.name.startswith("aten::") and e.name not in no_compute
        and any(math.prod(shape) >= 32768 for shape in e.input_shapes if shape)
    ]
    assert not large, large
    assert S.grad is not None and S.grad.shape == S.shape


def test_hand_computed_values():
    # one blob, whatever its shape and values: a single component -> entropy 0
    one = blob_map(10, 10, [(1, 4, 2, 6, 1.0)])
    one[2, 3] = 5.0
    # two blobs of equal mass -> log 2
    two = blob_map(10, 10, [(0, 2, 0, 2, 1.0), (5, 7, 5, 7, 1.0)])
    # blobs of masses 1 : 1 : 2 above the mean -> -(2 * 1/4 log 1/4 + 1/2 log 1/2)
    three = blob_map(10, 10, [(0, 1, 0, 2, 1.0), (4, 5, 4, 6, 1.0), (8, 10, 8, 10, 1.0)])
    # diagonal neighbours are one component with 8-connectivity, two with 4
    diagonal = blob_map(10, 10, [(0, 1, 0, 1, 1.0), (1, 2, 1, 2, 1.0)])
    H = sarvit.spatial_entropy(torch.stack([one, two, three, diagonal]))
    mean3 = 8.0 / 100  # Eq. 5's mean shifts every blob by the same amount
    masses = torch.tensor([2 * (1 - mean3), 2 * (1 - mean3), 4 * (1 - mean3)], dtype=torch.float64)
    p = masses / masses.sum()
    expected = [0.0, math.log(2), float(-(p * p.log()).sum()), 0.0]
    torch.testing.assert_close(H, torch.tensor(expected, dtype=torch.float64))
    assert H[0].item() == 0.0 and not torch.signbit(H[0])  # exactly +0 for one component, float64 ...
    H32 = sarvit.spatial_entropy(one.float())
    assert H32.item() == 0.0 and not torch.signbit(H32)  # ... and float32
    assert abs(expected[2] - 1.5 * math.log(2)) < 1e-12
    H4 = sarvit.spatial_entropy(diagonal, connectivity=4)
    torch.testing.assert_close(H4, torch.tensor(math.log(2), dtype=torch.float64))


def test_number_of_components():
    torch.manual_seed(3)
    S = torch.randn(5, 4, 9, 9)
    H, count = sarvit.spatial_entropy(S, return_num_components=True)
    assert count.dtype == torch.int64 and count.shape == (5, 4)
    for s, c in zip(S.reshape(-1, 9, 9), count.reshape(-1), strict=True):
        assert scipy_labels((s > s.mean()).numpy(), 8).max() == c


def test_gradcheck_float64():
    torch.manual_seed(0)
    S = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    # no entry within 1e-3 of its map's mean, so the finite differences never cross the threshold
    with torch.no_grad():
        gap = S - S.mean(dim=(-2, -1), keepdim=True)
        S.add_(torch.where(gap.abs() < 1e-3, 1e-2 * torch.sign(gap + 1e-12), torch.zeros_like(gap)))
    assert torch.autograd.gradcheck(lambda s: sarvit.spatial_entropy(s), (S,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_computed_in_float32(dtype):
    torch.manual_seed(1)
    S_half = torch.randn(4, 6, 14, 14).to(dtype).requires_grad_(True)
    S_ref = S_half.detach().float().requires_grad_(True)
    H = sarvit.spatial_entropy(S_half)
    assert H.dtype == torch.float32
    torch.testing.assert_close(H, loop_entropy(S_ref.detach()), rtol=1e-5, atol=1e-5)
    H.sum().backward()
    sarvit.spatial_entropy(S_ref).sum().backward()
    assert S_half.grad.dtype == dtype and torch.isfinite(S_half.grad.float()).all()
    torch.testing.assert_close(S_half.grad.float(), S_ref.grad.to(dtype).float())


def test_half_precision_under_autocast():
    torch.manual_seed(2)
    S = torch.randn(2, 3, 14, 14)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        H = sarvit.spatial_entropy(S.to(torch.bfloat16))
    assert H.dtype == torch.float32
    torch.testing.assert_close(H, loop_entropy(S.to(torch.bfloat16).float()), rtol=1e-5, atol=1e-5)


def test_constant_maps_and_component_free_batches():
    S = torch.full((3, 2, 14, 14), 0.7, requires_grad=True)
    loss = sarvit.SpatialEntropyLoss()(S)  # no map has a component: must not crash
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(S.grad).all() and (S.grad == 0).all()
    # a constant map beside a normal one: counts in the mean with entropy 0, zero gradient
    mixed = torch.stack([torch.zeros(6, 6), blob_map(6, 6, [(0, 1, 0, 1, 1.0), (4, 5, 4, 5, 1.0)]).float()])
    mixed.requires_grad_(True)
    loss = sarvit.SpatialEntropyLoss()(mixed)
    torch.testing.assert_close(loss, torch.tensor(math.log(2) / 2))
    loss.backward()
    assert (mixed.grad[0] == 0).all() and torch.isfinite(mixed.grad).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_maps_raise(bad):
    S = torch.randn(2, 3, 14, 14)
    S[1, 2, 4, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        sarvit.spatial_entropy(S)
    with pytest.raises(ValueError, match="NaN or Inf"):
        sarvit.SpatialEntropyLoss()(S)


def test_bad_input_types():
    with pytest.raises(TypeError, match="floating-point"):
        sarvit.spatial_entropy(torch.ones(3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"\(\.\.\., h, w\)"):
        sarvit.spatial_entropy(torch.ones(5))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_pinned_values():
    data = np.load(PINNED)
    S = torch.tensor(data["smooth_S"], device="cuda", requires_grad=True)
    loss = sarvit.SpatialEntropyLoss()(S.half())
    loss.backward()
    np.testing.assert_allclose(loss.item(), data["smooth_loss"], atol=1e-3)
    S32 = torch.tensor(data["blobby_S"], device="cuda", requires_grad=True)
    sarvit.SpatialEntropyLoss()(S32).backward()
    np.testing.assert_allclose(S32.grad.cpu().numpy(), data["blobby_grad"], atol=1e-5)
