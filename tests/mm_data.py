"""Small generated datasets for the det/seg tests: images of filled rectangles and disks, with COCO
boxes and polygon masks (pycocotools-compatible JSON) or ADE20K-style label PNGs."""

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("rectangle", "disk")
# ADE20KDataset accepts only a subset of its own class names: rectangle, disk, background play these.
SEG_CLASSES = ("wall", "building", "sky")


def _shapes(rng, width, height):
    """(class index, polygon as [x0, y0, x1, y1, ...]) for 1-3 non-tiny shapes."""
    shapes = []
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(0, 2))
        w, h = rng.integers(width // 5, width // 2), rng.integers(height // 5, height // 2)
        x0, y0 = rng.integers(0, width - w), rng.integers(0, height - h)
        if cls == 0:
            poly = [x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]
        else:
            cx, cy, r = x0 + w / 2, y0 + h / 2, min(w, h) / 2
            poly = [
                v for a in range(16) for v in (cx + r * math.cos(a * math.pi / 8), cy + r * math.sin(a * math.pi / 8))
            ]
        shapes.append((cls, [float(v) for v in poly]))
    return shapes


def _draw(shapes, width, height, rng):
    img = Image.fromarray(rng.integers(0, 60, (height, width, 3), dtype=np.uint8))
    label = Image.new("L", (width, height), 0)
    draw, draw_label = ImageDraw.Draw(img), ImageDraw.Draw(label)
    colours = [(220, 60, 60), (60, 200, 80)]
    for cls, poly in shapes:
        pts = list(zip(poly[0::2], poly[1::2], strict=True))
        draw.polygon(pts, fill=colours[cls])
        draw_label.polygon(pts, fill=cls + 1)
    return img, label


def write_coco(root: Path, splits=(("train", 8), ("val", 4)), size=(96, 80), seed=0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    width, height = size
    for split, count in splits:
        images, annotations = [], []
        for i in range(count):
            name = f"{split}_{i:03d}.jpg"
            shapes = _shapes(rng, width, height)
            img, _ = _draw(shapes, width, height, rng)
            img.save(root / "images" / name, quality=95)
            images.append(dict(id=len(images) + 1, file_name=name, width=width, height=height))
            for cls, poly in shapes:
                xs, ys = poly[0::2], poly[1::2]
                box = [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]
                area = 0.5 * abs(sum(xs[k] * ys[k - 1] - xs[k - 1] * ys[k] for k in range(len(xs))))
                annotations.append(
                    dict(
                        id=len(annotations) + 1,
                        image_id=len(images),
                        category_id=cls + 1,
                        bbox=box,
                        area=area,
                        segmentation=[poly],
                        iscrowd=0,
                    )
                )
        categories = [dict(id=k + 1, name=name) for k, name in enumerate(CLASSES)]
        (root / f"{split}.json").write_text(
            json.dumps(dict(images=images, annotations=annotations, categories=categories))
        )
    return root


def write_ade(root: Path, splits=(("training", 8), ("validation", 4)), size=(96, 80), seed=0) -> Path:
    """ADE20K layout: images/<split>/*.jpg and annotations/<split>/*.png, 0 = ignore (reduce_zero_label)."""
    rng = np.random.default_rng(seed)
    width, height = size
    for split, count in splits:
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shapes = _shapes(rng, width, height)
            img, label = _draw(shapes, width, height, rng)
            # Labels rectangle 1, disk 2, background 3; reduce_zero_label makes them 0, 1, 2 (0 would be ignored).
            arr = np.array(label)
            arr = np.where(arr == 0, 3, arr).astype(np.uint8)
            img.save(root / "images" / split / f"{i:05d}.jpg", quality=95)
            Image.fromarray(arr).save(root / "annotations" / split / f"{i:05d}.png")
    return root
