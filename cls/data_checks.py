"""Checks of an ImageFolder-style dataset root, so that bad data stops a run with a clear message."""
from pathlib import Path

IMG_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class DatasetError(ValueError):
    """The dataset folder is missing or malformed."""


def check_image_folder(root: str, split: str) -> Path:
    """``root/split`` must exist and hold one folder per class, each with at least one image."""
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"dataset root {base} does not exist")
    folder = base / split
    if not folder.is_dir():
        raise DatasetError(f"{folder} is missing: expected {base}/{split}/<class>/<image> (see README, 'Data')")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{folder} has no class folders")
    empty = [p.name for p in classes if not any(f.suffix.lower() in IMG_EXTENSIONS for f in p.iterdir())]
    if empty:
        raise DatasetError(f"class folders without images in {folder}: {', '.join(empty)}")
    return folder
