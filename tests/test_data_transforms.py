"""decode_views: every view is the crop its box names, resized, and mirrored when its flag says so."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pretrain.data.config import AugmentConfig
from pretrain.data.transforms import decode_views


def _smooth_image(w: int, h: int) -> np.ndarray:
    """Distinct smooth ramps per channel: any misplaced or mirrored crop changes the pixels a lot."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * xx / (w - 1)
    g = 255 * yy / (h - 1)
    b = 127.5 + 127.5 * np.sin(2 * np.pi * (xx / w + 2 * yy / h))
    return np.stack([r, g, b], -1).round().astype(np.uint8)


def _expected(img: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    h, w = img.shape[:2]
    x0, y0, x1, y1 = box[0] * w, box[1] * h, box[2] * w, box[3] * h
    out = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR, box=(x0, y0, x1, y1)))
    return out[:, ::-1] if box[4] else out


@pytest.mark.parametrize(
    "fmt,w,h,size", [("PNG", 300, 200, 64), ("PNG", 2000, 1500, 96), ("JPEG", 640, 480, 64)]
)
def test_views_are_the_named_crops(fmt, w, h, size):
    img = _smooth_image(w, h)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    rng = np.random.default_rng(0)
    aug = AugmentConfig(scale=(0.08, 1.0))
    flipped = 0
    for _ in range(10):
        views, boxes = decode_views(buf.getvalue(), size, 2, aug, rng)
        assert views.shape == (2, 3, size, size) and views.dtype == np.uint8 and boxes.shape == (2, 5)
        for view, box in zip(views, boxes):
            assert 0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1
            want = _expected(img, box, size).astype(np.float64)
            got = view.transpose(1, 2, 0).astype(np.float64)
            # bilinear vs Pillow's filter, and JPEG loss: a few levels; a wrong crop/flip is tens of levels
            assert np.abs(got - want).mean() < 4.0, (fmt, box)
            flipped += int(box[4])
    assert 0 < flipped < 20


def test_center_view_without_augmentation():
    img = _smooth_image(120, 80)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    views, boxes = decode_views(buf.getvalue(), 32, 1, AugmentConfig(random=False), np.random.default_rng(0))
    np.testing.assert_allclose(boxes[0], [20 / 120, 0, 100 / 120, 1, 0], atol=1e-6)
    want = _expected(img, boxes[0], 32).astype(np.float64)
    assert np.abs(views[0].transpose(1, 2, 0) - want).mean() < 2.0
