"""GeoReg's building blocks (``georeg.py`` assembles them): neighbourhoods on a grid, gathering,
masked softmax, Fourier features, the residual encoder, the memory-lean cross-attention and the
two steps built on it (``RefineStep``: tau, ``InterpolationStep``: delta). Conventions and memory
techniques: the docstring of ``georeg.py``."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def neighbour_offsets(k: int, device=None) -> torch.Tensor:
    """Integer offsets ``(k^3, 3)`` of a ``k^3`` neighbourhood relative to its base point:
    ``-(k//2) .. k//2`` for odd ``k`` (base = nearest point), ``-(k//2 - 1) .. k//2`` for even
    ``k`` (base = floor). Row order is C order over (axis 0, axis 1, axis 2)."""
    lo = -(k // 2) if k % 2 else -(k // 2 - 1)
    r = torch.arange(lo, lo + k, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


def neighbourhood(pos: torch.Tensor, k: int, shape) -> tuple[torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """The ``k^3`` grid neighbours of continuous voxel positions ``pos (B, n, 3)`` on a grid of
    ``shape (D, H, W)``.

    Returns ``(index, valid, base)``: ``index (B, n, k^3)`` int64 flat C-order indices computed as
    *base index + offset*, ``valid (B, n, k^3)`` bool (False for neighbours outside the grid;
    their index is replaced by an in-grid index so any gather stays in bounds and the caller must
    mask them), ``base (B, n, 3)`` float grid coordinates of the base point (no gradient). The base
    is the nearest point for odd ``k``, the floor for even ``k``; only for points so far outside
    that the neighbourhood would miss the grid is it clamped (to ``[-max offset, size - 1 - min
    offset]``), so every point keeps at least one valid neighbour.
    """
    if pos.dim() != 3 or pos.shape[-1] != 3:
        raise ValueError(f"neighbourhood: pos must be (B, n, 3), got {tuple(pos.shape)}")
    d, h, w = (int(s) for s in shape)
    p = pos.detach().float()
    base = torch.round(p) if k % 2 else torch.floor(p)
    lo = -(k // 2) if k % 2 else -(k // 2 - 1)
    size = torch.tensor([d, h, w], device=pos.device)
    base = torch.minimum(base.clamp_min(float(-(lo + k - 1))), (size - 1 - lo).to(base.dtype))
    ib = base.long()
    offs = neighbour_offsets(k, pos.device)
    nb = ib.unsqueeze(-2) + offs                                   # (B, n, K, 3)
    valid = ((nb >= 0) & (nb < size)).all(-1)
    base_flat = (ib[..., 0] * h + ib[..., 1]) * w + ib[..., 2]     # (B, n)
    off_flat = (offs[:, 0] * h + offs[:, 1]) * w + offs[:, 2]      # (K,)
    index = base_flat.unsqueeze(-1) + off_flat                     # base index + offset
    # Padded neighbours: any in-grid row (the result is masked out); clamping the flat index
    # keeps it in bounds even when the base itself lies outside.
    index = torch.where(valid, index, index.clamp(0, d * h * w - 1))
    return index, valid, base


def gather_neighbours(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows of ``flat (B, M, C)`` at ``index (B or 1, n, K)`` -> ``(B, n, K, C)``.

    One ``index_select`` on the ``(B * M, C)`` view with a per-batch offset: no unfold copy of
    the grid, and autograd keeps only the index for the backward pass."""
    b, m, c = flat.shape
    if index.shape[0] != b:
        index = index.expand(b, *index.shape[1:])
    offset = (torch.arange(b, device=flat.device) * m).view(b, 1, 1)
    rows = flat.reshape(b * m, c).index_select(0, (index + offset).reshape(-1))
    return rows.view(*index.shape, c)


def masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with invalid entries removed (weight exactly 0): a boolean mask
    and ``-inf``, never an additive float mask. Needs >= 1 valid entry per row."""
    if valid.dtype != torch.bool:
        raise TypeError(f"masked_softmax: valid must be a bool mask, got {valid.dtype}")
    return torch.softmax(logits.float().masked_fill(~valid, float("-inf")), dim=-1)


def fourier_angles(r: torch.Tensor, matrix: torch.Tensor,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``2 pi r B^T`` for positions ``r (..., 3)`` (voxels) and ``B (F, 3)``, in ``dtype``
    (float32 or float64), never under autocast: positions must not pass through bf16."""
    with torch.autocast(device_type=r.device.type, enabled=False):
        return (2.0 * math.pi) * torch.matmul(r.to(dtype), matrix.to(dtype).t())


def fourier_sincos(pos: torch.Tensor, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sin``, ``cos`` of ``2 pi B pos`` as float32 ``(..., F)``. The angle is formed in float64
    because ``pos`` may be an absolute position (hundreds of voxels): only differences of such
    angles are ever used, and float32 would lose ~1e-4 rad of them."""
    t = fourier_angles(pos, matrix, torch.float64)
    return torch.sin(t).float(), torch.cos(t).float()


def flat(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) in any memory format -> contiguous (B, N, C)."""
    return x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1]).contiguous()


