"""A registration too large for the memory fails at once with a clear error (engine/memory.py)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from EOIRRegistrationLib.core.errors import DeviceError
from EOIRRegistrationLib.engine import memory
from EOIRRegistrationLib.engine.pipeline import register

ENGINE = Path(__file__).resolve().parents[2] / "EOIRRegistration"


def varied_image(size, spacing=(1.0, 1.0, 1.0)):
    image = sitk.Image(size, sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image[1, 2, 3], image[size[0] - 2, size[1] - 3, size[2] - 4] = 100, 50  # not constant
    return image


def test_the_estimate_grows_with_each_grid_and_with_the_inverse():
    base = memory.estimate_bytes(10 ** 6, 10 ** 6, 10 ** 5, 10 ** 5)
    assert memory.estimate_bytes(2 * 10 ** 6, 10 ** 6, 10 ** 5, 10 ** 5) > base
    assert memory.estimate_bytes(10 ** 6, 2 * 10 ** 6, 10 ** 5, 10 ** 5) > base
    assert memory.estimate_bytes(10 ** 6, 10 ** 6, 10 ** 6, 10 ** 5) > base
    assert memory.estimate_bytes(10 ** 6, 10 ** 6, 10 ** 5, 10 ** 5, inverse=True) > base
    # a 1024^3 fixed image cannot fit in this project's 24 GB machine
    huge = memory.estimate_bytes(1024 ** 3, 1024 ** 3, 512 ** 3, 1 << 23)
    assert huge > 64 * 2 ** 30


def test_a_grid_too_large_for_the_memory_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda: 2 * 2 ** 30)
    stages = []
    big = varied_image((512, 512, 320), (0.7, 0.7, 1.0))
    with pytest.raises(DeviceError) as caught:
        register(big, big, device="cpu", progress=lambda stage, f: stages.append(stage))
    message = str(caught.value)
    assert "--working-spacing" in message and "2.0 GB is available" in message
    assert "fixed grid 512x512x320" in message and "\n" not in message
    assert stages == ["loading model"]  # nothing prepared, nothing registered
    # the same images on a computer with the memory: the check lets them through
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 * 2 ** 30)
    memory.check_fits(memory.estimate_bytes(512 * 512 * 320, 512 * 512 * 320, 192 * 192 * 160,
                                            1 << 23), {"fixed grid": (512, 512, 320)})


def test_an_address_space_limit_is_read_and_refuses_the_run(tmp_path):
    """A child process under RLIMIT_AS (current size + 1 GB): a 512x512x320 registration is
    refused by the estimate, not by running out part way."""
    script = textwrap.dedent(f"""
        import resource, sys
        sys.path.insert(0, {str(ENGINE)!r})
        import SimpleITK as sitk
        from EOIRRegistrationLib.core.errors import DeviceError
        from EOIRRegistrationLib.engine import memory
        from EOIRRegistrationLib.engine.pipeline import register
        image = sitk.Image((512, 512, 320), sitk.sitkUInt8)
        image[1, 2, 3] = 100
        size = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1])
        limit = size * 1024 + 2 ** 30
        resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
        available = memory.available_bytes()
        assert 0.8 * 2 ** 30 < available <= 2 ** 30, available
        try:
            register(image, image, device="cpu", threads=1)
        except DeviceError as exc:
            print("REFUSED", exc)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "REFUSED this registration needs about" in proc.stdout
    assert "--working-spacing" in proc.stdout


def test_the_available_memory_is_read_from_the_system():
    available = memory.available_bytes()
    assert available is not None and available > 0
    meminfo = Path("/proc/meminfo").read_text()
    total = int(next(line for line in meminfo.splitlines()
                     if line.startswith("MemTotal")).split()[1]) * 1024
    assert available <= total
    assert np.isfinite(available)


def test_sdlogj_of_a_large_array_in_pieces_equals_numpys_whole_array_std():
    from EOIRRegistrationLib.core import qa
    det = np.random.default_rng(0).lognormal(0.0, 0.2, 5_000_000).astype(np.float32)
    det[:10] = -1.0  # folded voxels count as log(1e-9)
    whole = np.std(np.log(np.clip(det.astype(np.float64), 1e-9, 1e9)))
    assert det.size > qa._CHUNK
    assert qa.sdlogj(det) == pytest.approx(whole, rel=1e-12)
