"""The CPU path of :func:`sarvit.spatial_entropy`: compiled loops, a hand-written backward.

``HostEntropy.apply(S (M, n), h, w, connectivity) -> (H (M,), count (M,))``. The forward
pass works map by map (numba, compiled on first use and cached on disk): the mean; the
components of the map's 2 x 2 blocks (with 8-connectivity the pixels of a block always
touch), by bit-parallel flood fill when the blocks fit in an int64 (maps up to 16 x 14),
by union-find otherwise, and over single pixels with 4-connectivity; the component masses
and the entropy (Eq. 5-8). The backward pass uses the closed form
``dH/dB_i = -(log P_c + H) / sum B`` for every entry ``i`` of component ``c`` (0 on the
background), then the mean of Eq. 5. Everything is accumulated in float64 on the calling
thread: no torch kernel, no thread team to stall when other processes load every core.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .errors import UserError

__all__ = ["HostEntropy", "DivergedAttention", "NON_FINITE"]


class DivergedAttention(UserError, ValueError):
    """The similarity maps hold NaN or Inf: training diverged; the message says what to try."""


NON_FINITE = (
    "spatial_entropy: the similarity maps contain NaN or Inf values (or values so large that a "
    "map's mean overflows), so the loss is undefined. The model's last-block attention has "
    "diverged (often fp16 overflow or a too-high learning rate): lower the learning rate, "
    "enable gradient clipping, or train with bf16 instead of fp16."
)


def _jit(function):
    """Compile with numba on first call, single-threaded, without the GIL; cached on disk."""
    try:
        return numba.njit(cache=True, nogil=True)(function)
    except RuntimeError:  # no writable cache folder: compile in every process instead
        return numba.njit(nogil=True)(function)


# Neighbouring cells already visited in raster order, one row per direction:
# (row step, column step, bits of this cell, bits of the neighbour). Two cells touch when
# one has a pixel among "bits of this cell" and the other among "bits of the neighbour".
# 8-connectivity works on 2 x 2 blocks (bit 0 top-left, 1 top-right, 2 bottom-left,
# 3 bottom-right): the pixels of a block always touch each other, and any pixel of a
# block's left column touches any pixel of its west neighbour's right column, etc.
_BLOCKS_8 = np.array(
    [(0, -1, 0b0101, 0b1010), (-1, -1, 0b0001, 0b1000), (-1, 0, 0b0011, 0b1100), (-1, 1, 0b0010, 0b0100)]
)  # west, north-west, north, north-east
# 4-connectivity works on single pixels: west and north.
_PIXELS_4 = np.array([(0, -1, 1, 1), (-1, 0, 1, 1)])
_SMALL_MAP_BLOCKS = 63  # maps of at most this many 2 x 2 blocks fit the bits of an int64


@_jit
def _entropy(k, mass, components, background, logP, H, total, count):  # pragma: no cover - compiled
    """Eq. 7-8 for map ``k`` from the masses of its components ``0..components-1``.

    ``total`` is the sum of the component masses (= |B|, every positive entry lies in a
    component), so a lone component gets P = 1 exactly and entropy +0 (0 - 1 * 0).
    ``logP[k, background]`` gets ``-H`` so that the gradient formula gives 0 there.
    """
    t = 0.0
    for j in range(components):
        t += mass[j]
    entropy = 0.0
    for j in range(components):
        p = mass[j] / t
        log_p = np.log(p) if p > 0 else 0.0  # p underflows to 0 only for float64 extremes
        logP[k, j] = log_p
        entropy -= p * log_p
    H[k] = entropy
    logP[k, background] = -entropy
    total[k] = t
    count[k] = components


@_jit
def _forward_small_maps(S, h, w, comp, logP, H, total, count):  # pragma: no cover - compiled
    """:func:`_forward_maps` for 8-connectivity and at most 63 blocks of 2 x 2 pixels a map
    (14 x 14 has 49, 16 x 14 has 56), with the components found by bit-parallel flood fill
    (about 2.5 times faster than the union-find over blocks on 14 x 14 maps).

    A map's blocks are the bits of one int64 (bit ``b`` = block ``b`` in raster order).
    Four masks say which blocks have their top-left, top-right, bottom-left or bottom-right
    pixel above the mean; from them four link masks say which blocks touch their west,
    north-west, north or north-east neighbour. A component grows from its lowest block by
    shifting along the links until it stops changing. Components are numbered 0, 1, ... in
    the order of their lowest block; the outputs are those of :func:`_forward_maps`.
    """
    m, n = S.shape
    rows = (h + 1) >> 1
    cols = (w + 1) >> 1
    nc = rows * cols
    not_first = 0  # blocks outside the first column
    not_last = 0  # blocks outside the last column
    for b in range(nc):
        not_first |= np.int64(b % cols > 0) << b
        not_last |= np.int64(b % cols < cols - 1) << b
    block = np.empty(nc + 1, np.int64)  # component of each block; nc for none
    block_mass = np.empty(nc + 1, np.float64)
    mass = np.empty(nc + 1, np.float64)
    finite = True
    for k in range(m):
        mean = 0.0
        for i in range(n):
            mean += S[k, i]
        mean /= n
        finite &= np.isfinite(mean)
        block_mass[:] = 0.0
        tl = tr = bl = br = 0
        for r in range(h):
            for c in range(w):
                d = S[k, r * w + c] - mean
                above = np.int64(d > 0)
                b = (r >> 1) * cols + (c >> 1)
                block_mass[b] += d * above
                if r & 1:
                    if c & 1:
                        br |= above << b
                    else:
                        bl |= above << b
                elif c & 1:
                    tr |= above << b
                else:
                    tl |= above << b
        west = (tl | bl) & ((tr | br) << 1) & not_first
        north = (tl | tr) & ((bl | br) << cols)
        north_west = tl & (br << (cols + 1)) & not_first
        north_east = tr & (bl << (cols - 1)) & not_last
        remaining = tl | tr | bl | br
        block[:] = nc
        components = 0
        while remaining != 0:
            grown = remaining & -remaining  # the lowest block not yet in a component
            while True:
                part = grown
                grown = (
                    part
                    | ((part << 1) & west) | ((part & west) >> 1)
                    | ((part << cols) & north) | ((part & north) >> cols)
                    | ((part << (cols + 1)) & north_west) | ((part & north_west) >> (cols + 1))
                    | ((part << (cols - 1)) & north_east) | ((part & north_east) >> (cols - 1))
                )
                if grown == part:
                    break
            remaining &= ~grown
            for b in range(nc):
                block[b] += (components - block[b]) * ((grown >> b) & 1)
            components += 1
        mass[:] = 0.0
        for b in range(nc):
            mass[block[b]] += block_mass[b]  # Eq. 13
        # Background pixels point to slot nc. (Two loops: one fused loop runs twice as slow.)
        for i in range(n):
            comp[k, i] = np.int32(S[k, i] - mean > 0)
        for r in range(h):
            for c in range(w):
                i = r * w + c
                comp[k, i] = comp[k, i] * block[(r >> 1) * cols + (c >> 1)] + nc * (1 - comp[k, i])
        _entropy(k, mass, components, nc, logP, H, total, count)
    return finite


@_jit
def _forward_maps(S, h, w, shift, neighbours, comp, logP, H, total, count):  # pragma: no cover - compiled
    """Entropy of every map of ``S`` (M, n = h * w), float64; one pass per map, no temporaries.

    Per map: the mean; each cell's pattern of pixels above the mean (cells are 2 x 2 blocks
    with ``shift = 1``, pixels with ``shift = 0``); union-find over the non-empty cells in
    raster order (every root is the smallest cell index of its tree); component masses,
    their total and the entropy.

    Writes ``comp`` (M, n) int32: the component of each pixel, numbered 0, 1, ... in
    raster order of the roots, and ``nc`` (the number of cells) on the background;
    ``logP`` (M, nc + 1): log P of each component, and ``-H`` in the last slot so that
    the gradient formula gives 0 on the background; ``H``, ``total`` (= sum B) and
    ``count`` (M,). Returns whether every mean is finite.
    """
    m, n = S.shape
    rows = (h + shift) >> shift
    cols = (w + shift) >> shift
    nc = rows * cols
    pattern = np.zeros(nc, np.int32)
    parent = np.empty(nc + 1, np.int32)
    number = np.empty(nc + 1, np.int32)
    number[nc] = nc
    cell_mass = np.empty(nc + 1, np.float64)
    mass = np.empty(nc + 1, np.float64)
    finite = True
    for k in range(m):
        mean = 0.0
        for i in range(n):
            mean += S[k, i]
        mean /= n
        finite &= np.isfinite(mean)
        pattern[:] = 0
        cell_mass[:] = 0.0
        for r in range(h):
            for c in range(w):
                d = S[k, r * w + c] - mean
                above = np.int32(d > 0)
                b = (r >> shift) * cols + (c >> shift)
                pattern[b] |= above << (((r & shift) << shift) + (c & shift))
                cell_mass[b] += d * above
        for br in range(rows):  # union-find; a root always has the smallest index of its tree
            for bc in range(cols):
                b = br * cols + bc
                if pattern[b] == 0:
                    parent[b] = nc
                    continue
                root = b
                parent[b] = b
                for j in range(neighbours.shape[0]):
                    qr, qc = br + neighbours[j, 0], bc + neighbours[j, 1]
                    if qr < 0 or qc < 0 or qc >= cols or (pattern[b] & neighbours[j, 2]) == 0:
                        continue
                    q = qr * cols + qc
                    if (pattern[q] & neighbours[j, 3]) == 0:
                        continue
                    other = parent[q]
                    while parent[other] != other:
                        other = parent[other]
                    if other < root:
                        parent[root] = other
                        root = other
                    elif other > root:
                        parent[other] = root
        parent[nc] = nc  # the background slot
        mass[:] = 0.0
        for b in range(nc + 1):  # parents have smaller indices, so one hop reaches the root
            parent[b] = parent[parent[b]]
            mass[parent[b]] += cell_mass[b]  # Eq. 13
        # Number the components 0, 1, ... in root order (mass moves down: j <= root cell).
        components = 0
        for b in range(nc):
            if parent[b] == b:
                number[b] = components
                mass[components] = mass[b]
                components += 1
        for b in range(nc):
            parent[b] = number[parent[b]]  # the component of each cell; nc for none
        for i in range(n):
            comp[k, i] = np.int32(S[k, i] - mean > 0)
        for r in range(h):
            for c in range(w):
                i = r * w + c
                comp[k, i] = comp[k, i] * parent[(r >> shift) * cols + (c >> shift)] + nc * (1 - comp[k, i])
        _entropy(k, mass, components, nc, logP, H, total, count)
    return finite


@_jit
def _backward_maps(G, comp, logP, H, total, out):  # pragma: no cover - compiled
    """``out`` (M, n) = d loss / d S from ``G`` (M,) = d loss / d H, float64.

    For a pixel of component c of map m: dH/dB = -(log P_c + H_m) / |B_m| (0 on the
    background, through the last slot of ``logP``); then the mean of Eq. 5:
    dS_j = dB_j - mean_i dB_i over the map.
    """
    m, n = comp.shape
    for k in range(m):
        scale = G[k] / total[k] if total[k] > 0 else 0.0
        mean = 0.0
        for i in range(n):
            g = -(logP[k, comp[k, i]] + H[k]) * scale
            out[k, i] = g
            mean += g
        mean /= n
        for i in range(n):
            out[k, i] -= mean


class HostEntropy(torch.autograd.Function):
    """The CPU path: ``(S (M, n), h, w, connectivity) -> (H (M,), count (M,))``.

    Runs compiled loops on the calling thread (no torch kernel over the maps, no thread
    team), so a step is not held up by other processes keeping every core busy.
    """

    @staticmethod
    def forward(ctx, S: torch.Tensor, h: int, w: int, connectivity: int):
        X = np.ascontiguousarray(S.detach().numpy(), dtype=np.float64)  # (M, n)
        m, n = X.shape
        shift = 1 if connectivity == 8 else 0  # 2 x 2 blocks or single pixels
        cells = ((h + shift) >> shift) * ((w + shift) >> shift)
        comp = np.empty((m, n), dtype=np.int32)
        logP = np.zeros((m, cells + 1))
        H, total = np.empty(m), np.empty(m)
        count = np.empty(m, dtype=np.int64)
        if connectivity == 8 and cells <= _SMALL_MAP_BLOCKS:
            finite = _forward_small_maps(X, h, w, comp, logP, H, total, count)
        else:
            neighbours = _BLOCKS_8 if connectivity == 8 else _PIXELS_4
            finite = _forward_maps(X, h, w, shift, neighbours, comp, logP, H, total, count)
        if not finite:
            raise DivergedAttention(NON_FINITE)
        ctx.saved = (comp, logP, H, total)
        ctx.dtype = S.dtype
        count = torch.from_numpy(count)
        ctx.mark_non_differentiable(count)
        return torch.from_numpy(H if S.dtype == torch.float64 else H.astype(np.float32)), count

    @staticmethod
    @once_differentiable
    def backward(ctx, G: torch.Tensor, _):
        comp, logP, H, total = ctx.saved
        out = np.empty(comp.shape)  # (M, n) float64
        _backward_maps(np.ascontiguousarray(G.numpy(), dtype=np.float64), comp, logP, H, total, out)
        if ctx.dtype != torch.float64:
            out = out.astype(np.float32)
        return torch.from_numpy(out), None, None, None
