"""``register(fixed, moving, model)``: two SimpleITK images in, a physical displacement field out.

Geometry at each step (see ``geometry.py`` for the conventions):

1. Both images are resampled (linear, ITK rules) into a *working grid* in the fixed image's
   frame: same direction and centre, the model card's spacing, each size padded to the model's
   size multiple (16 for 5 levels). The moving image is read through physical space, so it may
   have any size, spacing, origin and direction.
2. Intensities are normalised to [0, 1] as the card says (or by a given window). The contrast
   test (``contrast.py``) runs here, on the working grid: it chooses the optimisation's
   similarity (LNCC for one contrast, MIND-SSC descriptors for two) and whether the network runs
   (``contrast.network_by_default``: alone when the optimisation is off).
3. The network returns a voxel displacement on the working grid (array order). It becomes LPS mm
   on the working grid (``d = direction @ diag(spacing) @ reversed(u)``), then is interpolated
   (linear, border values) onto the fixed image's own grid.
4. Outputs on the fixed grid: the displacement (LPS mm, **resampling direction**: fixed point x
   maps to moving point x + d(x); what ``sitk.DisplacementFieldTransform`` takes), the moving
   image warped through it (ITK's linear rules), the physical Jacobian determinant, the folding
   mask (det <= 0) and labels warped by nearest neighbour.
5. When asked for (``options.inverse``, or fixed labels given): the inverse on the moving grid
   (``inverse.py``: moving point y maps to fixed point y + d'(y)) and the fixed labels carried
   through it into the moving grid (nearest neighbour).

Masks (``masks.py``) restrict the similarity of the alignment and of the optimisation.
"""
from __future__ import annotations

import time
from functools import partial
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from EOIRRegistrationLib.core import geometry, metrics, qa
from EOIRRegistrationLib.core.errors import DeviceError, InputError, RegistrationCancelled
from EOIRRegistrationLib.core.intensity import normalize
from EOIRRegistrationLib.engine import alignment, checks, foreground, inverse, masks, memory, optimise, prepare
from EOIRRegistrationLib.engine import contrast as contrast_test
from EOIRRegistrationLib.engine.allocator import release_freed_memory
from EOIRRegistrationLib.engine.checks import check_image
from EOIRRegistrationLib.engine.devices import COARSER_SPACING, is_out_of_memory, resolve_device
from EOIRRegistrationLib.engine.modelfile import LoadedModel, resolve_model
from EOIRRegistrationLib.engine.options import (
    RegistrationOptions,
    options_of,
)
from EOIRRegistrationLib.engine.refine import config_from_options
from EOIRRegistrationLib.engine.result import RegistrationResult

ProgressCallback = Callable[[str, float], None]
#: fixed grids above this many voxels (a CT's 84M) give freed memory back between stages
LARGE_GRID_VOXELS = 1 << 24
STAGES = ("loading model", "preparing images", "registering", "refining", "resampling",
          "inverting", "quality figures")


def _cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if hasattr(cancel, "is_set"):
        return cancel.is_set()
    return bool(cancel())


class _Stages:
    """Progress reporting, cancel polling and per-stage timing in one place."""

    def __init__(self, progress: ProgressCallback | None, cancel):
        self.progress, self.cancel, self.timings = progress, cancel, {}
        self._name, self._t = None, 0.0

    @property
    def current(self) -> str | None:
        return self._name

    def start(self, name: str):
        self.finish()
        if _cancelled(self.cancel):
            raise RegistrationCancelled(f"registration cancelled before '{name}'")
        if self.progress:
            self.progress(name, STAGES.index(name) / len(STAGES))
        self._name, self._t = name, time.perf_counter()

    def finish(self):
        if self._name:
            self.timings[self._name] = round(time.perf_counter() - self._t, 3)
            self._name = None

    def done(self):
        self.finish()
        if self.progress:
            self.progress("done", 1.0)


