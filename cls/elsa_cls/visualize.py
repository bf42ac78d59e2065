"""A picture of what ELSA attends to: the image, and for a few pixels of each ELSA stage the K x K
attention of every head (from the stage's last block), with each head's ghost kernels.

    python cls/visualize.py IMAGE --model elsa_swin_tiny --checkpoint elsa_swin_tiny.safetensors -o attention.png
"""

import argparse
import io
import logging
from pathlib import Path

import numpy as np
import torch

from elsa_op import ELSAAttention
from elsa_swin.files import atomic_write_bytes

from .data import ImageReadError, load_image
from .predict import eval_transform, load_classifier


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--model", default="elsa_swin_tiny")
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--pixels", type=int, default=3, help="pixels shown per stage (along the diagonal)")
    parser.add_argument("-o", "--output", type=Path, default=Path("attention.png"))
    return parser


def capture_attention(model: torch.nn.Module, x: torch.Tensor) -> list[tuple[str, ELSAAttention, torch.Tensor]]:
    """(name, layer, attention [H, W, heads, K*K]) of the last ELSA layer of each stage, for one image."""
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, ELSAAttention)]
    last: dict[str, tuple[str, ELSAAttention]] = {}
    for name, layer in layers:
        last[name.split(".blocks.")[0]] = (name, layer)
    captured = {}
    # The softmaxed attention is what enters attn_drop (an identity in eval mode).
    hooks = [
        layer.attn_drop.register_forward_hook(lambda m, i, o, name=name: captured.__setitem__(name, o[0].detach()))
        for name, layer in last.values()
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return [(name, layer, captured[name]) for name, layer in last.values()]


def pick_pixels(height: int, width: int, n: int) -> list[tuple[int, int]]:
    """Up to n distinct pixels spread along the diagonal, away from the border (fewer on small maps)."""
    spread = [(round((k + 1) * (height - 1) / (n + 1)), round((k + 1) * (width - 1) / (n + 1))) for k in range(n)]
    return list(dict.fromkeys(spread))


def draw(image: np.ndarray, stages, pixels: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = max(attn.shape[2] for _, _, attn in stages)
    chosen = [pick_pixels(attn.shape[0], attn.shape[1], pixels) for _, _, attn in stages]
    rows = sum(len(c) + 1 for c in chosen)
    fig, axes = plt.subplots(rows, heads + 1, figsize=(1.6 * (heads + 1), 1.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    row = 0
    for s, (_name, layer, attn) in enumerate(stages):
        H, W, G, KK = attn.shape
        K = layer.kernel_size
        for k, (i, j) in enumerate(chosen[s]):
            ax = axes[row + k, 0]
            ax.imshow(image)
            ax.scatter([(j + 0.5) * image.shape[1] / W], [(i + 0.5) * image.shape[0] / H], s=30, c="red", marker="x")
            ax.set_title(f"stage {s + 1} ({i},{j})", fontsize=7)
            for g in range(G):
                axes[row + k, g + 1].imshow(attn[i, j, g].reshape(K, K).float().numpy(), cmap="viridis")
                if k == 0:
                    axes[row + k, g + 1].set_title(f"head {g + 1}", fontsize=7)
        # Ghost kernels, averaged over each head's channels.
        ghost_row = row + len(chosen[s])
        axes[ghost_row, 0].text(
            0.5, 0.5, f"stage {s + 1}\nghost kernels\n(mean per head)", ha="center", va="center", fontsize=7
        )
        for kernel_name in ("ghost_add", "ghost_mul"):
            kernel = getattr(layer, kernel_name)
            if kernel is None:
                continue
            per_head = kernel.detach().float().reshape(G, -1, K, K).mean(1)
            for g in range(G):
                axes[ghost_row, g + 1].imshow(per_head[g].numpy(), cmap="coolwarm")
                axes[ghost_row, g + 1].set_title(kernel_name, fontsize=6)
            break
        row += len(chosen[s]) + 1
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def visualize(model, image_path: Path, output: Path, pixels: int = 3, img_size: int | None = None) -> None:
    try:
        image = load_image(image_path)
    except ImageReadError as e:
        raise SystemExit(f"error: {e}") from None
    transform = eval_transform(model, img_size)
    x = transform(image).unsqueeze(0)
    stages = capture_attention(model, x)
    if not stages:
        raise SystemExit("error: the model has no ELSA layers to show")
    size = x.shape[-1]
    shown = np.asarray(image.resize((size, size)))
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(output, draw(shown, stages, pixels))


def main(argv=None):
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    args = build_parser().parse_args(argv)
    if args.pixels < 1:
        raise SystemExit(f"error: --pixels must be at least 1, got {args.pixels}")
    model, _ = load_classifier(args.model, args.checkpoint, args.img_size)
    visualize(model, args.image, args.output, args.pixels, args.img_size)
    print(f"wrote {args.output}")
    return 0
