"""``register(fixed, moving, model)``: two SimpleITK images in, a physical displacement field out.

Geometry at each step (see ``geometry.py`` for the conventions):

1. Both images are resampled (linear, ITK rules) into a *working grid* in the fixed image's
   frame: same direction and centre, the model card's spacing, each size padded to the model's
   size multiple (16 for 5 levels). The moving image is read through physical space, so it may
   have any size, spacing, origin and direction.
2. Intensities are normalised to [0, 1] as the card says (or by a given window). The contrast
   test (``contrast.py``) runs here, on the working grid: for two contrasts the network of a
   one-contrast model is skipped and the refinement (MIND-SSC) registers from the initial
   alignment (a contrast-agnostic model keeps its network, followed by MIND-SSC refinement).
3. The network returns a voxel displacement on the working grid (array order). It becomes LPS mm
   on the working grid (``d = direction @ diag(spacing) @ reversed(u)``), then is interpolated
   (linear, border values) onto the fixed image's own grid.
4. Outputs on the fixed grid: the displacement (LPS mm, **resampling direction**: fixed point x
   maps to moving point x + d(x); what ``sitk.DisplacementFieldTransform`` takes), the moving
   image warped through it (ITK's linear rules), the physical Jacobian determinant, the folding
   mask (det <= 0) and labels warped by nearest neighbour.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from . import alignment, contrast as contrast_test, geometry, metrics, spatial
from .devices import is_out_of_memory, resolve_device
from .errors import DeviceError, InputError, RegistrationCancelled
from .intensity import normalize, window_of
from .modelfile import LoadedModel, resolve_model
from .refine import DEFAULT_ITERATIONS_ALONE, RefineConfig, refine_displacement

ProgressCallback = Callable[[str, float], None]
STAGES = ("loading model", "preparing images", "registering", "refining", "resampling",
          "quality figures")


@dataclass
class RegistrationResult:
    displacement: sitk.Image        # vector float64, fixed grid, LPS mm, fixed -> moving point
    warped: sitk.Image              # float32, fixed grid
    jacobian: sitk.Image            # float32 determinant, fixed grid
    folding: sitk.Image             # uint8, 1 where det <= 0
    warped_labels: sitk.Image | None
    qa: dict                        # folding_percent, sdlogj, jacobian_min, jacobian_max
    timings: dict = field(default_factory=dict)  # stage -> seconds
    model_name: str = ""
    device: str = ""
    working_grid: geometry.Grid | None = None
    initial_matrix: np.ndarray | None = None  # 4x4 LPS, fixed point -> moving point (included)
    initial_alignment: str = "none"  # method that produced it ("auto" resolved; "given")
    network: bool = True            # False: the refinement alone (register(network=False))
    contrast: str = "same"          # "same" or "different" ("auto" resolved)
    contrast_correlation: float = float("nan")  # the figure "auto" decides on (contrast.py)
    refine: RefineConfig | None = None  # the refinement that ran (defaults resolved)

    @property
    def method(self) -> str:
        """One line: which contrast path ran and why, e.g. "different contrasts (intensity
        correlation -0.24): MIND-SSC refinement alone, 40 steps"."""
        r = self.contrast_correlation
        why = "" if np.isnan(r) else f" (intensity correlation {r:.2f})"
        steps = ("no refinement" if self.refine is None else
                 f"{'MIND-SSC' if self.refine.similarity == 'mind' else 'LNCC'} refinement"
                 f"{'' if self.network else ' alone'}, {self.refine.iterations} steps")
        head = "same contrast" if self.contrast == "same" else "different contrasts"
        return f"{head}{why}: {'network + ' if self.network else ''}{steps}"


def check_image(image, role: str, labels: bool = False) -> sitk.Image:
    """Refuse inputs the engine cannot register, with the reason."""
    if not isinstance(image, sitk.Image):
        raise InputError(f"{role} must be a SimpleITK image, got {type(image).__name__}")
    if image.GetDimension() != 3:
        raise InputError(f"{role} is {image.GetDimension()}D with size {image.GetSize()}; "
                         "EOIRRegistration registers 3D volumes (extract one 3D volume first)")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{role} has {image.GetNumberOfComponentsPerPixel()} components per "
                         "voxel; a scalar volume is required")
    if min(image.GetSize()) < 2:
        raise InputError(f"{role} has size {image.GetSize()}; every axis needs at least 2 voxels")
    if min(image.GetSpacing()) <= 0:
        raise InputError(f"{role} has non-positive spacing {image.GetSpacing()}")
    if abs(abs(np.linalg.det(np.reshape(image.GetDirection(), (3, 3)))) - 1) > 1e-3:
        raise InputError(f"{role} has a direction matrix that is not a rotation/reflection")
    arr = sitk.GetArrayViewFromImage(image)
    if not labels:
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise InputError(f"{role} contains NaN or infinite values")
        if float(arr.min()) == float(arr.max()):
            raise InputError(f"{role} is constant (every voxel is {float(arr.min())}): "
                             "nothing to register")
    elif arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise InputError(f"{role} contains NaN or infinite values")
    return image


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


