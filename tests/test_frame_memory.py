"""Large frames are prepared in bounded memory: peak RSS (VmHWM) of prepare_frame in a fresh process."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from patchsearch.data import decode_cost_bytes, probe_frame
from patchsearch.geometry import choose_geometry, crop_geometry

MiB = 1 << 20
PROBE = r"""
import json, resource, sys
import numpy as np
from PIL import Image
from patchsearch.frames import prepare_frame
from patchsearch.geometry import Geometry
g = Geometry.from_dict(json.loads(sys.argv[2]))
warm = sys.argv[1] + ".warm.png"
Image.new("L", (64, 64)).save(warm)
prepare_frame(warm, g)  # imports and first-call allocations
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
before = rss()
t, size = prepare_frame(sys.argv[1], g, max_pixels=10 ** 9)
# VmHWM is this process image's own peak; ru_maxrss is not: Linux carries the forking
# parent's RSS across fork + exec into it, so under a large pytest process it reads high
with open("/proc/self/status") as f:
    peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
print(json.dumps({"extra": peak - before, "shape": list(t.shape), "size": list(size)}))
"""


def _peak(path, geometry):
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), json.dumps(geometry.to_dict())],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")


@pytest.mark.parametrize("mode, shape", [("RGB", (6000, 6000, 3)), ("I;16", (6000, 6000))])
def test_large_frame_costs_about_its_decoded_size(tmp_path, mode, shape):
    arr = np.zeros(shape, np.uint8 if mode == "RGB" else np.uint16)
    arr[1000:1100, 2000:2100] = 200
    path = tmp_path / "big.png"
    Image.fromarray(arr).save(path, compress_level=1)
    del arr
    geometry = choose_geometry([(900, 900)])
    info = probe_frame(path, max_pixels=10 ** 9)
    got = _peak(path, geometry)
    assert got["shape"] == [1, 3, 256, 256] and got["size"] == [6000, 6000]
    decoded = info.pixels * info.bytes_per_pixel  # 144 MB RGB, 72 MB 16-bit
    # formerly the RGB frame cost its decoded size 3 more times (tensor copies), the 16-bit
    # one about 25 bytes a pixel (three float64 copies): 900 MB
    assert got["extra"] < decoded + 64 * MiB, got
    assert got["extra"] < decode_cost_bytes(info, geometry), got


def test_crop_mode_does_not_upscale_a_long_thin_frame(tmp_path):
    Image.new("L", (16, 120000), 90).save(tmp_path / "thin.png")
    got = _peak(tmp_path / "thin.png", crop_geometry(256, 224))
    assert got["shape"] == [1, 3, 224, 224] and got["size"] == [16, 120000]
    assert got["extra"] < 64 * MiB, got  # resized whole first, it was 256 x 1920000 x 3 bytes, twice
