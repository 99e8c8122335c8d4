"""Drawing the embedded dataset: one canonical product image per SKU (``render_product``), placed
into an in-shop or a customer scene per row (``render_row``), each image from its own seeded RNG."""

from __future__ import annotations

import math

import cv2
import numpy as np

from products10k.config import SyntheticConfig
from products10k.imaging.images import encode_jpeg
from products10k.raw.catalogue import (
    CODE_HEIGHT,
    INSHOP_JPEG_QUALITY,
    MAX_STRIPES,
    SPLIT_CODES,
    Row,
    Sku,
)

# --------------------------------------------------------------------------------------------
# Rendering: one canonical product image per SKU, placed into a scene per row.
# --------------------------------------------------------------------------------------------

# Per shape: width/height aspect and the label rectangle (x0, y0, x1, y1) in fractions of the
# product's width and height. Labels are at least 0.62 high so the layout below always fits.
_LABELS = {
    "box": (0.72, (0.07, 0.16, 0.93, 0.92)),
    "bottle": (0.46, (0.04, 0.33, 0.96, 0.96)),
    "can": (0.58, (0.02, 0.12, 0.98, 0.88)),
    "pouch": (0.74, (0.09, 0.18, 0.91, 0.94)),
    "jar": (0.84, (0.03, 0.22, 0.97, 0.94)),
    "tube": (0.52, (0.15, 0.10, 0.85, 0.74)),
}


def _shade(color: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    return tuple(int(min(255, max(0, c * factor))) for c in color)


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> tuple[int, int, int]:
    return tuple(round(x * (1 - t) + y * t) for x, y in zip(a, b, strict=True))


def _silhouette(shape: str, w: int, h: int, mask: np.ndarray, img: np.ndarray, sku: Sku) -> None:
    """Draw the packaging shape into ``mask`` (255 inside) and its non-label parts into ``img``."""
    base = sku.base_bgr
    dark = _shade(base, 0.55)
    metal = (185, 185, 190)

    def poly(points, color, target=img):
        pts = np.array([[round(x * (w - 1)), round(y * (h - 1))] for x, y in points], np.int32)
        cv2.fillPoly(target, [pts], color, lineType=cv2.LINE_AA)

    def rect(x0, y0, x1, y1, color, target=img):
        poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], color, target)

    def ellipse(cx, cy, rx, ry, color, target=img):
        cv2.ellipse(
            target,
            (round(cx * w), round(cy * h)),
            (round(rx * w), round(ry * h)),
            0,
            0,
            360,
            color,
            -1,
            cv2.LINE_AA,
        )

    if shape == "box":
        rect(0, 0, 1, 1, 255, mask)
        rect(0, 0, 1, 1, base)
        rect(0, 0, 1, 0.07, dark)  # top flap
    elif shape == "bottle":
        for target, (cap, neck, body) in ((mask, (255, 255, 255)), (img, (dark, base, base))):
            rect(0.33, 0.0, 0.67, 0.08, cap, target)
            rect(0.37, 0.08, 0.63, 0.2, neck, target)
            poly([(0.37, 0.2), (0.63, 0.2), (1.0, 0.3), (0.0, 0.3)], body, target)
            rect(0.0, 0.3, 1.0, 1.0, body, target)
    elif shape == "can":
        rect(0, 0.04, 1, 0.96, 255, mask)
        ellipse(0.5, 0.04, 0.5, 0.04, 255, mask)
        ellipse(0.5, 0.96, 0.5, 0.04, 255, mask)
        rect(0, 0.04, 1, 0.96, base)
        ellipse(0.5, 0.96, 0.5, 0.04, metal)
        ellipse(0.5, 0.04, 0.5, 0.04, metal)
    elif shape == "pouch":
        outline = [(0.06, 0.0), (0.94, 0.0), (0.98, 0.5), (1.0, 1.0), (0.0, 1.0), (0.02, 0.5)]
        poly(outline, 255, mask)
        poly(outline, base)
        teeth = [(0.06 + 0.88 * k / 16, 0.0 if k % 2 == 0 else 0.03) for k in range(17)]
        poly(teeth + [(0.94, 0.08), (0.06, 0.08)], _shade(base, 1.3))  # crimped seal
    elif shape == "jar":
        rect(0.06, 0.0, 0.94, 0.17, 255, mask)
        rect(0.0, 0.15, 1.0, 1.0, 255, mask)
        rect(0.0, 0.15, 1.0, 1.0, base)
        rect(0.06, 0.0, 0.94, 0.17, dark)  # lid
    elif shape == "tube":
        outline = [(0.0, 0.0), (1.0, 0.0), (0.72, 0.86), (0.28, 0.86)]
        for target, color, cap in ((mask, 255, 255), (img, base, dark)):
            poly(outline, color, target)
            rect(0.3, 0.86, 0.7, 1.0, cap, target)
        rect(0.0, 0.0, 1.0, 0.05, _shade(base, 1.25))  # crimp
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(f"unknown shape {shape!r}")


