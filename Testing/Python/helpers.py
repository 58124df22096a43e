"""Small images on oblique, anisotropic grids for the tests (no external data)."""
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
