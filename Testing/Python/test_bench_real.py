"""The real-on-real brain benchmark (benchmarks/bench_real.py) without its data and without the
peers: the label grouping, the known perturbation, the scoring of a tiny synthetic pair with a
known field, the argument parser, the missing-data exit and the results row format."""
import json
import math
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..",
                                                "benchmarks")))
import bench_real as br  # noqa: E402
import results  # noqa: E402


def test_subject1_tissue_groups_aseg_and_cortical_parcels():
    seg = np.array([0, 2, 41, 3, 42, 11100, 11101, 12175, 12176, 10, 4, 1000, 251])
    assert br.subject1_tissue(seg).tolist() == [0, br.WM, br.WM, br.GM, br.GM, br.GM, br.GM,
                                                br.GM, 0, 0, 0, 0, 0]
    assert br.subject1_tissue(seg).dtype == np.int16


def test_subject2_tissue_is_wm_above_one():
    wm = np.array([0, 1, 2, 5, 110, 250], np.uint8)
    assert br.subject2_tissue(wm).tolist() == [0, 0, br.WM, br.WM, br.WM, br.WM]


def test_mni_tissue_of_pveseg():
    assert br.mni_tissue(np.array([0, 1, 2, 3])).tolist() == [0, 0, br.GM, br.WM]


def test_perturbation_is_the_stated_size_and_fixed_by_its_seed():
    a, t = br.perturbation(7)
    a2, t2 = br.perturbation(7)
    assert np.array_equal(a, a2) and np.array_equal(t, t2)
    assert not np.allclose(br.perturbation(8)[0], a)
    assert np.linalg.norm(t) == pytest.approx(br.PERTURB_SHIFT_MM)
    # a = R S: the singular values are the scales, the rotation angle is the stated one
    u, s, vt = np.linalg.svd(a)
    assert sorted(s) == pytest.approx(sorted(1 + br.PERTURB_SCALE * np.sign(s - 1)))
    r = a @ np.linalg.inv(np.diag(np.sqrt(np.diag(a.T @ a))))
    angle = np.degrees(np.arccos((np.trace(r) - 1) / 2))
    assert angle == pytest.approx(br.PERTURB_DEGREES, abs=1e-6)


def _image(array, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), pixel=None):
    img = sitk.GetImageFromArray(array if pixel is None else array.astype(pixel))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def _volume(tmp_path, name, tissue, image=None):
    """A volume entry as make_volumes writes it (paths of image, tissue, mask)."""
    entry = {"values": [int(v) for v in np.unique(tissue) if v]}
    image = tissue.astype(np.float32) * 40 if image is None else image
    for key, arr, pixel in (("image", image, np.float32), ("tissue", tissue, np.int16),
                            ("mask", tissue > 0, np.uint8)):
        entry[key] = str(tmp_path / f"{name}_{key}.nii.gz")
        sitk.WriteImage(_image(arr, pixel=pixel), entry[key])
    return entry


def _tissue(shape=(20, 22, 24), shift=0):
    """A WM box inside a GM box (array order k, j, i), shifted by ``shift`` voxels along i (x)."""
    t = np.zeros(shape, np.int16)
    t[4:16, 5:17, 5 + shift:19 + shift] = br.GM
    t[7:13, 8:14, 8 + shift:16 + shift] = br.WM
    return t