def unflat(x: torch.Tensor, shape) -> torch.Tensor:
    """(B, N, 3) -> (B, 3, *shape), contiguous."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *shape).contiguous()


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """x + ReLU(IN(conv3(ReLU(IN(conv3(x))))))."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv1 = nn.Conv3d(ch, ch, 3, padding=1)
        self.conv2 = nn.Conv3d(ch, ch, 3, padding=1)
        self.norm1 = nn.InstanceNorm3d(ch)
        self.norm2 = nn.InstanceNorm3d(ch)

    def forward(self, x):
        return x + F.relu(self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x))))))


class EncoderLevel(nn.Module):
    """(avg-pool x2 unless first) -> conv3 + ReLU to the level's width -> residual blocks."""

    def __init__(self, cin: int, cout: int, blocks: int, pool: bool):
        super().__init__()
        self.pool = pool
        self.stem = nn.Conv3d(cin, cout, 3, padding=1)
        self.norm = nn.InstanceNorm3d(cout)
        self.blocks = nn.Sequential(*(ResBlock(cout) for _ in range(blocks)))

    def forward(self, x):
        if self.pool:
            x = F.avg_pool3d(x, 2)
        return self.blocks(F.relu(self.norm(self.stem(x))))


class _Attention(nn.Module):
    """Shared pieces of tau and delta: one-head cross-attention from a point's feature to K
    gathered neighbours whose keys/values carry a Fourier encoding of the relative position,
    post-norm residual + FFN, and a tiny-initialised output MLP giving a 3-vector (voxels).

    Keys and values are ``K_j + W_k gamma(r_ij)`` and ``V_j + W_v gamma(r_ij)`` with
    ``gamma(r) = [sin(2 pi B r), cos(2 pi B r)]`` (F frequencies, no bias), ``r_ij`` = source
    position minus neighbour position. They are never built: the logit is
    ``q_i . K_j + (W_k^T q_i) . gamma(r_ij)`` and the value ``sum_j a_ij V_j + W_v sum_j a_ij
    gamma(r_ij)``. Moreover ``r_ij = s_i - t_j`` (a per-source and a per-neighbour position), so
    with ``phi = 2 pi B s``, ``psi = 2 pi B t`` and ``(gs, gc) = W_k^T q``::

        (W_k^T q) . gamma(r) = sum_f cos(psi_f) P_f + sin(psi_f) Q_f,
        P = gs sin(phi) + gc cos(phi),  Q = gc sin(phi) - gs cos(phi),
        sum_j a_j gamma(r_j) = [sin(phi) Sc - cos(phi) Ss, cos(phi) Sc + sin(phi) Ss],
        Sc = sum_j a_j cos(psi_j),  Ss = sum_j a_j sin(psi_j)

    (angle-difference identities, exact): only per-point and per-neighbour ``sin/cos`` exist.
    """

    def __init__(self, cq: int, ckv: int, fourier: int, ffn_ratio: int):
        super().__init__()
        c = cq
        self.channels, self.fourier = c, fourier
        self.norm_q = nn.LayerNorm(cq)
        self.norm_kv = nn.LayerNorm(ckv)
        self.q_proj = nn.Linear(cq, c)
        self.kv_proj = nn.Linear(ckv, 2 * c)   # [keys | values], applied on the grid
        self.pe_k = nn.Linear(2 * fourier, c, bias=False)
        self.pe_v = nn.Linear(2 * fourier, c, bias=False)
        self.out_proj = nn.Linear(c, c)
        self.norm1 = nn.LayerNorm(c)
        hidden = ffn_ratio * c
        self.ffn = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, c))
        self.norm2 = nn.LayerNorm(c)
        self.head = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        # Start near the identity transform.
        nn.init.normal_(self.head[-1].weight, std=1e-5)
        nn.init.zeros_(self.head[-1].bias)
        self.scale = 1.0 / math.sqrt(c)

    def project_grid(self, feats_flat: torch.Tensor) -> torch.Tensor:
        """Keys and values of grid features ``(B, M, C_in)`` -> ``(B, M, 2C)``, before gathering."""
        return self.kv_proj(self.norm_kv(feats_flat))

    def query(self, f: torch.Tensor) -> torch.Tensor:
        return self.q_proj(self.norm_q(f))

    def pe_coefficients(self, q, sphi, cphi):
        """``P``, ``Q`` (float32 ``(B, n, F)``) of the factored key encoding."""
        g = torch.matmul(q, self.pe_k.weight.to(q.dtype)).float()   # (B, n, 2F) = W_k^T q
        gs, gc = g[..., :self.fourier], g[..., self.fourier:]
        return gs * sphi + gc * cphi, gc * sphi - gs * cphi

    @staticmethod
    def pe_aggregate(sphi, cphi, sum_c, sum_s):
        """``sum_j a_j gamma(r_j)`` from ``Sc``, ``Ss`` -> ``(B, n, 2F)``."""
        return torch.cat([sphi * sum_c - cphi * sum_s, cphi * sum_c + sphi * sum_s], dim=-1)

    def finish(self, f: torch.Tensor, content: torch.Tensor, pe_agg: torch.Tensor) -> torch.Tensor:
        attn = content + self.pe_v(pe_agg.to(content.dtype))
        h = self.norm1(f + self.out_proj(attn))
        h = self.norm2(h + self.ffn(h))
        return self.head(h).float()

    # Broadcast multiply + sum: ~1.6x faster on CPU than batched (K, C) @ (C, 1) matmuls.
    @staticmethod
    def dot(q, gathered):
        """``(B, n, C) . (B, n, K, C)`` -> ``(B, n, K)``."""
        return (gathered * q.unsqueeze(-2)).sum(-1)

    @staticmethod
    def weighted_sum(a, gathered):
        """``sum_j a_j gathered_j``: ``(B, n, K), (B, n, K, C)`` -> ``(B, n, C)``."""
        return (a.to(gathered.dtype).unsqueeze(-1) * gathered).sum(-2)