def _level_images(p: prepare.Prepared, affine):
    """The optimisation's image makers: (grid, scale) -> the normalised fixed image, and the
    moving image through ``affine``, smoothed for the scale and sampled on the level grid."""
    def moving_at(grid, scale):
        return normalize(optimise.image_at(p.moving_c, p.moving_grid, grid, scale, affine),
                         p.windows[1])
    return partial(prepare.fixed_at, p), moving_at


def _working_mm(u: torch.Tensor, grid: geometry.Grid) -> torch.Tensor:
    """A voxel displacement ``(1, 3, *S)`` (array order) on ``grid`` in LPS mm."""
    to_lps = torch.as_tensor(grid.array_to_physical()[:3, :3], dtype=u.dtype)
    return torch.einsum("ab,b...->a...", to_lps, u[0])[None]


def _include_affine(disp: torch.Tensor, grid: geometry.Grid, a: np.ndarray,
                    inplace: bool = False) -> torch.Tensor:
    """Displacement of x -> A (x + d(x)) on ``grid``: A_lin d(x) + (A_lin - I) x + t; slab by
    slab, into ``disp`` itself when ``inplace``. The second term is affine in the voxel index,
    so it is added as three lines along the axes (``geometry.index_lines``): 6.5x faster than
    the positions' grid and two matrix products on a brain, the same values to 1e-6 mm."""
    out = disp if inplace else torch.empty_like(disp)
    m = grid.array_to_physical()  # array index (k, j, i) -> LPS mm
    linear_part = (a[:3, :3] - np.eye(3)) @ m[:3, :]  # (A_lin - I) (M p + o) + t, a row per
    linear_part[:, 3] += a[:3, 3]                      # LPS axis, over the index p
    lines = [geometry.index_lines(row, grid.shape, disp.dtype) for row in linear_part]
    slab_values = None
    for k0, k1, _ in geometry.slabs(grid):
        d = disp[:, k0:k1]
        if slab_values is None or slab_values.shape != d.shape:
            slab_values = torch.empty_like(d)
        for c in range(3):
            v = torch.mul(d[0], float(a[c, 0]), out=slab_values[c])
            v.add_(d[1], alpha=float(a[c, 1])).add_(d[2], alpha=float(a[c, 2]))
            k, j, i = lines[c]
            v.add_(k[k0:k1] + j).add_(i)  # the (k, j) plane first: two full passes
        out[:, k0:k1] = slab_values
    return out


