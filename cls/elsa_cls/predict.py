"""Top-k classes of images with a trained classifier.

    python cls/predict.py IMAGE [IMAGE ...] --model elsa_swin_tiny --checkpoint elsa_swin_tiny.safetensors

Class names come from the checkpoint (train.py stores them), else from timm's ImageNet-1k names when the
classifier has 1000 classes, else they are the class indices.
"""

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from timm.data import ImageNetInfo, create_transform, resolve_data_config

import elsa_swin  # noqa: F401  (registers the ELSA-Swin models with timm)
from elsa_swin import create_from_checkpoint, load_checkpoint_file

from .data import ImageReadError, load_image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("--model", default="elsa_swin_tiny")
    parser.add_argument("--checkpoint", required=True, help="weights (train.py's, the original's, .safetensors)")
    parser.add_argument("--use-ema", action="store_true", help="the checkpoint's EMA weights")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def class_names(checkpoint: dict, num_classes: int) -> list[str]:
    names = checkpoint.get("class_names")
    if names is not None and len(names) == num_classes:
        return list(names)
    if num_classes == 1000:
        info = ImageNetInfo()
        return [info.index_to_description(i) for i in range(num_classes)]
    return [str(i) for i in range(num_classes)]


def load_classifier(model_name: str, checkpoint_path: str, img_size: int | None = None, use_ema: bool = False):
    """(model in eval mode, its class names) from a checkpoint; errors as one-line SystemExit."""
    try:
        checkpoint = load_checkpoint_file(checkpoint_path)
        model = create_from_checkpoint(model_name, checkpoint, checkpoint_path, img_size=img_size, use_ema=use_ema)
    except ValueError as e:  # an unreadable file, an unknown model or weights that do not fit it
        raise SystemExit(f"error: {e}") from None
    return model.eval(), class_names(checkpoint, model.num_classes)


def eval_transform(model, img_size: int | None = None):
    """The evaluation transform of the model's data config (at ``img_size`` if given), as validate.py's."""
    return create_transform(**resolve_data_config({"img_size": img_size} if img_size else {}, model=model))


def predict_images(
    model, names: Sequence[str], paths: Sequence[Path], topk: int, device: torch.device, img_size: int | None = None
):
    """[(path, [(name, probability), ...]), ...] for each image; unreadable images stop with their name."""
    transform = eval_transform(model, img_size)
    results = []
    for path in paths:
        try:
            x = transform(load_image(path)).unsqueeze(0).to(device)
        except ImageReadError as e:
            raise SystemExit(f"error: {e}") from None
        with torch.no_grad():
            probs = model(x).float().softmax(-1)[0]
        top = probs.topk(min(topk, len(names)))
        results.append((path, [(names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist(), strict=True)]))
    return results


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.topk < 1:
        raise SystemExit(f"error: --topk must be at least 1, got {args.topk}")
    device = torch.device(args.device)
    model, names = load_classifier(args.model, args.checkpoint, args.img_size, args.use_ema)
    model.to(device)
    for path, top in predict_images(model, names, args.images, args.topk, device, args.img_size):
        print(path)
        for name, p in top:
            print(f"  {100 * p:6.2f}%  {name}")
    return 0