def _draw_mark(img: np.ndarray, kind: str, cx: int, cy: int, r: int, color) -> None:
    if kind == "circle":
        cv2.circle(img, (cx, cy), r, color, -1, cv2.LINE_AA)
        return
    if kind == "square":
        k = round(r * 0.85)
        pts = [(cx - k, cy - k), (cx + k, cy - k), (cx + k, cy + k), (cx - k, cy + k)]
    elif kind == "triangle":
        pts = [
            (cx, cy - r),
            (cx + round(r * 0.95), cy + round(r * 0.75)),
            (cx - round(r * 0.95), cy + round(r * 0.75)),
        ]
    elif kind == "diamond":
        pts = [(cx, cy - r), (cx + round(r * 0.8), cy), (cx, cy + r), (cx - round(r * 0.8), cy)]
    else:  # pragma: no cover - MARKS is closed
        raise ValueError(f"unknown mark {kind!r}")
    cv2.fillPoly(img, [np.array(pts, np.int32)], color, lineType=cv2.LINE_AA)


def _put_text_fit(
    img, text: str, x0: int, x1: int, y_top: int, height: int, color, thick_frac: float
) -> None:
    """Draw ``text`` centred between x0 and x1, with its cap height about ``height`` px."""
    font = cv2.FONT_HERSHEY_SIMPLEX
    (_, base_h), _ = cv2.getTextSize(text, font, 1.0, 1)
    scale = height / max(base_h, 1)
    thickness = max(1, round(height * thick_frac))
    (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    if tw > (x1 - x0):  # too wide: shrink to fit the label
        scale *= (x1 - x0) / tw
        (tw, th), _ = cv2.getTextSize(text, font, scale, thickness)
    org = (x0 + (x1 - x0 - tw) // 2, y_top + th)
    cv2.putText(img, text, org, font, scale, color, thickness, cv2.LINE_AA)


def render_product(sku: Sku, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The canonical front view of ``sku``: a BGR image and an alpha mask (uint8), ``height`` px high."""
    aspect, (lx0, ly0, lx1, ly1) = _LABELS[sku.shape]
    h = height
    w = round(aspect * h)
    img = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    _silhouette(sku.shape, w, h, mask, img, sku)

    # Label: a light tint of the group colour, identical for the whole group.
    x0, y0, x1, y1 = round(lx0 * w), round(ly0 * h), round(lx1 * w), round(ly1 * h)
    label_bg = _mix(sku.base_bgr, (245, 245, 245), 0.6)
    cv2.rectangle(img, (x0, y0), (x1, y1), label_bg, -1)
    ink = _shade(sku.base_bgr, 0.45)
    lw = x1 - x0

    # Vertical layout in fractions of the product height (sums to ~0.58 < smallest label, 0.62).
    y = y0 + round(0.025 * h)
    _put_text_fit(img, sku.brand, x0 + lw // 12, x1 - lw // 12, y, round(0.07 * h), ink, 0.14)
    y += round(0.10 * h)
    r = round(0.06 * h)  # medium cue: the mark, ~10% of a 512 px image at in-shop scale
    _draw_mark(img, sku.mark, (x0 + x1) // 2, y + r, r, sku.accent_bgr)
    y += 2 * r + round(0.025 * h)
    # Medium cue: 1-4 bars centred in a fixed-height band, so count and position both differ.
    bar, gap = round(0.03 * h), round(0.02 * h)
    band = MAX_STRIPES * bar + (MAX_STRIPES - 1) * gap
    used = sku.stripes * bar + (sku.stripes - 1) * gap
    yb = y + (band - used) // 2
    for _ in range(sku.stripes):
        cv2.rectangle(img, (x0 + lw // 5, yb), (x1 - lw // 5, yb + bar - 1), ink, -1)
        yb += bar + gap
    y += band + round(0.02 * h)
    # Fine cue: the code on a line of its own, sized for the default 128 px crop (see CODE_HEIGHT).
    code_h = round(CODE_HEIGHT * h)
    _put_text_fit(img, sku.code, x0 + lw // 12, x1 - lw // 12, y, code_h, (30, 30, 30), 0.15)
    y += code_h + round(0.025 * h)
    # Finest cues on one line, for high resolutions only: 1-3 dots (left), a barcode (right).
    text_h = round(0.028 * h)
    dot_r = max(2, round(0.007 * h))
    for k in range(sku.dots):
        cv2.circle(img, (x0 + lw // 8 + k * 3 * dot_r, y + text_h // 2), dot_r, (30, 30, 30), -1, cv2.LINE_AA)
    unit = max(1, round(0.0035 * h))
    xb = x0 + round(lw * 0.45)
    for i, width in enumerate(sku.barcode):
        if xb + width * unit > x1 - lw // 20:
            break
        if i % 2 == 0:
            cv2.rectangle(img, (xb, y), (xb + width * unit - 1, y + text_h), (20, 20, 20), -1)
        xb += width * unit

    # Shading: cylinders get a horizontal cosine profile, boxes a soft gradient; a 3-D look that
    # is the same for every SKU of a group, so it carries no label information.
    xs = np.linspace(-1.0, 1.0, w, dtype=np.float32)
    if sku.shape in ("bottle", "can", "jar", "tube"):
        profile = 0.72 + 0.34 * np.cos(xs * 1.25)
    else:
        profile = 1.02 - 0.12 * (xs + 1.0) / 2
    img = np.clip(img.astype(np.float32) * profile[None, :, None], 0, 255).astype(np.uint8)
    img[mask == 0] = 0
    return img, mask


# --------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------


def _clutter_background(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A shop-shelf-like busy background: bands, random objects and low-frequency texture."""
    base = rng.integers(40, 200, size=3)
    bg = np.empty((h, w, 3), np.uint8)
    bg[:] = base.astype(np.uint8)
    for _ in range(int(rng.integers(2, 5))):  # shelf edges
        y = int(rng.integers(0, h))
        cv2.rectangle(
            bg, (0, y), (w, y + int(rng.integers(h // 40, h // 12))), rng.integers(0, 256, 3).tolist(), -1
        )
    for _ in range(int(rng.integers(6, 14))):  # other products and objects
        color = rng.integers(0, 256, 3).tolist()
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        a, b = int(rng.integers(w // 20, w // 5)), int(rng.integers(h // 20, h // 4))
        if rng.random() < 0.5:
            cv2.rectangle(bg, (cx - a, cy - b), (cx + a, cy + b), color, -1)
        else:
            cv2.ellipse(bg, (cx, cy), (a, b), float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA)
    # Low-frequency shading: a 6x6 random field blown up (linear: cubic costs 3x, looks the same).
    texture = rng.normal(0.0, 25.0, size=(6, 6, 3)).astype(np.float32)
    texture = cv2.resize(texture, (w, h), interpolation=cv2.INTER_LINEAR)
    bg = cv2.add(bg, texture, dtype=cv2.CV_8U)  # saturating uint8 add
    sigma = float(rng.uniform(1.0, 3.0))  # shallow depth of field: the shelf is out of focus
    return cv2.GaussianBlur(bg, (0, 0), sigma)


def _placement(
    pw: int,
    ph: int,
    w: int,
    h: int,
    height_frac: float,
    angle_deg: float,
    persp: float,
    shift: tuple[float, float],
    rng: np.random.Generator,
) -> np.ndarray:
    """The homography that maps the canonical product (pw x ph) into a (w x h) scene."""
    scale = height_frac * h / ph
    cx, cy = w / 2 + shift[0] * w, h / 2 + shift[1] * h
    src = np.array([[0, 0], [pw, 0], [pw, ph], [0, ph]], np.float32)
    corners = (src - [pw / 2, ph / 2]) * scale
    if persp > 0:
        corners = corners + rng.normal(0.0, persp * ph * scale, size=(4, 2))
    t = math.radians(angle_deg)
    rot = np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    dst = (corners @ rot.T + [cx, cy]).astype(np.float32)
    return cv2.getPerspectiveTransform(src, dst)


def _composite(bg: np.ndarray, product: np.ndarray, mask: np.ndarray, homography: np.ndarray) -> tuple:
    h, w = bg.shape[:2]
    fg = cv2.warpPerspective(product, homography, (w, h), flags=cv2.INTER_LINEAR)
    alpha = cv2.warpPerspective(mask, homography, (w, h), flags=cv2.INTER_LINEAR).astype(np.float32) / 255.0
    # out = bg + alpha * (fg - bg), in place on one float buffer
    out = fg.astype(np.float32)
    out -= bg
    out *= alpha[..., None]
    out += bg
    return out, alpha


def render_inshop(product: np.ndarray, mask: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """A catalogue photo: centred, upright, plain light background, a soft shadow."""
    h = w = size
    bg = np.empty((h, w, 3), np.float32)
    bg[:] = float(rng.uniform(225, 255))
    bg *= np.linspace(1.0, float(rng.uniform(0.92, 1.0)), h, dtype=np.float32)[:, None, None]
    hom = _placement(
        product.shape[1],
        product.shape[0],
        w,
        h,
        height_frac=float(rng.uniform(0.78, 0.9)),
        angle_deg=float(rng.normal(0, 1.0)),
        persp=0.0,
        shift=(float(rng.normal(0, 0.01)), float(rng.normal(0, 0.01))),
        rng=rng,
    )
    shadow = cv2.warpPerspective(mask, hom, (w, h)).astype(np.float32) / 255.0
    shadow = cv2.GaussianBlur(shadow, (0, 0), size / 60)
    shadow = np.roll(shadow, (size // 60, size // 80), axis=(0, 1))
    bg *= 1.0 - 0.25 * shadow[..., None]
    out, _ = _composite(bg, product, mask, hom)
    out *= float(rng.uniform(0.95, 1.05))
    return np.clip(out, 0, 255).astype(np.uint8)


def render_customer(
    product: np.ndarray, mask: np.ndarray, size: int, difficulty: float, rng: np.random.Generator
) -> np.ndarray:
    """A shopper's photo: clutter, rotation and perspective, lighting and colour casts, blur,
    partial occlusion, sensor noise; some are portrait (size x 4/3 size), as phone photos are."""
    w = size
    h = round(size * 4 / 3) if rng.random() < 0.3 else size
    bg = _clutter_background(h, w, rng)
    hom = _placement(
        product.shape[1],
        product.shape[0],
        w,
        h,
        height_frac=float(rng.uniform(0.5, 0.85)) * w / h,  # same product scale in portrait photos
        angle_deg=float(rng.normal(0, 12.0 * difficulty)),
        persp=0.035 * difficulty,
        shift=(float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.08, 0.08))),
        rng=rng,
    )
    out, alpha = _composite(bg, product, mask, hom)

    # Partial occlusion: a hand or another object entering from a side of the product.
    if rng.random() < 0.5 * min(1.0, difficulty):
        ys, xs = np.nonzero(alpha > 0.5)
        if len(xs):
            x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
            pw, ph = x1 - x0, y1 - y0
            color = (
                rng.uniform([120, 140, 180], [170, 190, 235])
                if rng.random() < 0.6
                else rng.uniform(0, 255, 3)
            ).tolist()
            side = int(rng.integers(0, 4))
            rx, ry = int(pw * rng.uniform(0.15, 0.35)), int(ph * rng.uniform(0.12, 0.25))
            cx = {0: x0, 1: x1}.get(side, int(rng.integers(x0, x1 + 1)))
            cy = {2: y0, 3: y1}.get(side, int(rng.integers(y0, y1 + 1)))
            cv2.ellipse(
                out, (int(cx), int(cy)), (rx, ry), float(rng.uniform(0, 180)), 0, 360, color, -1, cv2.LINE_AA
            )

    # Lighting: a directional gain ramp, a colour cast and a gamma change.
    phi = rng.uniform(0, 2 * math.pi)
    xs = (np.arange(w, dtype=np.float32) / w - 0.5) * math.cos(phi)
    ys = (np.arange(h, dtype=np.float32) / h - 0.5) * math.sin(phi)
    ramp = ys[:, None] + xs[None, :]
    gain = float(rng.uniform(0.75, 1.15)) + float(rng.uniform(0.1, 0.45)) * min(1.0, difficulty) * ramp
    cast = rng.normal(1.0, 0.07 * difficulty, size=3).clip(0.75, 1.25).astype(np.float32)
    out *= gain[..., None]
    out *= cast
    img = np.clip(out, 0, 255).astype(np.uint8)
    # Gamma through a 256-entry table: a per-pixel power on floats costs ~10x more.
    lut = (255.0 * (np.arange(256) / 255.0) ** float(rng.uniform(0.8, 1.25))).round().astype(np.uint8)
    img = cv2.LUT(img, lut)

    # Blur: defocus or hand shake, mild enough that the code stays legible at 448 on most photos.
    u = rng.random()
    if u < 0.45:
        img = cv2.GaussianBlur(img, (0, 0), float(rng.uniform(0.4, 1.1)) * difficulty + 1e-3)
    elif u < 0.65:
        length = int(rng.integers(3, 8))
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2, :] = 1.0 / length
        rot = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), float(rng.uniform(0, 180)), 1.0)
        kernel = cv2.warpAffine(kernel, rot, (length, length))
        img = cv2.filter2D(img, -1, kernel / max(kernel.sum(), 1e-6))
    # Sensor noise on luminance only: a third of the random numbers of per-channel noise.
    noise = rng.standard_normal((h, w), dtype=np.float32) * float(rng.uniform(1.0, 5.0))
    return cv2.add(img, cv2.merge([noise, noise, noise]), dtype=cv2.CV_8U)


def render_row(row: Row, cfg: SyntheticConfig, products: dict[int, tuple[np.ndarray, np.ndarray]]) -> bytes:
    """The JPEG bytes of ``row``; depends only on (seed, split, row index) and the SKU."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, SPLIT_CODES[row.split], row.index]))
    product, mask = products[row.sku.sku_id]
    if row.domain == "inshop":
        return encode_jpeg(render_inshop(product, mask, cfg.image_size, rng), INSHOP_JPEG_QUALITY, bgr=True)
    img = render_customer(product, mask, cfg.image_size, cfg.customer_difficulty, rng)
    return encode_jpeg(img, int(rng.integers(72, 93)), bgr=True)
