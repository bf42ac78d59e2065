"""ImageFolder datasets (``<root>/<split>/<class>/<image>``) that stop a run with a clear message on bad
data instead of training or reporting on the wrong thing.

- Labels come from one class list: the training split's folders, which train.py stores in every
  checkpoint; the evaluation split is mapped through it, so a class folder missing from ``val/`` cannot
  shift the others, and a folder ``train/`` does not have is refused by name.
- A symlink loop is refused instead of being walked again and again.
- An image that cannot be read (broken, truncated, a decompression bomb) is named in one line; training
  skips it, evaluation leaves it out of the metrics instead of counting another image twice.
- 16-bit greyscale images are scaled to 8 bits rather than clipped to white.
"""

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

_logger = logging.getLogger(__name__)

IMG_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
# Consecutive unreadable training images after which something is wrong with the data as a whole.
_MAX_SKIPS = 10


class DatasetError(ValueError):
    """The dataset folder is missing or malformed."""


class ImageReadError(OSError):
    """One image cannot be read; the message names the file."""


def check_image_folder(root: str, split: str) -> Path:
    """``root/split`` must exist and hold one folder per class, each with at least one image."""
    base = Path(root)
    if not base.is_dir():
        raise DatasetError(f"dataset root {base} does not exist")
    folder = base / split if split else base
    if not folder.is_dir():
        raise DatasetError(f"{folder} is missing: expected {base}/{split}/<class>/<image> (see README, 'Data')")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{folder} has no class folders")
    return folder


def scan_image_folder(folder: Path) -> dict[str, list[Path]]:
    """Images of each class folder (sorted), following symlinks but refusing loops."""
    found = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = []
        seen = set()
        for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                raise DatasetError(f"symlink loop in {folder}: {dirpath} leads back to a folder already read")
            seen.add((st.st_dev, st.st_ino))
            dirnames.sort()
            images += [Path(dirpath) / f for f in sorted(filenames) if Path(f).suffix.lower() in IMG_EXTENSIONS]
        found[class_dir.name] = images
    empty = [name for name, images in found.items() if not images]
    if empty:
        raise DatasetError(f"class folders without images in {folder}: {', '.join(empty)}")
    return found


def load_image(path: Path) -> Image.Image:
    """The image as 8-bit RGB; :class:`ImageReadError` naming the file when it cannot be read."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(path)
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(f"{path}: too many pixels to decode safely ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(f"{path}: cannot be read ({e})") from None
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit (or 32-bit integer) greyscale: convert("RGB") would clip everything above 255 to white.
        pixels = np.asarray(img, dtype=np.int64)
        top = 65535 if img.mode.startswith("I;16") or pixels.max() > 255 else 255
        img = Image.fromarray(np.clip(pixels * 255 // top, 0, 255).astype(np.uint8), mode="L")
    elif img.mode == "F":
        pixels = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(pixels * 255 / max(pixels.max(), 1e-12), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


class ImageFolderDataset(torch.utils.data.Dataset):
    """``folder/<class>/<image>`` labelled through ``class_names`` (every folder must be one of them).

    Args:
        folder: the split folder.
        class_names: the label order; None means this folder's class folders, sorted.
        is_training: unreadable images are skipped (the next one is taken) when training; otherwise they
            come back with target -1, to be left out of the metrics.
        transform: applied to each PIL image (timm's ``create_loader`` sets it).
    """

    def __init__(
        self,
        folder: Path,
        class_names: Sequence[str] | None = None,
        is_training: bool = False,
        transform: Callable | None = None,
    ):
        found = scan_image_folder(Path(folder))
        self.class_names = list(class_names) if class_names is not None else sorted(found)
        unknown = sorted(set(found) - set(self.class_names))
        if unknown:
            raise DatasetError(
                f"{folder} has class folders the model does not know: {', '.join(unknown)} "
                f"(its classes: {_short(self.class_names)})"
            )
        absent = [c for c in self.class_names if c not in found]
        if absent:
            _logger.warning(f"{folder} has no images of {len(absent)} classes: {_short(absent)}")
        index = {name: i for i, name in enumerate(self.class_names)}
        self.samples: list[tuple[Path, int]] = [(p, index[c]) for c in sorted(found) for p in found[c]]
        self.is_training = is_training
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        for _ in range(_MAX_SKIPS):
            path, target = self.samples[i]
            try:
                img = load_image(path)
                break
            except ImageReadError as e:
                if not self.is_training:
                    _logger.warning(f"{e}; left out of the evaluation")
                    img, target = Image.new("RGB", (32, 32)), -1
                    break
                _logger.warning(f"{e}; skipped")
                i = (i + 1) % len(self.samples)
        else:
            raise DatasetError(f"{_MAX_SKIPS} images in a row cannot be read, the last {path}")
        return (self.transform(img) if self.transform is not None else img), target

    def filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        path = self.samples[index][0]
        return path.name if basename else str(path.absolute() if absolute else path)


def _short(names: Sequence[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