def test_score_of_a_known_field(tmp_path):
    fixed = _volume(tmp_path, "fixed", _tissue())
    moving = _volume(tmp_path, "moving", _tissue(shift=3))
    ident = br.score(fixed, moving)
    assert ident["dice"] < 0.8 and 1.0 < ident["hd95"] <= 3.0
    assert ident["folding_percent"] == 0 and ident["sdlogj"] == 0
    # fixed point x -> moving point x + d(x): the moving boxes sit 3 mm further along x
    d = np.zeros((20, 22, 24, 3))
    d[..., 0] = 3.0
    disp = _image(d)
    path = tmp_path / "run" / "displacement.nii"
    path.parent.mkdir()
    sitk.WriteImage(sitk.Cast(disp, sitk.sitkVectorFloat32), str(path))
    row = br.score(fixed, moving, path)
    assert row["dice"] == pytest.approx(1.0) and row["mask_dice"] == pytest.approx(1.0)
    assert row["dice_gm"] == pytest.approx(1.0) and row["dice_wm"] == pytest.approx(1.0)
    assert row["hd95"] == pytest.approx(0.0)
    assert row["folding_percent"] == 0 and row["sdlogj"] == pytest.approx(0.0, abs=1e-6)
    assert "check_r" not in row  # no tool-warped image next to the field
    # the tool's own warped image, where it exists, is compared with the field's warp
    sitk.WriteImage(sitk.ReadImage(fixed["image"]), str(path.parent / "warped.nii.gz"))
    assert br.score(fixed, moving, path)["check_r"] == pytest.approx(1.0)
    # the wrong direction of the same field moves them 6 mm apart
    sitk.WriteImage(sitk.Cast(_image(-d), sitk.sitkVectorFloat32), str(path))
    assert br.score(fixed, moving, path)["dice"] < ident["dice"]


def test_score_uses_the_classes_both_volumes_have_and_folding(tmp_path):
    fixed = _volume(tmp_path, "fixed", _tissue())
    wm_only = _tissue()
    wm_only[wm_only == br.GM] = 0
    moving = _volume(tmp_path, "moving", wm_only)
    row = br.score(fixed, moving)
    assert row["values"] == [br.WM] and "dice_gm" not in row
    assert row["dice"] == pytest.approx(1.0)
    assert row["mask_dice"] < 1  # the fixed mask also holds the GM
    # a field that folds: d_x = -2 x over a slab (det = 1 - 2 < 0 there)
    d = np.zeros((20, 22, 24, 3))
    d[:, :, 10:14, 0] = -2.0 * np.arange(10, 14)
    path = tmp_path / "displacement.nii"
    sitk.WriteImage(sitk.Cast(_image(d), sitk.sitkVectorFloat32), str(path))
    row = br.score(fixed, moving, path)
    assert row["folding_percent"] > 0 and row["sdlogj"] > 0


def test_a_field_off_the_fixed_grid_is_refused(tmp_path):
    fixed = _volume(tmp_path, "fixed", _tissue())
    path = tmp_path / "displacement.nii"
    sitk.WriteImage(_image(np.zeros((20, 22, 23, 3), np.float32)), str(path))
    with pytest.raises(RuntimeError, match="not on the fixed grid"):
        br.score(fixed, fixed, path)


def test_perturb_resamples_through_the_known_affine():
    t = _tissue(shape=(40, 44, 48), shift=10)
    vol = {"image": _image(t.astype(np.float32) * 40, origin=(-24.0, -22.0, -20.0)),
           "tissue": _image(t, origin=(-24.0, -22.0, -20.0)),
           "mask": _image((t > 0).astype(np.uint8), origin=(-24.0, -22.0, -20.0))}
    out, matrix = br.perturb(vol, seed=3)
    m = np.asarray(matrix)
    # every labelled voxel of the perturbed volume shows the original's label at m @ p
    tissue = out["tissue"]
    arr = sitk.GetArrayFromImage(tissue)
    idx = np.argwhere(arr > 0)[::7]
    agree = []
    for k, j, i in idx:
        p = np.asarray(tissue.TransformIndexToPhysicalPoint((int(i), int(j), int(k))))
        q = m[:3, :3] @ p + m[:3, 3]
        src = vol["tissue"].TransformPhysicalPointToIndex(tuple(q))
        agree.append(int(t[src[2], src[1], src[0]]) == int(arr[k, j, i]))
    assert np.mean(agree) > 0.97  # nearest neighbour: ties at the boundaries
    # cropped to the labels plus the margin, nothing of the brain lost
    # (a perturbed voxel shows the original at m p: volumes shrink by |det m|)
    assert (sitk.GetArrayFromImage(out["mask"]) > 0).sum() == pytest.approx(
        (t > 0).sum() / abs(np.linalg.det(m[:3, :3])), rel=0.03)


def test_pairs_and_their_names():
    names = br.pair_names()
    assert len(names) == 6 and "subj1<-subj2" in names and "mni<-subj2" in names
    assert len(br.pair_names(perturbed=True)) == 12
    assert br.split_pair("subj2<-mni~aff") == ("subj2", "mni~aff")
    for bad in ("subj1-subj2", "subj3<-mni", "subj1<-"):
        with pytest.raises(ValueError):
            br.split_pair(bad)


