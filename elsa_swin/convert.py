"""Convert an ELSA-Swin classification checkpoint (the original code's, or ours) into our layout, as a
``.safetensors`` file (or ``.pth``): only tensors, safe to share and to load.

    python tools/convert_checkpoint.py SRC DST.safetensors [--model elsa_swin_tiny] [--ema]
    python tools/convert_checkpoint.py SRC DST.pth --backbone      # for det/seg: model.pretrained=DST.pth
    python tools/convert_checkpoint.py SRC --inspect               # what maps, what is missing or unexpected

The architecture is read from the checkpoint's shapes unless ``--model`` names it. The result loads
with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=DST))``, with
``cls/validate.py --checkpoint`` and ``cls/train.py --initial-checkpoint``.
"""

import argparse
import re
import sys
from pathlib import Path

import timm
import torch

from .checkpoint import CheckpointError, load_checkpoint_file, unwrap_state_dict
from .classifier import checkpoint_filter_fn
from .files import atomic_torch_save, atomic_write_bytes

# (embed_dim, depths) -> model name
VARIANTS = {
    (32, (2, 2, 2, 2)): "elsa_swin_nano",
    (96, (2, 2, 6, 2)): "elsa_swin_tiny",
    (96, (2, 2, 18, 2)): "elsa_swin_small",
    (128, (2, 2, 18, 2)): "elsa_swin_base",
}


def infer_model(state: dict[str, torch.Tensor]) -> tuple[str, int]:
    """(model name, number of classes) from a classifier's tensors."""
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError("it holds no patch_embed.proj.weight: not an ELSA-Swin classifier (give --model?)")
    embed_dim = state["patch_embed.proj.weight"].shape[0]
    blocks = {}
    for k in state:
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    depths = tuple(blocks[i] for i in sorted(blocks))
    name = VARIANTS.get((embed_dim, depths))
    if name is None:
        raise CheckpointError(
            f"embed_dim {embed_dim} and depths {depths} are none of {sorted(set(VARIANTS.values()))}; give --model"
        )
    head = next((state[k] for k in ("head.fc.weight", "head.weight") if k in state), None)
    return name, head.shape[0] if head is not None else 0


def convert(src: Path, model_name: str = None, use_ema: bool = False):
    """(model name, number of classes, mapped tensors, missing keys, unexpected keys)."""
    checkpoint = load_checkpoint_file(src)
    state = unwrap_state_dict(checkpoint, use_ema=use_ema)
    if use_ema and not any(isinstance(checkpoint.get(k), dict) for k in ("state_dict_ema", "model_ema")):
        raise CheckpointError(f"{src} holds no EMA weights (state_dict_ema)")
    inferred, num_classes = infer_model(state)
    model_name = model_name or inferred
    with torch.device("meta"):
        model = timm.create_model(model_name, num_classes=num_classes)
    mapped = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    missing = [k for k in own if k not in mapped]
    unexpected = [k for k in mapped if k not in own]
    wrong = [
        f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in mapped.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise CheckpointError(f"{src} does not fit {model_name}: {'; '.join(wrong[:4])}")
    tensors = {k: v.contiguous() for k, v in mapped.items() if k in own}
    return model_name, num_classes, tensors, missing, unexpected


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="checkpoint to convert (.pth/.pth.tar/.safetensors)")
    parser.add_argument("dst", type=Path, nargs="?", help="output file: .safetensors, or .pth")
    parser.add_argument("--model", default=None, help="model name (default: read from the checkpoint's shapes)")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights (state_dict_ema)")
    parser.add_argument(
        "--backbone",
        action="store_true",
        help="write the backbone only (no classifier head or final norm), for det/seg model.pretrained",
    )
    parser.add_argument(
        "--inspect", action="store_true", help="list what maps, what is missing and unexpected; write nothing"
    )
    args = parser.parse_args(argv)
    if not args.inspect and args.dst is None:
        parser.error("give DST, or --inspect")
    if args.dst is not None and args.dst.suffix not in (".safetensors", ".pth", ".tar"):
        parser.error(f"DST must end in .safetensors or .pth, got {args.dst}")
    try:
        name, num_classes, tensors, missing, unexpected = convert(args.src, args.model, args.ema)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.inspect:
        print(f"{args.src}: {name}, {num_classes} classes{' (EMA weights)' if args.ema else ''}")
        print(f"maps onto the model: {len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} values")
        print(f"missing (the model has, the file lacks): {', '.join(missing) or 'none'}")
        print(f"unexpected (the file has, the model lacks): {', '.join(unexpected) or 'none'}")
        return 0
    if missing or unexpected:
        print(
            f"error: {args.src} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]} "
            "(see --inspect)",
            file=sys.stderr,
        )
        return 1
    if args.backbone:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(("head.", "norm."))}
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    if args.dst.suffix == ".safetensors":
        from safetensors.torch import save

        meta = {"format": "pt", "architecture": name, "num_classes": str(num_classes), "backbone": str(args.backbone)}
        atomic_write_bytes(args.dst, save(tensors, metadata=meta))
    else:
        atomic_torch_save({"state_dict": tensors, "arch": name}, args.dst)
    print(f"wrote {args.dst}: {name}{' backbone' if args.backbone else ''}, {len(tensors)} tensors")
    return 0