def _tau_core(q, p_coef, q_coef, kv, index, valid, cpsi, spsi, offsets, scale: float):
    """Gather + attention of tau: ``(Sc, Ss, content, shift)``. Everything ``O(n K)`` lives in
    here. ``shift = sum_j (a_j - 1/|valid|) o_j`` (float32 ``(B, n, 3)``): the attention-weighted
    neighbour offset relative to the uniform (no-evidence) weighting."""
    c = q.shape[-1]
    kg, vg = gather_neighbours(kv, index).split([c, c], dim=-1)  # split: one cat in backward
    pe_logits = torch.matmul(p_coef, cpsi.t()) + torch.matmul(q_coef, spsi.t())
    logits = (_Attention.dot(q, kg).float() + pe_logits) * scale
    a = masked_softmax(logits, valid)
    v = valid.float()
    prior = v / v.sum(-1, keepdim=True)
    shift = torch.matmul(a - prior, offsets)
    return torch.matmul(a, cpsi), torch.matmul(a, spsi), _Attention.weighted_sum(a, vg), shift


def _delta_core(q, pq, table, index, valid, scale: float):
    """Gather + attention of delta: ``([Sc | Ss], content)``."""
    c = q.shape[-1]
    kg, pg, vg = gather_neighbours(table, index).split([c, pq.shape[-1], c], dim=-1)
    logits = (_Attention.dot(q, kg).float() + _Attention.dot(pq, pg).float()) * scale
    a = masked_softmax(logits, valid)
    return _Attention.weighted_sum(a, pg).float(), _Attention.weighted_sum(a, vg)