def test_parser_defaults_and_ours_variants():
    args = br.parser().parse_args([])
    assert args.methods == list(br.METHODS) and args.threads == 2 and args.downsample == 1.0
    assert [j[1] for j in br._jobs(args)][:2] == ["ours:default", "ours:refine0"]
    args = br.parser().parse_args(["--methods", "ours", "greedy", "--ours-args",
                                   "coarse=--working-spacing 3 --refine 5",
                                   "--ours-args", "refine0=--refine 1",
                                   "--ours-variants", "coarse", "refine0"])
    jobs = br._jobs(args)
    assert jobs == [("ours", "ours:coarse", {"args": "--working-spacing 3 --refine 5"}),
                    ("ours", "ours:refine0", {"args": "--refine 1"}),
                    ("greedy", "greedy", {})]
    with pytest.raises(SystemExit):
        br.parser().parse_args(["--ours-args", "no-equals-sign"])
    with pytest.raises(SystemExit):
        br.parser().parse_args(["--methods", "voxelmorph"])
    with pytest.raises(SystemExit):
        br._jobs(br.parser().parse_args(["--ours-variants", "unknown"]))


def test_missing_data_folder_exits_2(tmp_path, capsys):
    assert br.main(["--data", str(tmp_path / "nowhere"), "--methods"]) == 2
    assert "missing or incomplete" in capsys.readouterr().err


def test_summary_and_results_rows(tmp_path):
    rows = [{"method": "identity", "group": "identity", "pair": p, "dice": 0.4, "mask_dice": 0.7,
             "hd95": 20.0, "folding_percent": 0.0, "sdlogj": 0.0, "seconds": math.nan,
             "peak_gb": math.nan, "date": "2026-12-01 10:00"} for p in ("a", "b")]
    rows += [{"method": "greedy", "group": "greedy", "pair": p, "dice": d, "dice_wm": d,
              "mask_dice": 0.95, "hd95": 3.0, "folding_percent": 0.0, "sdlogj": 0.2,
              "seconds": 60.0, "peak_gb": 0.5, "threads": 2, "date": "2026-12-02 10:00"}
             for p, d in (("a", 0.7), ("b", 0.8))]
    summary = br.summarise(rows)
    assert [s["method"] for s in summary] == ["identity", "greedy"]
    assert summary[1]["dice"] == pytest.approx(0.75) and summary[1]["pairs"] == 2
    assert math.isnan(summary[1]["dice_gm"])
    out = br.result_rows(summary, {})
    assert out[0] == {"label": "no registration", "baseline": True, "dice": 0.4,
                      "mask_dice": 0.7, "hd95": 20.0, "folding_percent": None, "sdlogj": None,
                      "seconds": None, "peak_gb": None}
    assert out[1]["label"].startswith("greedy") and out[1]["seconds"] == 60.0
    path = tmp_path / "results.json"
    br.save_results(summary, rows, {}, ["--methods", "greedy"], path=path)
    section = json.loads(path.read_text())["real_pairs"]
    assert section["columns"] == ["dice", "mask_dice", "hd95", "folding_percent", "sdlogj",
                                  "seconds", "peak_gb"]
    assert section["source"] == "python benchmarks/bench_real.py --methods greedy"
    assert section["measured"] == "2026-12-01 to 2026-12-02"
    assert "2 threads per run" in section["machine"]
    assert "| brain-mask Dice |" in results.render(section)


def test_results_columns_keep_the_existing_keys():
    for key in ("size", "dice", "hd95", "error_mm", "identity_error_mm", "folding_percent",
                "sdlogj", "seconds", "peak_gb"):
        assert key in results.COLUMNS
    assert results.COLUMNS["mask_dice"][2] == "max"


def test_method_labels():
    assert br.method_label("identity") == "no registration"
    assert br.method_label("ours:default") == "EOIR, default settings"
    assert "--refine 0" in br.method_label("ours:refine0")
    assert br.method_label("ours:x", "--refine 3") == "EOIR `x` (`--refine 3`)"
    assert br.method_label("fireants").startswith("FireANTs")
