"""Similarity masks: a lesion in one image only drags the field unless masked out; the masks
reach the initial alignment; empty masks are refused."""
import numpy as np
import pytest
import SimpleITK as sitk

from EOIRRegistrationLib.core.errors import InputError
from EOIRRegistrationLib.engine import alignment, masks
from EOIRRegistrationLib.engine.pipeline import register
from EOIRRegistrationLib.training.phantom import make_phantom_pair

LESION_MM, MASK_MM, NEAR_MM = 8.0, 14.0, 12.0  # radii: the blob, the mask's hole, "near"


@pytest.fixture(scope="module")
def textured_phantom():
    """A phantom with smooth texture (what a local optimiser can follow), and the squared
    distance (mm^2) of each voxel from an off-centre point."""
    pair = make_phantom_pair(seed=7, velocity=0.0, shape=(40, 48, 48), spacing=(2.0, 2.0, 2.5),
                             origin=(-40.0, -35.0, -30.0), rotation=(0.1, 0.05, -0.1))
    arr = sitk.GetArrayFromImage(pair.fixed).astype(np.float32)
    noise = np.random.default_rng(3).standard_normal(arr.shape).astype(np.float32)
    texture = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(noise),
                                                                     1.5))
    textured = arr + 0.6 * arr.std() * texture / texture.std() * (arr > arr.mean())
    k, j, i = np.meshgrid(*[np.arange(s) for s in arr.shape], indexing="ij")
    c = np.array(arr.shape) // 2 + np.array([3, -6, 5])
    r2 = ((k - c[0]) * 2.5) ** 2 + ((j - c[1]) * 2.0) ** 2 + ((i - c[2]) * 2.0) ** 2
    return pair.fixed, textured, r2


def _image(array, like):
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(like)
    return image


@pytest.mark.parametrize("side,contrast", [("moving", "auto"), ("fixed", "auto"),
                                           ("moving", "different")])
def test_a_lesion_in_one_image_no_longer_drags_the_field_when_masked(textured_phantom, side,
                                                                     contrast):
    """auto: the LNCC optimisation; different: the MIND-SSC one (its masks eroded by the
    descriptors' reach)."""
    like, textured, r2 = textured_phantom
    lesioned = textured.copy()
    lesioned[r2 < LESION_MM ** 2] = 1.5 * textured.max()  # a bright blob in one image only
    plain = _image(textured, like)
    with_lesion = _image(lesioned, like)
    fixed, moving = (plain, with_lesion) if side == "moving" else (with_lesion, plain)
    mask = _image((r2 >= MASK_MM ** 2).astype(np.uint8), like)
    near = r2 < NEAR_MM ** 2
    sizes = {}
    for masked in (False, True):
        kw = {f"{side}_mask": mask} if masked else {}
        result = register(fixed, moving, initial_alignment="none", device="cpu",
                          contrast=contrast, **kw)
        assert result.masks == ((side,) if masked else ())
        assert ("MIND" in result.method) == (contrast == "different")
        sizes[masked] = np.linalg.norm(sitk.GetArrayFromImage(result.displacement), axis=-1)
    # the images agree everywhere else: the true displacement is 0
    assert sizes[False][near].mean() > 1.0, sizes[False][near].mean()
    assert sizes[True][near].mean() < 0.35 * sizes[False][near].mean(), (
        sizes[True][near].mean(), sizes[False][near].mean())
    assert sizes[True][near].max() < 0.5 * sizes[False][near].max()
    assert abs(sizes[True][~near].mean() - sizes[False][~near].mean()) < 0.2


def test_the_masks_restrict_the_initial_alignment():
    """A bright object in the moving image only pulls the centres of mass off; masked out, the
    centres of mass match again. The SimpleITK metric gets the masks too."""
    size = (40, 40, 40)
    k, j, i = np.meshgrid(*[np.arange(s) for s in size], indexing="ij")
    ball = lambda c, r: (((k - c[0]) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2) < r ** 2)
    body = ball((20, 20, 20), 8).astype(np.float32)
    extra = (body + 3.0 * ball((20, 20, 34), 4)).astype(np.float32)
    fixed, moving = sitk.GetImageFromArray(body), sitk.GetImageFromArray(extra)
    for image in (fixed, moving):
        image.SetSpacing((1.5, 1.5, 1.5))
    keep = sitk.GetImageFromArray((~ball((20, 20, 34), 6)).astype(np.uint8))
    keep.SetSpacing((1.5, 1.5, 1.5))
    unmasked, _ = alignment.initial_alignment(fixed, moving, "com")
    masked, _ = alignment.initial_alignment(fixed, moving, "com", masks=(None, masks.binary(keep)))
    # pulled along x towards the bright object (its 4s clamped to 2 as outliers of the [0, 1]
    # window: core.intensity.outlier_bounds; unclamped the pull is 6 mm)
    assert abs(unmasked[0, 3]) > 3.0
    assert np.abs(masked[:3, 3]).max() < 0.1
    # the mutual information sees only the masked voxels
    cost = lambda m: alignment._mutual_information_cost(fixed, moving, np.eye(4), 7, m)
    assert cost((masks.binary(keep), masks.binary(keep))) < cost((None, None)) - 1e-3


def test_empty_or_bad_masks_are_refused():
    pair = make_phantom_pair(seed=1, velocity=0.0, shape=(16, 16, 16))
    empty = sitk.Image(pair.fixed.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(pair.fixed)
    with pytest.raises(InputError, match="the moving mask is empty"):
        register(pair.fixed, pair.moving, moving_mask=empty)
    with pytest.raises(InputError, match="fixed mask is 2D"):
        register(pair.fixed, pair.moving, fixed_mask=sitk.Image(8, 8, sitk.sitkUInt8) + 1)


def test_masks_off_their_image_or_too_small_for_the_alignment_are_refused_with_the_reason():
    # Each used to end in a traceback from ITK ("Total Mass of the image was zero") or in its
    # words about sample sets and overlap.
    pair = make_phantom_pair(seed=1, velocity=0.0, shape=(40, 48, 48), spacing=(2.0, 2.0, 2.5))
    one = np.zeros(sitk.GetArrayViewFromImage(pair.fixed).shape, np.uint8)
    one[20, 24, 24] = 1
    one_voxel = _image(one, pair.fixed)
    far = sitk.Image(one_voxel)
    far.SetOrigin(tuple(np.add(one_voxel.GetOrigin(), (1000.0, 0.0, 0.0))))
    for role in ("fixed", "moving"):
        with pytest.raises(InputError, match=f"no labelled voxel of the {role} mask lies inside the "
                                             f"{role} image's field of view"):
            register(pair.fixed, pair.moving, **{f"{role}_mask": far})
        for init in ("auto", "rigid", "affine"):
            with pytest.raises(InputError, match=f"the {role} mask covers [01] voxels of the "
                                                 r"[0-9.]+ mm grid the initial alignment searches on"):
                register(pair.fixed, pair.moving, initial_alignment=init, **{f"{role}_mask": one_voxel})
    # the centre of mass (--init com) of a mask on the background: no intensity to weigh
    background = np.zeros_like(one)
    background[sitk.GetArrayViewFromImage(pair.fixed) == 0] = 1
    assert background.any()
    with pytest.raises(InputError, match="found no intensity inside the masks"):
        alignment.center_of_mass_matrix(pair.fixed, pair.moving, (_image(background, pair.fixed), None))