def _to_working(image: sitk.Image, values: torch.Tensor, grid: geometry.Grid,
                affine=None) -> torch.Tensor:
    """``values`` (the image as a tensor) resampled onto the working grid, through ``affine``."""
    coords = geometry.array_coords_of(grid, geometry.Grid.from_image(image), affine=affine)
    return geometry.sample_like_itk(values, coords)


def _include_affine(disp: torch.Tensor, grid: geometry.Grid, a: np.ndarray) -> torch.Tensor:
    """Displacement of x -> A (x + d(x)) on ``grid``: A_lin d(x) + (A_lin - I) x + t."""
    lin = torch.as_tensor(a[:3, :3], dtype=disp.dtype)
    out = torch.einsum("ab,b...->a...", lin, disp)
    # (A_lin - I) x + t at every voxel, with x = M p + o (M, o from the grid's array matrix).
    m = grid.array_to_physical()
    affine_part = (a[:3, :3] - np.eye(3)) @ m[:3, :3]
    offset = (a[:3, :3] - np.eye(3)) @ m[:3, 3] + a[:3, 3]
    p = spatial.identity_grid(grid.shape, dtype=torch.float64)
    out += (torch.einsum("ab,b...->a...", torch.as_tensor(affine_part), p)
            + torch.as_tensor(offset).view(3, 1, 1, 1)).to(disp.dtype)
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
                "other programs or use a coarser working spacing") from exc
        torch.cuda.empty_cache()
        if requested != "auto":
            raise DeviceError(
                f"the GPU ran out of memory {stage} a {tuple(shape)} working grid; use device "
                "'cpu' or 'auto' (falls back to the CPU), or a coarser working spacing") from exc
        if stages.progress:
            stages.progress(f"{stage} (GPU out of memory: retrying on the CPU)",
                            STAGES.index(stage) / len(STAGES))
        cpu = torch.device("cpu")
        return run(cpu), cpu


