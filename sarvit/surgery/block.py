"""The SAR last block (Eq. 10-11) and the similarity maps of Eq. 4.

``SARBlock`` wraps a standard pre-norm transformer block (timm's ``Block``): it adopts
the block's own submodules under their own names, so parameter names do not change and
checkpoints load both ways, and it keeps the original block to hand back on detach.

Its layout says which parts of the standard block it keeps. The rows of Table 1(b):

    A  standard   z' = MSA(LN1(z)) + z     z = MLP(LN2(z')) + z'   (Eq. 1-2)
    B             z' = MSA(LN1(z))         z = MLP(LN2(z')) + z'
    C  sar        z' = MSA(LN1(z))         z = MLP(z') + z'        (Eq. 10-11, default)
    D             z' = MSA(LN1(z))         z = MLP(z')

(rows E and F are A and C trained with the spatial-entropy loss). Without the MSA skip
the MSA branch has no drop-path and no LayerScale: both only make sense on a residual
branch (a LayerScale initialised at 1e-5 would all but zero the block's output). Likewise
row D drops the MLP branch's drop-path and LayerScale. The parameters that a layout does
not use (LN2 for C and D, LayerScale gammas) stay in the module, so state dicts keep
timm's keys, but are frozen (``requires_grad=False``) so that optimisers skip them and
DistributedDataParallel does not wait for their gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["install", "uninstall", "BlockLayout", "LAYOUTS", "resolve_layout", "SARBlock", "SIMILARITIES",
           "similarity_from_qk", "query_vector", "query_logits_from_qk", "timm_qkv", "attention_with_similarity",
           "timm_attention_logits", "auto_query", "last_block_with_similarity"]


@dataclass(frozen=True)
class BlockLayout:
    """Which parts of a standard pre-norm block the last block keeps."""

    msa_skip: bool
    mlp_norm: bool
    mlp_skip: bool


LAYOUTS = {
    "A": BlockLayout(msa_skip=True, mlp_norm=True, mlp_skip=True),
    "B": BlockLayout(msa_skip=False, mlp_norm=True, mlp_skip=True),
    "C": BlockLayout(msa_skip=False, mlp_norm=False, mlp_skip=True),
    "D": BlockLayout(msa_skip=False, mlp_norm=False, mlp_skip=False),
}
_ALIASES = {"standard": "A", "no_msa_skip": "B", "sar": "C", "no_skips": "D"}


def resolve_layout(layout: str | BlockLayout) -> BlockLayout:
    """``"sar"``/``"C"`` -> ``BlockLayout``; accepts the Table 1(b) letters and names."""
    if isinstance(layout, BlockLayout):
        return layout
    key = _ALIASES.get(str(layout), str(layout).upper())
    if key not in LAYOUTS:
        names = ", ".join(f"{k} ({v})" for v, k in _ALIASES.items())
        raise ValueError(f"unknown last-block layout {layout!r}; choose one of {names}")
    return LAYOUTS[key]


SIMILARITIES = ("dot", "softmax", "cosine")


def similarity_from_qk(
    q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int, query: str = "cls",
    similarity: str = "dot",
) -> torch.Tensor:
    """The similarity of one query to the patch keys, over the patch tokens only.

    - ``"dot"``, Eq. 4: ``S[b, h, j] = <q_query, k_j> * scale`` (pre-softmax, the paper's choice).
    - ``"softmax"`` (Sec. 4.3): ``softmax_j(S[b, h, :])``, the attention row normalised over the
      patch keys. Its restriction to the patch keys differs from the block's own attention row
      (which also holds the prefix keys) by one positive factor per map, which Eq. 5-8 ignore.
    - ``"cosine"``, Eq. 15: ``<q_query, k_j> / (||q_query|| ||k_j||)``.

    Args:
        q, k: ``(B, heads, N, head_dim)``, the block's queries and keys (after q/k norm).
        scale: ``head_dim ** -0.5``.
        num_prefix_tokens: tokens before the patch grid (class, distillation, registers).
        query: ``"cls"`` (token 0) or ``"mean"`` (mean of the patch queries, for models
            without a class token).
        similarity: ``"dot"``, ``"softmax"`` or ``"cosine"``.

    Returns:
        float32 ``(B, heads, N - num_prefix_tokens)``. Only one query row is computed;
        the ``N x N`` attention matrix is never formed. Autocast is off here so that the
        product is float32 even inside a bf16/fp16 region.
    """
    if similarity not in SIMILARITIES:
        raise ValueError(f"similarity must be one of {', '.join(SIMILARITIES)}, got {similarity!r}")
    keys = k[:, :, num_prefix_tokens:]  # (B, heads, n, d)
    q0 = query_vector(q, num_prefix_tokens, query)  # (B, heads, 1, d)
    with torch.autocast(device_type=q.device.type, enabled=False):
        if similarity == "cosine":  # Eq. 15
            unit_keys = F.normalize(keys.float(), dim=-1)  # (B, heads, n, d)
            S = F.normalize(q0.float(), dim=-1) @ unit_keys.transpose(-2, -1)  # (B, heads, 1, n)
        else:
            S = (q0.float() * scale) @ keys.float().transpose(-2, -1)  # (B, heads, 1, n)
            if similarity == "softmax":
                S = S.softmax(dim=-1)
    return S.squeeze(-2)


def query_vector(q: torch.Tensor, num_prefix_tokens: int, query: str) -> torch.Tensor:
    """The query of Eq. 4: ``(B, heads, N, d) -> (B, heads, 1, d)``, the class token's (token 0,
    ``"cls"``) or the mean of the patch queries (``"mean"``, tokens after the prefix)."""
    if query == "cls":
        return q[:, :, :1]  # (B, heads, 1, d)
    if query == "mean":
        return q[:, :, num_prefix_tokens:].mean(dim=2, keepdim=True)  # (B, heads, 1, d)
    raise ValueError(f"query must be 'cls' or 'mean', got {query!r}")


def query_logits_from_qk(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int,
                         query: str) -> torch.Tensor:
    """The query's row of the attention logits over ALL keys, prefix keys included.

    Args:
        q: ``(B, heads, N, d)``, the block's queries; k: ``(B, heads, N_k, d)``, its keys
            (the prefix keys first, then the key grid).
        scale: the factor the block scales its logits with.

    Returns:
        float32 ``(B, heads, N_k)``: ``<q_query, k_j> * scale``. Its softmax is the query's
        post-softmax attention (for blocks without an additive bias); its columns after the
        prefix are the ``"dot"`` map of :func:`similarity_from_qk`.
    """
    q0 = query_vector(q, num_prefix_tokens, query)  # (B, heads, 1, d)
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = (q0.float() * scale) @ k.float().transpose(-2, -1)  # (B, heads, 1, N_k)
    return logits.squeeze(-2)


def timm_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The queries, keys and values of a timm ``Attention`` (q/k norm applied): ``(B, N, C)`` ->
    three ``(B, heads, N, d)``."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, d)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def timm_attention_logits(block: nn.Module, x: torch.Tensor, num_prefix_tokens: int, query: str) -> torch.Tensor:
    """The query's attention logits over all keys of a pre-norm block with a timm ``Attention``
    (plain or SAR-wrapped): ``x`` ``(B, N, C)``, the tokens entering the block -> float32
    ``(B, heads, N)``; see :func:`query_logits_from_qk`."""
    q, k, _ = timm_qkv(block.attn, block.norm1(x))  # (B, heads, N, d) each
    return query_logits_from_qk(q, k, block.attn.scale, num_prefix_tokens, query)


def auto_query(model: nn.Module, query: str) -> str:
    """``query`` with ``"auto"`` resolved: the class token when ``model.cls_token`` exists, else the mean."""
    if query != "auto":
        return query
    return "cls" if getattr(model, "cls_token", None) is not None else "mean"


def attention_with_similarity(attn: nn.Module, x: torch.Tensor, num_prefix_tokens: int, query: str,
                              similarity: str = "dot"):
    """timm ``Attention.forward`` that also returns the similarity maps (Eq. 4 by default).

    Args:
        attn: a ``timm.layers.Attention``.
        x: ``(B, N, C)``, the normalised tokens entering the attention.
        similarity: ``"dot"`` (Eq. 4), ``"softmax"`` or ``"cosine"`` (Eq. 15); see
            :func:`similarity_from_qk`.

    Returns:
        ``(out, S)``: ``out`` ``(B, N, C)`` equals ``attn(x)`` and is computed with fused
        ``scaled_dot_product_attention``; ``S`` is float32 ``(B, heads, N - prefix)``.
    """
    B, N, _ = x.shape
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    q, k, v = timm_qkv(attn, x)  # (B, heads, N, d) each
    S = similarity_from_qk(q, k, attn.scale, num_prefix_tokens, query, similarity)  # (B, heads, n)
    out = F.scaled_dot_product_attention(
        q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0
    )  # (B, heads, N, d)
    out = out.transpose(1, 2).reshape(B, N, attn.num_heads * attn.head_dim)  # (B, N, heads * d)
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), S


class SARBlock(nn.Module):
    """A standard pre-norm block rewired to a Table 1(b) layout; see the module docstring.

    ``forward(x)`` maps ``(B, N, C) -> (B, N, C)`` like the wrapped block;
    ``forward_with_similarity(x, similarity="dot")`` also returns ``S`` of shape
    ``(B, heads, N - prefix)`` (see :func:`similarity_from_qk` for the kinds).
    """

    NORM2 = "norm2"  # the wrapped block's name for LN2 (torchvision's EncoderBlock calls it "ln_2")
    OPTIONAL = ("ls1", "ls2", "drop_path1", "drop_path2")  # parts a block may lack: then the identity

    def __init__(self, block: nn.Module, layout: BlockLayout, num_prefix_tokens: int, query: str) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)  # same objects, same names: timm's parameter keys
        for name in self.OPTIONAL:
            if name not in self._modules:
                self.add_module(name, nn.Identity())  # no parameters: the state dict does not change
        self.layout = layout
        self.num_prefix_tokens = num_prefix_tokens
        self.query = query
        self._original = (block,)  # a tuple, so that it is not registered as a submodule
        unused = []
        if not layout.msa_skip:
            unused.append(self.ls1)
        if not (layout.mlp_norm and layout.mlp_skip):
            unused.append(getattr(self, self.NORM2))
        if not layout.mlp_skip:
            unused.append(self.ls2)
        self._frozen = tuple((p, p.requires_grad) for m in unused for p in m.parameters())
        for p, _ in self._frozen:
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("the SAR last block does not support attention masks")
        return self._finish(x, self.attn(self.norm1(x)))

    def forward_with_similarity(self, x: torch.Tensor, similarity: str = "dot"):
        a, S = attention_with_similarity(self.attn, self.norm1(x), self.num_prefix_tokens, self.query, similarity)
        return self._finish(x, a), S

    def _finish(self, x: torch.Tensor, a: torch.Tensor, *mlp_args) -> torch.Tensor:
        """Combine the block input ``x`` and the attention output ``a`` (both ``(B, N, C)``);
        ``mlp_args`` go to the MLP after the tokens (e.g. the token grid of a convolutional MLP)."""
        layout = self.layout
        z = x + self.drop_path1(self.ls1(a)) if layout.msa_skip else a  # Eq. 1 or Eq. 10
        if not layout.mlp_skip:
            return self.mlp(z, *mlp_args)  # row D
        h = getattr(self, self.NORM2)(z) if layout.mlp_norm else z
        return z + self.drop_path2(self.ls2(self.mlp(h, *mlp_args)))  # Eq. 2 or Eq. 11

    def restore(self) -> nn.Module:
        """Unfreeze what this wrapper froze and return the original block (same weights)."""
        for p, requires_grad in self._frozen:
            p.requires_grad_(requires_grad)
        return self._original[0]

    def extra_repr(self) -> str:
        return f"layout={self.layout}, num_prefix_tokens={self.num_prefix_tokens}, query={self.query!r}"


def install(model: nn.Module, blocks, wrapper: SARBlock, forward) -> nn.Module:
    """Put ``wrapper`` in the place of ``blocks[-1]`` and give ``model`` its family's
    ``forward_with_similarity`` (``forward(model, x, similarity, tokens)``); returns ``model``."""
    blocks[-1] = wrapper
    model.forward_with_similarity = MethodType(forward, model)
    return model


def last_block_with_similarity(blocks, x: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int,
                               similarity: str | None, tokens: bool):
    """Run ``blocks[-1]`` (a :class:`SARBlock` called as ``block(x)``) on ``x`` ``(B, P + h*w, C)``.

    Returns:
        ``(x, S, patches)``: the block's output ``(B, P + h*w, C)``; ``S`` float32 ``(B, heads, h, w)``
        (``None`` when ``similarity`` is ``None``: the plain forward runs); ``patches`` the
        output's patch tokens ``(B, h, w, C)`` when ``tokens``, else ``None``.
    """
    S = None
    if similarity is None:
        x = blocks[-1](x)
    else:
        x, S = blocks[-1].forward_with_similarity(x, similarity)  # S: (B, heads, h*w)
        S = S.unflatten(-1, grid)  # (B, heads, h, w)
    patches = x[:, num_prefix_tokens:].unflatten(1, grid) if tokens else None  # (B, h, w, C)
    return x, S, patches


def uninstall(model: nn.Module, blocks) -> nn.Module:
    """Undo :func:`install`: the original block back in ``blocks[-1]`` (same weights)."""
    blocks[-1] = blocks[-1].restore()
    del model.forward_with_similarity
    return model