def _maybe_recompute(recompute: bool, fn, *args):
    """Run ``fn``; while training with ``recompute``, keep none of its ``O(n K)`` intermediates
    (the gathered neighbours above all) for the backward pass and recompute them there."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class RefineStep(_Attention):
    """tau at one level: ``dx_i`` for source points with features ``f (B, n, C)`` at positions
    ``x (B, n, 3)`` (voxels of the level) against projected moving-grid keys|values
    ``kv (B, M, 2C)``.

    The relative position ``x_i - (base_i + o_j)`` splits into the point's offset from its base
    point and the integer neighbour offset ``o_j``, so the neighbours' ``sin/cos`` are a fixed
    ``(k^3, F)`` table and the encoding costs ``O(n F)``."""

    def __init__(self, c: int, k: int, fourier: int, ffn_ratio: int):
        super().__init__(c, c, fourier, ffn_ratio)
        self.k = k
        # Keys start constant: uniform attention, so the attention shift starts at exactly 0
        # (the identity, like the tiny head). They get gradients from the first step on.
        with torch.no_grad():
            self.kv_proj.weight[:c].zero_()
        nn.init.zeros_(self.pe_k.weight)

    def forward(self, f, x, kv, shape, matrix, recompute: bool = False):
        index, valid, base = neighbourhood(x, self.k, shape)
        q = self.query(f)
        sphi, cphi = fourier_sincos(x - base, matrix)                     # (B, n, F)
        spsi, cpsi = fourier_sincos(neighbour_offsets(self.k, x.device), matrix)  # (K, F)
        p_coef, q_coef = self.pe_coefficients(q, sphi, cphi)
        offsets = neighbour_offsets(self.k, x.device).float()
        sum_c, sum_s, content, shift = _maybe_recompute(
            recompute, _tau_core, q, p_coef, q_coef, kv, index, valid, cpsi, spsi, offsets,
            self.scale)
        return shift + self.finish(f, content, self.pe_aggregate(sphi, cphi, sum_c, sum_s))


class InterpolationStep(_Attention):
    """delta from level l+1 (parents) to level l (children): a correction (voxels of level l) of
    the inherited child positions ``x_hat (B, n, 3)``, from child features ``f (B, n, C_l)``,
    child grid coordinates ``grid (1, n, 3)``, parent keys|values ``kv (B, N_{l+1}, 2C_l)`` and
    parent positions ``parent_pos (B, N_{l+1}, 3)`` expressed in voxels of level l.

    The parents' ``sin/cos`` are computed once per parent and gathered together with their keys
    and values in one ``index_select`` of ``[K | cos psi | sin psi | V]`` rows."""

    def __init__(self, c_child: int, c_parent: int, k: int, fourier: int, ffn_ratio: int):
        super().__init__(c_child, c_parent, fourier, ffn_ratio)
        self.k = k

    def forward(self, f, x_hat, grid, kv, parent_pos, parent_shape, matrix,
                recompute: bool = False):
        c, nf = self.channels, self.fourier
        # Child grid point g sits at (g + 0.5) / 2 - 0.5 on the parent grid (cell-centred).
        index, valid, _ = neighbourhood((grid + 0.5) * 0.5 - 0.5, self.k, parent_shape)
        b = f.shape[0]
        index = index.expand(b, *index.shape[1:])
        valid = valid.expand(b, *valid.shape[1:])
        spsi, cpsi = fourier_sincos(parent_pos, matrix)                   # (B, N_p, F)
        table = torch.cat([kv[..., :c], cpsi.to(kv.dtype), spsi.to(kv.dtype), kv[..., c:]], -1)
        q = self.query(f)
        sphi, cphi = fourier_sincos(x_hat, matrix)                        # (B, n, F)
        p_coef, q_coef = self.pe_coefficients(q, sphi, cphi)
        pq = torch.cat([p_coef, q_coef], dim=-1).to(table.dtype)
        sums, content = _maybe_recompute(recompute, _delta_core, q, pq, table, index, valid,
                                         self.scale)
        pe_agg = self.pe_aggregate(sphi, cphi, sums[..., :nf], sums[..., nf:])
        return self.finish(f, content, pe_agg)
