"""overview.png shows the volumes as Slicer's slice views do: an asymmetric phantom (its patient-
left half, anterior cap and superior cap marked) lands on the expected side of each panel of the
saved picture whatever the image's direction matrix (the view axes are Slicer's own presets:
test_slicer_views.py); orientation letters and a scale bar are in the figure; the Jacobian colour bar is
log2 det, symmetric around 0."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from EOIRRegistrationLib.cli import overview  # noqa: E402

# Direction matrices (columns: where the index axes i, j, k point in LPS): oblique, and stored
# the other way round (RAS-like flips with the axes permuted), so the picture cannot follow the
# array order.
DIRECTIONS = {
    "oblique": sitk.VersorTransform((0.3, -0.5, 0.8), 0.3).GetMatrix(),
    "flipped-permuted": tuple(np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0],
                                        [0.0, 0.0, -1.0]]).ravel()),
}


def points(image: sitk.Image) -> np.ndarray:
    """(k, j, i, 3) LPS mm of every voxel centre."""
    k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in reversed(image.GetSize())],
                          indexing="ij")
    m = np.reshape(image.GetDirection(), (3, 3)) @ np.diag(image.GetSpacing())
    return np.stack([i, j, k], -1) @ m.T + np.asarray(image.GetOrigin())


def phantom(direction, size=(36, 32, 28), spacing=(1.1, 1.3, 1.5)) -> sitk.Image:
    """A sphere (radius 16 mm) centred on the LPS origin: 1 inside, +1 in the patient's left
    half (x > 0), +3 in its anterior cap (y < -6 mm) and +3 in its superior cap (z > 6 mm)."""
    image = sitk.Image(size, sitk.sitkFloat32)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    half = np.reshape(direction, (3, 3)) @ (np.asarray(spacing) * (np.asarray(size) - 1) / 2)
    image.SetOrigin(tuple(-half))
    p = points(image)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    values = (1.0 + (x > 0) + 3.0 * (y < -6) + 3.0 * (z > 6)) * (np.linalg.norm(p, axis=-1) < 16)
    out = sitk.GetImageFromArray(values.astype(np.float32))
    out.CopyInformation(image)
    return out


def expansion(reference: sitk.Image, rate: float) -> tuple[sitk.Image, sitk.Image]:
    """d(x) = rate * x (LPS mm) and its Jacobian determinant (1 + rate)^3."""
    field = sitk.GetImageFromArray(rate * points(reference), isVector=True)
    field.CopyInformation(reference)
    jac = sitk.Image(reference.GetSize(), sitk.sitkFloat32) + (1 + rate) ** 3
    jac.CopyInformation(reference)
    return field, jac


def render(tmp_path, image, field=None, jac=None):
    if field is None:
        field, jac = expansion(image, 0.0)
    fig = overview.overview_figure(image, image, image, jac, field, "phantom")
    path = tmp_path / "overview.png"
    fig.savefig(path, dpi=fig.dpi)
    return fig, matplotlib.image.imread(str(path))


def panel_pixels(fig, png, ax) -> np.ndarray:
    """The grey level of one axes of the saved picture (row 0 at the top)."""
    box = ax.get_window_extent()
    height = png.shape[0]
    crop = png[int(height - box.y1) + 2:int(height - box.y0) - 2, int(box.x0) + 2:int(box.x1) - 2]
    return crop[..., :3].mean(axis=-1)


@pytest.mark.parametrize("direction", DIRECTIONS.values(), ids=DIRECTIONS.keys())
def test_marked_phantom_lands_where_slicer_shows_it(tmp_path, direction):
    fig, png = render(tmp_path, phantom(direction))
    rows = dict(zip(overview.VIEWS, np.reshape(fig.axes[:15], (3, 5))))

    def halves(view, column=0):
        grey = panel_pixels(fig, png, rows[view][column])
        h, w = grey.shape
        return (grey[:, :w // 2].mean(), grey[:, w - w // 2:].mean(),
                grey[:h // 2].mean(), grey[h - h // 2:].mean())

    for column in (0, 1, 2):  # fixed, moving, warped: the same image here
        left, right, top, bottom = halves("axial", column)
        assert right > 1.2 * left  # the patient's left half on the image right
        assert top > 1.5 * bottom  # anterior up
        left, right, top, bottom = halves("coronal", column)
        assert right > 1.2 * left and top > 1.5 * bottom  # left on the right, superior up
        left, right, top, bottom = halves("sagittal", column)
        assert left > 1.2 * right and top > 1.5 * bottom  # anterior on the left, superior up
    plt.close(fig)


def test_letters_scale_bar_and_titles_are_in_the_figure(tmp_path):
    fig, _ = render(tmp_path, phantom(DIRECTIONS["oblique"]))
    axes = np.reshape(fig.axes[:15], (3, 5))
    expected = {"axial": ["R", "L", "A", "P"], "coronal": ["R", "L", "S", "I"],
                "sagittal": ["A", "P", "S", "I"]}  # left, right, top, bottom edge
    for (view, letters), row in zip(expected.items(), axes):
        for ax in row:
            texts = {(t.get_position(), t.get_text()) for t in ax.texts}
            assert {((0.02, 0.5), letters[0]), ((0.98, 0.5), letters[1]),
                    ((0.5, 0.98), letters[2]), ((0.5, 0.02), letters[3])} <= texts
        bar = [t.get_text() for t in row[0].texts if t.get_text().endswith(" mm")]
        assert bar == ["10 mm"]  # a round length, at most a quarter of the ~40 mm panel
        assert row[0].get_ylabel().startswith(view)
    plt.close(fig)


def test_jacobian_colour_bar_is_log2_and_symmetric(tmp_path):
    image = phantom(DIRECTIONS["oblique"])
    field, jac = expansion(image, 0.1)
    fig, _ = render(tmp_path, image, field, jac)
    shown = fig.axes[4].get_images()[1]  # over the fixed image in the Jacobian panel
    assert shown.norm.vmin == pytest.approx(-shown.norm.vmax)
    assert shown.norm.vmax == pytest.approx(3 * np.log2(1.1), rel=1e-3)
    data = np.ma.masked_invalid(shown.get_array())
    np.testing.assert_allclose(data.compressed(), 3 * np.log2(1.1), rtol=1e-4)
    bar = next(a for a in fig.axes if "log2" in a.get_ylabel())
    labels = [t.get_text() for t in bar.get_yticklabels()]
    assert labels[2] == "1" and float(labels[0]) * float(labels[-1]) == pytest.approx(1, rel=1e-2)
    plt.close(fig)
