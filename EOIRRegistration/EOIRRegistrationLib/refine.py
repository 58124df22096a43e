"""Instance optimisation: refine a displacement for one pair by gradient descent.

Optimises a stationary velocity ``v`` on a grid ``1 / downsample`` of the working grid (Adam,
learning rate decaying along a cosine to 10 %, on a similarity + diffusion of ``v``; the
similarity is LNCC for one modality, or the mean squared difference of MIND-SSC descriptors for
two), integrates it by scaling and squaring, and composes the resulting
residual map with the starting displacement: ``u = u_init o (id + exp(v))`` — a composition of
diffeomorphisms, so a fold-free start stays fold-free up to discretisation. Works in the spatial
core's voxel convention on the working grid.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from . import losses, spatial


SIMILARITIES = ("lncc", "mind")
# Diffusion weight per similarity. LNCC: 0.5 measured best on real brain pairs (T1 vs T1-like,
# 2 mm working grid: Dice +0.01 over 2.0, 0 % folding; 0.25 starts folding). MIND: its term is
# several times smaller than LNCC's for the same misalignment, so is its weight.
DEFAULT_REGULARIZATION = {"lncc": 0.5, "mind": 0.2}
# On by default: on the real brain pairs of benchmarks/bench_brain.py, 10 steps at lr 0.4 after
# the network reached the Dice of 30-50 steps at 0.2-0.4 (+0.06 over the network alone) in
# 1.6 s on 2 CPU threads; more steps changed nothing there.
DEFAULT_ITERATIONS = 10
# Without the network (two contrasts) the refinement starts from the initial alignment and has
# the whole deformation to find: T1 against T2-like brains, MIND-SSC, Dice 0.62 / 0.67 / 0.678 /
# 0.683 / 0.683 after 10 / 20 / 30 / 50 / 100 steps (30: about 11 s on 2 CPU threads).
DEFAULT_ITERATIONS_ALONE = 30


class Adam:
    """Adam (Kingma & Ba) for one tensor, as ``torch.optim.Adam`` with default betas and eps.
    Written out because the first ``torch.optim`` step imports ``torch._dynamo``: a one-off
    second, as long as the whole default refinement."""

    def __init__(self, param: torch.Tensor, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.betas, self.eps, self.t = param, betas, eps, 0
        self.m, self.v = torch.zeros_like(param), torch.zeros_like(param)

    @torch.no_grad()
    def step(self, lr: float):
        b1, b2 = self.betas
        self.t += 1
        g = self.param.grad
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-lr / (1 - b1 ** self.t))


@dataclass(frozen=True)
class RefineConfig:
    # None: chosen by the pipeline (``resolved``): DEFAULT_ITERATIONS after the network,
    # DEFAULT_ITERATIONS_ALONE without it; LNCC for one contrast, MIND-SSC for two.
    iterations: int | None = None
    learning_rate: float = 0.4      # voxels of the optimisation grid per step (Adam)
    similarity: str | None = None   # "lncc" (one contrast) or "mind" (MIND-SSC, any two)
    regularization_weight: float | None = None  # None: DEFAULT_REGULARIZATION[similarity]
    window: int = 7                  # LNCC box window, working-grid voxels
    downsample: int = 2              # velocity grid = working grid / this (1 = full)
    integration_steps: int = 5       # 2^5 scaling: residual velocities stay within a few voxels
    time_budget_s: float | None = None  # stop early when exceeded

    def resolved(self, after_network: bool = True, same_contrast: bool = True) -> RefineConfig:
        """A copy with the pipeline's choices in place of None."""
        return replace(
            self,
            iterations=(self.iterations if self.iterations is not None
                        else DEFAULT_ITERATIONS if after_network else DEFAULT_ITERATIONS_ALONE),
            similarity=(self.similarity if self.similarity is not None
                        else "lncc" if same_contrast else "mind"))


def refine_displacement(fixed: torch.Tensor, moving: torch.Tensor,
                        initial: torch.Tensor | None = None, cfg: RefineConfig | None = None,
                        progress=None, cancel=None) -> torch.Tensor:
    """Refined voxel displacement ``(1, 3, *S)`` on the working grid of ``fixed``/``moving``."""
    cfg = (cfg or RefineConfig()).resolved()
    if cfg.similarity not in SIMILARITIES:
        raise ValueError(f"unknown refinement similarity {cfg.similarity!r}; choose one of "
                         f"{', '.join(SIMILARITIES)}")
    reg_weight = (DEFAULT_REGULARIZATION[cfg.similarity] if cfg.regularization_weight is None
                  else cfg.regularization_weight)
    shape = fixed.shape[2:]
    if initial is None:
        initial = fixed.new_zeros(1, 3, *shape)
    coarse = [max(2, s // cfg.downsample) for s in shape]
    v = torch.zeros(1, 3, *coarse, dtype=fixed.dtype, device=fixed.device, requires_grad=True)
    opt = Adam(v)
    initial = initial.detach()
    with torch.no_grad():
        # Smooth images once so LNCC gradients reach a few voxels.
        fixed_s = spatial.gaussian_blur(fixed, 0.5)
        # The moving image seen through the start, resampled once: warping it by the residual
        # map r gives moving(y + initial(y)) at y = x + r(x), which is the moving image warped
        # by compose(initial, r) (up to one more interpolation), at a third of the cost.
        moving_s = spatial.warp(spatial.gaussian_blur(moving, 0.5), initial)
        if cfg.similarity == "mind":  # descriptors once; the moving ones are warped (12 channels)
            fixed_s, moving_s = losses.mind_ssc(fixed_s), losses.mind_ssc(moving_s)
            similarity = lambda w: losses.mse_loss(fixed_s, w)
        else:
            similarity = losses.LNCCToFixed(fixed_s, cfg.window)
    start = time.perf_counter()

    def residual(v_):
        return spatial.resize_displacement(spatial.integrate_velocity(v_, cfg.integration_steps),
                                           shape)

    for it in range(cfg.iterations):
        if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
            break
        if cfg.time_budget_s is not None and time.perf_counter() - start > cfg.time_budget_s:
            break
        warped = spatial.warp(moving_s, residual(v))
        loss = similarity(warped) + reg_weight * losses.diffusion_loss(v)
        v.grad = None
        loss.backward()
        # cosine decay to 10 %: the early steps move, the late ones settle
        opt.step(cfg.learning_rate * (0.1 + 0.45 * (1 + math.cos(math.pi * it / cfg.iterations))))
        if progress is not None and it % 10 == 0:
            progress(it / cfg.iterations)
    with torch.no_grad():
        return spatial.compose(initial, residual(v))
