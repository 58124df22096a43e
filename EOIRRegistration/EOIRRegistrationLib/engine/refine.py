"""The per-pair optimisation a run asks for: steps, time budget and similarity, from the options.

The optimisation itself is ``optimise.py`` (multi-scale, down to the fixed image's resolution),
with LNCC for one contrast and MIND-SSC descriptors for two. Until this version two contrasts ran
a single-scale MIND-SSC refinement of a stationary velocity on the 2 mm working grid (40 steps at
a random tenth of the voxels). On the three T2-like brain pairs of ``benchmarks/bench_brain.py``
(label Dice over every structure, registration seconds in one process, 2 threads) the
multi-scale MIND-SSC optimisation (``optimise.MIND_PRESETS``) reached 0.600 against its 0.585, in
14.2 s against 15.1 s, 0 % folding for both, SDlogJ 0.22 against 0.24 (twelve descriptor channels
at 1 mm take more memory), so it replaced it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from EOIRRegistrationLib.engine.options import RegistrationOptions


@dataclass(frozen=True)
class RefineConfig:
    iterations: int | None = None       # steps at the finest scale; None: the preset's
    similarity: str | None = None       # "lncc" (one contrast) or "mind"; None: by contrast
    time_budget_s: float | None = None  # stop early when exceeded

    def resolved(self, same_contrast: bool = True) -> RefineConfig:
        """A copy with the similarity chosen by the contrast when the options leave it None."""
        return replace(self, similarity=(self.similarity if self.similarity is not None
                                         else "lncc" if same_contrast else "mind"))


def config_from_options(options: RegistrationOptions) -> RefineConfig | None:
    """The optimisation the options ask for: None when ``refine_iterations`` is 0 (off: the
    network alone)."""
    if options.refine_iterations == 0:
        return None
    return RefineConfig(iterations=options.refine_iterations,
                        similarity=options.refine_similarity,
                        time_budget_s=options.refine_seconds)
