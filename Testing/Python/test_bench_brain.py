"""The brain benchmark's pair generation (benchmarks/brain_pairs.py) on tiny synthetic label maps:
no data folder, antspyx or elastix needed."""
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..",
                                                "benchmarks")))
import brain_pairs as bp  # noqa: E402


def synthseg_like(shape=(24, 28, 26)):
    """Skin shell (502) around WM (2), cortex (3), a ventricle (4) holding SynthSeg's 136, CSF (24)."""
    lab = np.zeros(shape, np.int32)
    lab[1:-1, 1:-1, 1:-1] = 502
    lab[3:-3, 3:-3, 3:-3] = 24
    lab[5:-5, 5:-5, 5:-5] = 3
    lab[7:-7, 7:-7, 7:-7] = 2
    lab[9:14, 10:16, 9:15] = 4
    lab[11:13, 12:14, 11:13] = 136  # not a FreeSurfer class label: takes its neighbour's value
    return lab


def test_label_intensities_and_table():
    lab = synthseg_like()
    t1 = np.zeros(lab.shape, np.float32)
    t1[lab == 2], t1[lab == 3], t1[np.isin(lab, (4, 136))] = 100, 60, 20
    t1[(lab == 24)] = 30  # the CSF rim the skull strip kept (unlabelled in FreeSurfer)
    subject = np.where(lab == 24, 0, np.where(lab == 136, 4, lab))  # FreeSurfer: rim unlabelled
    subject[subject >= 500] = 0
    means, classes = bp.label_intensities(t1, subject)
    assert means[2] == pytest.approx(100) and means[3] == pytest.approx(60)
    assert means[24] == pytest.approx(30)  # rim mean, not a FreeSurfer label mean
    assert classes["wm"] == pytest.approx(100) and classes["csf"] == pytest.approx(20)
    table = bp.intensity_table(np.where(lab == 2, 41, lab), means, classes)  # 41 missing: WM class
    assert table[41] == pytest.approx(100)
    assert table[136] == pytest.approx(20)  # most frequent neighbour: the ventricle
    assert table[502] == 0 and table[0] == 0


def test_render_t1_like_exact_without_blur_and_noise():
    lab = synthseg_like()
    table = {0: 0.0, 502: 0.0, 24: 30.0, 3: 60.0, 2: 100.0, 4: 20.0, 136: 20.0}
    img = bp.render_t1_like(lab, table, blur_sigma_mm=0, noise_std=0)
    assert img.dtype == np.float32 and img.shape == lab.shape
    for v, x in table.items():
        assert np.all(img[lab == v] == np.float32(x))
    with pytest.raises(ValueError, match="no intensity"):
        bp.render_t1_like(lab, {0: 0.0})


def test_render_t1_like_blur_noise_deterministic_background_zero():
    lab = synthseg_like()
    table = {0: 0.0, 502: 0.0, 24: 30.0, 3: 60.0, 2: 100.0, 4: 20.0, 136: 20.0}
    a = bp.render_t1_like(lab, table, blur_sigma_mm=0.5, noise_std=2.0, seed=3)
    b = bp.render_t1_like(lab, table, blur_sigma_mm=0.5, noise_std=2.0, seed=3)
    c = bp.render_t1_like(lab, table, blur_sigma_mm=0.5, noise_std=2.0, seed=4)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0
    assert np.all(a[0] == 0)  # background beyond the blur's reach stays exactly 0
    core = ndimage.binary_erosion(lab == 2, iterations=2)  # plateau: blur changes nothing there
    assert a[core].mean() == pytest.approx(100, abs=1.0)  # blur keeps plateaus, noise is zero-mean
    assert 1.0 < a[core].std() < 3.0


def test_aseg_of_subject_maps_parcels_and_callosum():
    seg = np.zeros((10, 12, 14), np.int32)
    seg[2:8, 2:10, 1:6] = 2
    seg[2:8, 2:10, 8:13] = 41
    seg[4:6, 4:8, 6] = 251  # callosum next to the left WM
    seg[4:6, 4:8, 7] = 255  # ... and next to the right WM
    seg[0, 0, 0], seg[0, 0, 1], seg[0, 0, 2], seg[0, 0, 3] = 11101, 12150, 1005, 2030
    out = bp.aseg_of_subject(seg)
    assert out[0, 0, 0] == 3 and out[0, 0, 1] == 42 and out[0, 0, 2] == 3 and out[0, 0, 3] == 42
    assert np.all(out[4:6, 4:8, 6] == 2) and np.all(out[4:6, 4:8, 7] == 41)
    assert not np.isin(out, [251, 255, 11101, 12150]).any()