def _sample_through(values: torch.Tensor, source: geometry.Grid, target: geometry.Grid,
                    disp: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """``values (1, 1, *source.shape)`` read at x + disp(x) for every voxel x of ``target``
    (ITK's rules, ``geometry.sample_through_like_itk``), slab by slab: ``(*target.shape)``."""
    out = torch.empty(target.shape, dtype=values.dtype)
    for k0, k1, slab in geometry.slabs(target):
        out[k0:k1] = geometry.sample_through_like_itk(values, source, slab,
                                                      displacement=disp[:, k0:k1], mode=mode)[0, 0]
    return out


def run_network(loaded: LoadedModel, fixed: torch.Tensor, moving: torch.Tensor,
                device: torch.device) -> torch.Tensor:
    """Network forward on ``device``; returns the voxel displacement on the CPU."""
    model = loaded.model.to(device)
    # no_grad rather than inference_mode: the output may seed refinement, which needs autograd.
    with torch.no_grad():
        if device.type == "cpu":
            model = model.to(memory_format=torch.channels_last_3d)
        u = model(fixed.to(device), moving.to(device))
    return u.float().cpu()


def _labels_through(labels: sitk.Image, target: geometry.Grid, disp: torch.Tensor) -> sitk.Image:
    """``labels`` (any grid) read at ``x + disp(x)`` for every voxel x of ``target``, by nearest
    neighbour, on ``target`` in the labels' pixel type."""
    # float32 holds every integer label below 2^24 exactly, at half float64's memory
    extremes = sitk.MinimumMaximumImageFilter()
    extremes.Execute(labels)
    big = max(abs(extremes.GetMinimum()), abs(extremes.GetMaximum())) >= 2 ** 24
    values = geometry.image_to_tensor(labels, torch.float64 if big else torch.float32)
    lab = _sample_through(values, geometry.Grid.from_image(labels), target, disp, "nearest")
    return geometry.tensor_to_image(lab.round().numpy(), target, labels.GetPixelID())


def _with_cpu_fallback(run, device, requested: str, stages, stage: str, shape):
    """``run(device)`` and the device it ran on; when a GPU runs out of memory and ``requested``
    is "auto", ``run`` again on the CPU; other out-of-memory cases are clear DeviceErrors."""
    try:
        return run(device), device
    except Exception as exc:
        if not is_out_of_memory(exc):
            raise
        if device.type != "cuda":
            raise DeviceError(
                f"the computer ran out of memory {stage} a {tuple(shape)} working grid; close "
                f"other programs or use {COARSER_SPACING}") from exc
        torch.cuda.empty_cache()
        if requested != "auto":
            raise DeviceError(
                f"the GPU ran out of memory {stage} a {tuple(shape)} working grid; use device "
                f"'cpu' or 'auto' (falls back to the CPU), or {COARSER_SPACING}") from exc
        if stages.progress:
            stages.progress(f"{stage} (GPU out of memory: retrying on the CPU)",
                            STAGES.index(stage) / len(STAGES))
        cpu = torch.device("cpu")
        return run(cpu), cpu


def register(fixed: sitk.Image, moving: sitk.Image, options: RegistrationOptions | None = None,
             *, moving_labels: sitk.Image | None = None, fixed_labels: sitk.Image | None = None,
             fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None,
             loaded_model: LoadedModel | None = None,
             progress: ProgressCallback | None = None, cancel=None,
             **option_changes) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; see the module docstring for the geometry.

    options: every choice of the run (``engine/options.py``); keyword ``option_changes`` (e.g.
    ``contrast="same"``) are applied on top of it. moving_labels: a label map of the moving
    image, warped by nearest neighbour onto the fixed grid. fixed_labels: a label map of the
    fixed image, carried into the moving grid through the inverse (which it implies).
    fixed_mask / moving_mask: where the similarity may match the images (nonzero voxels, any
    grid; ``masks.py``). loaded_model: an already loaded model, used instead of
    loading ``options.model`` (a cohort loads it once). progress(stage, fraction) is called at
    each stage; cancel (threading.Event or callable) is polled between stages and raises
    RegistrationCancelled.
    """
    options = options_of(options, **option_changes)
    check_image(fixed, "fixed image")
    check_image(moving, "moving image")
    warnings = []
    if moving_labels is not None:
        check_image(moving_labels, "moving label map", labels=True)
        warnings += checks.check_labels_on(moving_labels, moving, "moving label map",
                                           "moving image")
    if fixed_labels is not None:
        check_image(fixed_labels, "fixed label map", labels=True)
    for mask, role, image, image_role in ((fixed_mask, "fixed mask", fixed, "fixed image"),
                                          (moving_mask, "moving mask", moving, "moving image")):
        if mask is not None:
            masks.check_mask(check_image(mask, role, labels=True), role)
            # off its image it would leave nothing to match (ITK's alignment raised on it)
            warnings += checks.check_labels_on(mask, image, role, image_role)
    threads = torch.get_num_threads()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    stages = _Stages(progress, cancel)
    try:
        return _register(fixed, moving, options, (moving_labels, fixed_labels),
                         (fixed_mask, moving_mask), loaded_model, stages, warnings)
    except (RuntimeError, MemoryError) as exc:  # the stages outside _with_cpu_fallback
        if not is_out_of_memory(exc):
            raise
        raise DeviceError(f"the computer ran out of memory ({stages.current or 'registering'}); "
                          f"close other programs or use {COARSER_SPACING}") from exc
    finally:
        torch.set_num_threads(threads)


def _release_if_large(grid: geometry.Grid) -> None:
    """Freed memory back to the system on grids above ``LARGE_GRID_VOXELS`` (a CT): the next
    stage's fields would otherwise come on top of it (``allocator.py``)."""
    if np.prod(grid.shape) > LARGE_GRID_VOXELS:
        release_freed_memory()


def _alignment_words(chosen: alignment.Alignment) -> str:
    """How the images were placed, for the overlap messages."""
    if chosen.method == "none":
        return ("as given (no initial alignment)" if not chosen.note
                else "as given (the automatic alignment kept them in place)")
    return f"after the initial alignment ({chosen.method})"


def _register(fixed, moving, options: RegistrationOptions, labels, given_masks, loaded, stages,
              warnings):
    progress, cancel = stages.progress, stages.cancel
    moving_labels, fixed_labels = labels
    refine = config_from_options(options)
    network = options.network
    stages.start("loading model")
    dev = resolve_device(options.device)
    loaded = loaded or resolve_model(options.model)
    agnostic = loaded.model.contrast_agnostic
    if refine is None and network is None and options.contrast == "different" and not agnostic:
        raise InputError("for two contrasts the optimisation is the whole registration (the "
                         "network is single-contrast): give it steps (leave --refine out for the "
                         "preset's); or use a contrast-agnostic model")
    spacing = options.working_spacing or loaded.working_spacing
    memory.check_grids(fixed, moving, spacing, loaded.model.size_multiple, options.preset,
                       options.inverse or fixed_labels is not None)

    stages.start("preparing images")
    level_scales = () if refine is None else optimise.schedule_of(options.preset).scales_mm
    p, chosen = prepare.prepared_and_aligned(fixed, moving, options, loaded, spacing, level_scales,
                                             [masks.binary(m) for m in given_masks])
    a, how = chosen.matrix, _alignment_words(chosen)
    warnings += [chosen.warning] if chosen.warning else []
    warnings += checks.check_overlap(fixed, moving, a, how)
    if moving_labels is not None:
        warnings += checks.check_labels_on(moving_labels, fixed, "moving label map",
                                           "fixed image", a, how)
    affine = None if np.allclose(a, np.eye(4)) else a
    fixed_grid, moving_grid, wgrid, region, box = p.fixed_grid, p.moving_grid, p.wgrid, p.region, p.box
    moving_t, fixed_w = p.moving_t, p.fixed_w
    moving_w = normalize(prepare.on_working_grid(p.moving_c, moving_grid, wgrid, affine),
                         p.windows[1])
    contrast, correlation = contrast_test.decide(options.contrast, fixed_w, moving_w)
    if network is None:
        network = contrast_test.network_by_default(refine, contrast, agnostic)
    if refine is not None:
        refine = refine.resolved(same_contrast=contrast == "same")

    shape = fixed_w.shape[2:]
    requested = options.device
    if network:
        stages.start("registering")
        u, dev = _with_cpu_fallback(partial(run_network, loaded, fixed_w, moving_w), dev,
                                    requested, stages, "registering", shape)
        _release_if_large(fixed_grid)  # the network's feature maps, before the optimisation
    else:
        u = fixed_w.new_zeros(1, 3, *shape)
    refinement = None
    disp = None
    if refine is not None:
        stages.start("refining")
        span = (STAGES.index("refining") / len(STAGES), 1 / len(STAGES))
        on_step = (lambda f: progress("refining", span[0] + f * span[1])) if progress else None
        schedule = optimise.schedule_of(options.preset, options.refine_iterations,
                                        refine.similarity)
        start = (_working_mm(u, wgrid), wgrid) if network else None
        level_images = _level_images(p, affine)
        disp, dev = _with_cpu_fallback(
            lambda d: optimise.optimise(*level_images, region, schedule, start=start,
                                        progress=on_step, cancel=cancel,
                                        time_budget_s=refine.time_budget_s,
                                        timings=stages.timings, device=d,
                                        masks=masks.level_masks(*given_masks, affine)),
            dev, requested, stages, "refining", region.shape)
        refinement = {"similarity": refine.similarity, "preset": options.preset,
                      "scales_mm": list(schedule.scales_mm),
                      "iterations": list(schedule.iterations)}
        finest = optimise.level_grid(region, schedule.scales_mm[-1])
        if finest != optimise.level_grid(region, schedule.scales_mm[-1], max_voxels=2 ** 62):
            # made coarser by optimise.MAX_LEVEL_VOXELS
            refinement["finest_grid_mm"] = [round(float(v), 3) for v in finest.spacing]
        if _cancelled(cancel):
            raise RegistrationCancelled("registration cancelled while refining")
    del fixed_w, moving_w, p

    _release_if_large(fixed_grid)  # the optimisation's buffers, before the full-size fields
    stages.start("resampling")
    if disp is None:  # the working grid's field -> LPS mm interpolated at the box's voxels
        disp = optimise.move_field(_working_mm(u, wgrid), wgrid, region)[0]
    del u
    disp = foreground.extend(disp, box[0], fixed_grid.shape)
    inverting = options.inverse or fixed_labels is not None
    deformable = disp  # the inverse inverts the matrix exactly, apart from the deformable part
    if affine is not None:
        disp = _include_affine(disp, fixed_grid, affine, inplace=not inverting)
    warped = _sample_through(moving_t, moving_grid, fixed_grid, disp)
    del moving_t
    warped_labels = None
    if moving_labels is not None:
        warped_labels = _labels_through(moving_labels, fixed_grid, disp)
        if (not sitk.GetArrayViewFromImage(warped_labels).any()
                and sitk.GetArrayViewFromImage(moving_labels).any()):
            warnings.append("the warped labels are empty: the deformation moved every "
                            "labelled voxel out of the fixed image's field of view")
    inverse_disp = inverse_qa = labels_in_moving = None
    if inverting:
        stages.start("inverting")
        inverse_disp, inverse_qa = inverse.invert(deformable, fixed_grid, moving_grid, affine)
        if fixed_labels is not None:
            labels_in_moving = _labels_through(fixed_labels, moving_grid, inverse_disp)
        inverse_disp = geometry.displacement_to_image(inverse_disp, moving_grid)
    del deformable

    stages.start("quality figures")
    det = metrics.jacobian_determinant(disp, fixed_grid)
    images = {"warped": geometry.tensor_to_image(warped, fixed_grid),
              "jacobian": geometry.tensor_to_image(det, fixed_grid),
              "folding": geometry.tensor_to_image((det <= 0).to(torch.uint8), fixed_grid,
                                                  sitk.sitkUInt8)}
    summary = qa.jacobian_summary(det.numpy())
    del warped, det
    # geometry.displacement_to_image in steps holding at most three float32 fields' worth at
    # once (a CT's: 1 GB each), the freed ones given back; the same float64 values
    channels = [sitk.GetImageFromArray(disp[c].numpy()) for c in range(3)]
    del disp
    vectors = sitk.Compose(channels)
    del channels
    _release_if_large(fixed_grid)
    images["displacement"] = fixed_grid.apply_to(sitk.Cast(vectors, sitk.sitkVectorFloat64))
    del vectors
    _release_if_large(fixed_grid)  # before the caller writes the outputs
    result = RegistrationResult(
        **images, warped_labels=warped_labels, qa=summary, options=options,
        model_name=loaded.name, device=str(dev), working_size=tuple(wgrid.size),
        working_spacing=tuple(wgrid.spacing), initial_matrix=a,
        initial_alignment=chosen.method, initial_alignment_note=chosen.note,
        network=network, contrast=contrast, contrast_correlation=correlation,
        refinement=refinement, warnings=list(warnings), inverse_displacement=inverse_disp,
        fixed_labels_in_moving=labels_in_moving, inverse_qa=inverse_qa,
        masks=tuple(role for role, m in zip(("fixed", "moving"), given_masks) if m is not None))
    stages.done()
    result.timings = dict(stages.timings)
    return result
