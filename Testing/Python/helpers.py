"""Small images on oblique, anisotropic grids for the tests (no external data)."""
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def rotation(a, b, c):
    return sitk.Euler3DTransform((0, 0, 0), a, b, c).GetMatrix()


def oblique_image(size=(28, 24, 20), spacing=(1.2, 0.9, 2.5), origin=(-10.0, 5.0, 3.0),
                  angles=(0.2, -0.1, 0.3), seed=0, smooth=True):
    """Random smooth image (ITK size order) with the given oblique geometry."""
    rng = np.random.default_rng(seed)
    arr = rng.random(tuple(reversed(size))).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    if smooth:
        img = sitk.SmoothingRecursiveGaussian(img, 1.5)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(rotation(*angles))
    return img


def write_tiny_model(path, out_std, spacing=(3.0, 3.0, 3.0), name=None, description=""):
    """Save a small EOIR model (Ns=4, 3 levels) whose output convolutions are zero
    (``out_std=0``: the network moves nothing) or random with that std (moves voxels by about a
    millimetre; for geometry checks, not accuracy). Returns the path as a string."""
    import torch

    from EOIRRegistrationLib.engine import modelfile
    from EOIRRegistrationLib.models import build_model

    torch.manual_seed(0)
    model = build_model("eoir", {"channels": 4, "levels": 3})
    with torch.no_grad():
        for est in model.estimators:
            torch.nn.init.zeros_(est.out.bias)
            if out_std == 0:
                torch.nn.init.zeros_(est.out.weight)
            else:
                torch.nn.init.normal_(est.out.weight, std=out_std)
    card = {"name": name or Path(path).stem, "description": description,
            "working_spacing_mm": list(spacing)}
    modelfile.save_model(path, model, card)
    return str(path)


def add_grid_transform_node(scene, displacement, name="Transform"):
    """A new grid transform node in ``scene`` holding ``displacement`` (LPS mm, resampling
    direction, on its own grid), through the bridge (replaces the former
    ``slicer_bridge.createGridTransformNode``)."""
    from EOIRRegistrationLib.slicer import bridge

    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", name)
    bridge.setGridTransformFromDisplacement(node, displacement)
    return node


def registration_result(fixed, moving, displacement, moving_labels=None, options=None,
                        **fields):
    """A real ``engine.result.RegistrationResult`` for a known ``displacement`` on ``fixed``'s
    grid (for fake engines): the moving image (and labels, nearest neighbour) resampled through
    it by ITK, its Jacobian determinant, the folding mask and the QA figures of ``core.qa``.
    ``options`` defaults to ``RegistrationOptions()``; ``fields`` set the other result fields
    (model_name "fake-model" and device "cpu" unless given)."""
    from EOIRRegistrationLib.core.qa import jacobian_summary
    from EOIRRegistrationLib.engine.options import RegistrationOptions
    from EOIRRegistrationLib.engine.result import RegistrationResult

    transform = sitk.DisplacementFieldTransform(sitk.Image(displacement))
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    jacobian = sitk.Cast(sitk.DisplacementFieldJacobianDeterminant(displacement),
                         sitk.sitkFloat32)
    labels = None
    if moving_labels is not None:
        labels = sitk.Resample(moving_labels, fixed, transform, sitk.sitkNearestNeighbor, 0,
                               moving_labels.GetPixelID())
    fields.setdefault("model_name", "fake-model")
    fields.setdefault("device", "cpu")
    fields.setdefault("timings", {"register": 0.01})
    return RegistrationResult(
        displacement=displacement, warped=warped, jacobian=jacobian,
        folding=sitk.Cast(jacobian <= 0, sitk.sitkUInt8), warped_labels=labels,
        qa=jacobian_summary(sitk.GetArrayFromImage(jacobian)),
        options=RegistrationOptions() if options is None else options, **fields)


def smooth_blobs(seed=0, shift_mm=(0.0, 0.0, 0.0), size=32, spacing=2.0, count=4, width=8.0,
                 transform=None):
    """A phantom of smooth Gaussian blobs on a zero background, on an axis-aligned grid at the
    origin (LPS mm). ``image(y) = sum_b a_b exp(-|T(y) - c_b|^2 / (2 s_b^2))`` with
    ``T(y) = y + shift_mm``, or ``transform.TransformPoint`` when given; the same seed draws the
    same blobs, so ``moving(y) = fixed(T(y))``: the fixed -> moving map is ``T^-1``. Labels: the
    strongest blob where it exceeds 0.3. Returns (image float32, labels uint8)."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.3, 0.7, (count, 3)) * size * spacing
    sigmas = rng.uniform(0.6, 1.4, count) * width
    amplitudes = rng.uniform(0.5, 1.0, count)
    kji = np.stack(np.meshgrid(*[np.arange(size) * spacing] * 3, indexing="ij"), -1)
    y = kji[..., ::-1].reshape(-1, 3)  # LPS (x, y, z) of each voxel, array order
    if transform is None:
        y = y + np.asarray(shift_mm)
    else:
        y = np.array([transform.TransformPoint(tuple(p)) for p in y])
    g = np.stack([a * np.exp(-((y - c) ** 2).sum(-1) / (2 * s * s))
                  for c, s, a in zip(centres, sigmas, amplitudes)]).reshape(count, *[size] * 3)
    labels = np.where(g.max(0) > 0.3, g.argmax(0) + 1, 0).astype(np.uint8)

    def image(arr):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((spacing,) * 3)
        return img
    return image(g.sum(0).astype(np.float32)), image(labels)


def mean_dice(a: sitk.Image, b: sitk.Image) -> float:
    """Mean Dice over the nonzero labels of ``a`` (arrays on the same grid)."""
    x, y = sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)
    values = [v for v in np.unique(x) if v != 0]
    return float(np.mean([2 * np.sum((x == v) & (y == v)) / (np.sum(x == v) + np.sum(y == v))
                          for v in values]))


def affine_transform(a):
    """A 4x4 fixed -> moving matrix as a SimpleITK transform."""
    tx = sitk.AffineTransform(3)
    tx.SetMatrix(np.asarray(a)[:3, :3].ravel().tolist())
    tx.SetTranslation(np.asarray(a)[:3, 3].tolist())
    return tx