def test_misaligned_moves_the_header_only():
    img = sitk.Image([20, 22, 18], sitk.sitkFloat32)
    img.SetSpacing((1.0, 1.2, 0.9))
    img.SetOrigin((5.0, -3.0, 7.0))
    out = bp.misaligned(img, degrees=20, axis=(1, 1, 1), shift_mm=(10, -10, 5))
    assert np.array_equal(sitk.GetArrayViewFromImage(out), sitk.GetArrayViewFromImage(img))
    r = np.asarray(out.GetDirection()).reshape(3, 3) @ np.asarray(img.GetDirection()).reshape(3, 3).T
    assert np.degrees(np.arccos((np.trace(r) - 1) / 2)) == pytest.approx(20, abs=1e-6)
    centre = (np.asarray(img.GetSize()) - 1) / 2
    moved = np.subtract(out.TransformContinuousIndexToPhysicalPoint(centre),
                        img.TransformContinuousIndexToPhysicalPoint(centre))
    assert np.allclose(moved, (10, -10, 5)) and np.linalg.norm(moved) == pytest.approx(15)


def test_crop_to_mask_adds_the_margin_in_mm():
    img = sitk.Image([30, 40, 50], sitk.sitkUInt8)
    img.SetSpacing((1.0, 2.0, 1.0))
    mask = np.zeros((50, 40, 30), bool)  # array order (k, j, i)
    mask[20:25, 15:18, 10:12] = True
    start, size = bp.crop_to_mask(img, mask, margin_mm=4.0)
    assert start == [6, 13, 16] and size == [10, 7, 13]


def test_tissue_classes_of_the_subject_and_of_probability_maps():
    aseg = np.array([[0, 2, 3, 4, 17, 13, 24, 42, 41, 16]])
    np.testing.assert_array_equal(bp.tissue_of_aseg(aseg),
                                  [[0, 2, 1, 0, 1, 2, 0, 1, 2, 2]])
    gm = np.array([0.9, 0.5, 0.6, 0.3, 0.0, 0.55])
    wm = np.array([0.1, 0.5, 0.4, 0.7, 0.2, 0.55])
    # likelier class above 0.5; grey on ties above 0.5; nothing at or below 0.5
    np.testing.assert_array_equal(bp.tissue_of_probabilities(gm, wm), [1, 0, 1, 2, 0, 1])


def test_template_pair_files_keep_the_geometry_and_the_tissue_classes(tmp_path):
    """A tiny stand-in data folder and template (RAS, like nilearn's files): the pair's fixed
    tissue map lies on the cropped fixed grid, the template is cropped to its brain, and its
    labels follow its probability maps."""
    data, templ = tmp_path / "data", tmp_path / "template"
    (data / "real_t1_freesurfer").mkdir(parents=True)
    templ.mkdir()
    t1 = np.zeros((30, 32, 34), np.float32)
    t1[5:25, 6:26, 7:27] = 80.0
    seg = np.zeros(t1.shape, np.int32)
    seg[5:25, 6:26, 7:27] = 2
    seg[5:25, 6:26, 7:12] = 1012  # a cortical parcel -> cortex -> grey matter
    for name, arr in ((bp.T1_PATH, t1), (bp.SEG_PATH, seg)):
        img = sitk.GetImageFromArray(arr)
        img.SetDirection((-1, 0, 0, 0, 0, -1, 0, 1, 0))  # LIA, like FreeSurfer's conformed space
        sitk.WriteImage(img, str(data / name))
    shape = (28, 30, 26)
    t1_t = np.zeros(shape, np.uint8)
    t1_t[4:24, 5:25, 3:23] = 120
    gm = np.zeros(shape, np.uint8)
    gm[4:24, 5:25, 3:10] = 200
    wm = np.zeros(shape, np.uint8)
    wm[4:24, 5:25, 10:23] = 220
    for key, arr in (("t1", t1_t), ("gm", gm), ("wm", wm)):
        img = sitk.GetImageFromArray(arr)
        img.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS
        img.SetOrigin((14.0, 15.0, -13.0))
        sitk.WriteImage(img, str(templ / bp.TEMPLATE_FILES[key]))
    pair = bp.make_template_pair(data, templ, tmp_path / "out")
    assert pair["scoring"] == "tissue" and pair["label_values"] == [bp.TISSUE_GM, bp.TISSUE_WM]
    fixed_tissue = sitk.ReadImage(pair["fixed_labels"])
    t1_img = sitk.ReadImage(str(data / bp.T1_PATH))
    start, size = bp.crop_to_mask(t1_img, t1 > 0)
    assert list(fixed_tissue.GetSize()) == size
    assert fixed_tissue.GetOrigin() == pytest.approx(t1_img.TransformIndexToPhysicalPoint(start))
    ft = sitk.GetArrayFromImage(fixed_tissue)
    assert set(np.unique(ft)) == {0, bp.TISSUE_GM, bp.TISSUE_WM}
    moving = sitk.ReadImage(pair["moving"])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(pair["moving_labels"]))
    m = sitk.GetArrayFromImage(moving)
    assert moving.GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    # cropped to the template's brain plus the 10 mm margin, clipped to the image: all of it here
    assert m.shape == shape and (m > 0).sum() == (t1_t > 0).sum()
    assert moving.GetOrigin() == pytest.approx((14.0, 15.0, -13.0))
    assert np.all(labels[m == 0] == 0)
    assert (labels == bp.TISSUE_GM).sum() == (gm > 127).sum()
    assert (labels == bp.TISSUE_WM).sum() == (wm > 127).sum()