def register(fixed: sitk.Image, moving: sitk.Image, model="default", device: str = "auto",
             moving_labels: sitk.Image | None = None, working_spacing=None,
             intensity_window=None,
             refine: RefineConfig | int | None = RefineConfig(),
             initial_alignment: str = "auto", initial_transform=None,
             contrast: str = "auto", network: bool | None = None,
             progress: ProgressCallback | None = None, cancel=None) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; see the module docstring for the geometry.

    model: bundled model name, model file path, or a ``LoadedModel``. device: auto/cpu/cuda.
    working_spacing: mm (x, y, z) overriding the card's. intensity_window: ((fixed_low,
    fixed_high), (moving_low, moving_high)) in image units overriding the card's normalisation.
    initial_alignment: "auto" (affine unless the inputs are already aligned), "none", "com"
    (centres of mass), "rigid" or "affine" (mutual information on a coarse grid); initial_transform: a linear SimpleITK
    transform or 4x4 LPS matrix mapping fixed points to moving points (overrides the method).
    The returned displacement contains this linear part: x -> A (x + d_net(x)).
    contrast: "same" (one contrast: the network, then LNCC refinement), "different" (two
    contrasts, e.g. T1 and T2: the MIND-SSC refinement alone, as the bundled models are
    single-contrast) or "auto" (default: decided from the images after the initial alignment,
    see ``contrast.py``); the result says which and on what figure.
    refine: a RefineConfig or a number of iterations of per-pair optimisation (instance
    optimisation; None or 0 = off). Its fields left None follow the contrast: 10 iterations
    after the network, 40 without (``refine.DEFAULT_ITERATIONS[_ALONE]``); LNCC for one
    contrast, MIND-SSC for two.
    network: None follows the contrast (on for "same", whenever the refinement is off, and for
    a contrast-agnostic model: an EOIR on MIND-SSC inputs, ``input_features="mind"``); False
    forces the refinement alone (needs refine > 0), True the network.
    progress(stage, fraction) is called at each stage; cancel (threading.Event or callable) is
    polled between stages and raises RegistrationCancelled.
    """
    stages = _Stages(progress, cancel)
    if isinstance(refine, int):
        refine = RefineConfig(iterations=refine) if refine > 0 else None
    if refine is not None and refine.iterations is not None and refine.iterations <= 0:
        refine = None
    if contrast not in contrast_test.CONTRASTS:
        raise InputError(f"unknown contrast {contrast!r}; choose one of "
                         f"{', '.join(contrast_test.CONTRASTS)}")
    alone = ("without the network the refinement is the whole registration: give it "
             f"iterations (e.g. {DEFAULT_ITERATIONS_ALONE})")
    if refine is None and network is False:
        raise InputError(alone)
    check_image(fixed, "fixed image")
    check_image(moving, "moving image")
    if moving_labels is not None:
        check_image(moving_labels, "moving label map", labels=True)

    stages.start("loading model")
    dev = resolve_device(device)
    loaded = resolve_model(model)
    agnostic = loaded.model.contrast_agnostic
    if refine is None and network is None and contrast == "different" and not agnostic:
        raise InputError(alone + "; or use a contrast-agnostic model")
    spacing = tuple(working_spacing) if working_spacing is not None else loaded.working_spacing

    stages.start("preparing images")
    a, alignment_used = alignment.initial_alignment(fixed, moving, initial_alignment,
                                                    initial_transform)
    affine = None if np.allclose(a, np.eye(4)) else a
    fixed_grid = geometry.Grid.from_image(fixed)
    wgrid = geometry.working_grid(fixed_grid, spacing, multiple=loaded.model.size_multiple)
    # Each image is converted to a tensor once; the moving one is reused for the final warp.
    fixed_t, moving_t = geometry.image_to_tensor(fixed), geometry.image_to_tensor(moving)
    tensors = []
    for k, (image, values, role) in enumerate(((fixed, fixed_t, "fixed"),
                                               (moving, moving_t, "moving"))):
        window = (tuple(intensity_window[k]) if intensity_window is not None
                  else window_of(values, loaded.normalization))
        if not window[1] > window[0]:
            raise InputError(f"the {role} image's intensity window {window} is empty (high must "
                             "exceed low); most voxels may share one value")
        tensors.append(normalize(_to_working(image, values, wgrid,
                                             affine if role == "moving" else None), window))
    fixed_w, moving_w = tensors
    del fixed_t
    contrast, correlation = contrast_test.decide(contrast, fixed_w, moving_w)
    if network is None:
        network = contrast == "same" or refine is None or agnostic
    if refine is not None:
        refine = refine.resolved(after_network=network, same_contrast=contrast == "same")

    shape = fixed_w.shape[2:]
    if network:
        stages.start("registering")
        u, dev = _with_cpu_fallback(lambda d: run_network(loaded, fixed_w, moving_w, d), dev,
                                    str(device), stages, "registering", shape)
    else:
        u = fixed_w.new_zeros(1, 3, *shape)
    if refine is not None:
        stages.start("refining")
        span = (STAGES.index("refining") / len(STAGES), 1 / len(STAGES))
        on_step = (lambda f: progress("refining", span[0] + f * span[1])) if progress else None

        def run_refinement(d):  # on the network's device; the result comes back to the CPU
            with torch.enable_grad():
                return refine_displacement(fixed_w.to(d), moving_w.to(d), u.to(d), refine,
                                           progress=on_step, cancel=cancel).cpu()

        u, dev = _with_cpu_fallback(run_refinement, dev, str(device), stages, "refining", shape)
        if _cancelled(cancel):
            raise RegistrationCancelled("registration cancelled while refining")
    del fixed_w, moving_w

    stages.start("resampling")
    # Working-grid voxel displacement (array order) -> LPS mm on the working grid.
    to_lps = torch.as_tensor(wgrid.array_to_physical()[:3, :3], dtype=torch.float32)
    d_work = torch.einsum("ab,b...->a...", to_lps, u[0])
    del u
    # ... -> interpolated at the fixed grid's voxels (border values beyond the working grid).
    coords = geometry.array_coords_of(fixed_grid, wgrid)
    disp = spatial.sample(d_work[None], coords, mode="linear", padding="border")[0]
    del d_work, coords
    if affine is not None:
        disp = _include_affine(disp, fixed_grid, affine)
    moving_grid = geometry.Grid.from_image(moving)
    coords = geometry.array_coords_of(fixed_grid, moving_grid, displacement=disp)
    warped = geometry.sample_like_itk(moving_t, coords)[0, 0]
    del coords, moving_t
    warped_labels = None
    if moving_labels is not None:
        label_grid = geometry.Grid.from_image(moving_labels)
        coords = geometry.array_coords_of(fixed_grid, label_grid, displacement=disp)
        lab = geometry.sample_like_itk(geometry.image_to_tensor(moving_labels, torch.float64),
                                       coords, mode="nearest")[0, 0]
        del coords
        warped_labels = geometry.tensor_to_image(lab.round().numpy(), fixed_grid,
                                                 moving_labels.GetPixelID())

    stages.start("quality figures")
    det = metrics.jacobian_determinant(disp, fixed_grid)
    qa = metrics.jacobian_summary(det)
    result = RegistrationResult(
        displacement=geometry.displacement_to_image(disp, fixed_grid),
        warped=geometry.tensor_to_image(warped, fixed_grid),
        jacobian=geometry.tensor_to_image(det, fixed_grid),
        folding=geometry.tensor_to_image((det <= 0).to(torch.uint8), fixed_grid, sitk.sitkUInt8),
        warped_labels=warped_labels, qa=qa, model_name=loaded.name, device=str(dev),
        working_grid=wgrid, initial_matrix=a, initial_alignment=alignment_used, network=network,
        contrast=contrast, contrast_correlation=correlation, refine=refine)
    stages.done()
    result.timings = dict(stages.timings)
    return result
