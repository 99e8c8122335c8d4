"""The deploy runtime without torch: its centre crop against the training pipeline's, and its imports."""

import subprocess
import sys

import numpy as np
import pytest

from products10k.data.transforms import eval_transform
from products10k.deploy.runtime import centre_crop_input

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


@pytest.mark.parametrize(
    "h, w, resize, crop",
    [(512, 683, 146, 128), (300, 300, 146, 128), (48, 64, 37, 32), (701, 513, 73, 64), (146, 200, 146, 128),
     (1000, 37, 37, 32), (97, 131, 37, 32)],
)  # fmt: skip
def test_the_opencv_centre_crop_is_the_evaluate_stages_exactly(h, w, resize, crop):
    rgb = np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8)
    expected = eval_transform(resize, crop, {"mean": MEAN.tolist(), "std": STD.tolist()})(image=rgb)["image"]
    got = centre_crop_input(rgb, resize, crop, MEAN, STD)
    assert got.dtype == np.float32 and got.shape == tuple(expected.shape)
    assert np.abs(got - expected.numpy()).max() <= 1e-6


def test_predict_enrol_and_serve_import_no_torch_albumentations_dvc_pandas_or_scipy():
    code = (
        "import sys, products10k.deploy.predict, products10k.deploy.enrol, products10k.deploy.serve; "
        "print(sorted(m for m in ('torch', 'albumentations', 'dvc', 'pandas', 'scipy', 'timm', 'sklearn') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
