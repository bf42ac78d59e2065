"""Convert an ELSA-Swin classification checkpoint (the original code's, or ours) into our layout, as a
``.safetensors`` file (or ``.pth``): only tensors, safe to share and to load.

    python tools/convert_checkpoint.py SRC DST.safetensors [--model elsa_swin_tiny] [--ema]
    python tools/convert_checkpoint.py SRC DST.pth --backbone      # for det/seg: model.pretrained=DST.pth
    python tools/convert_checkpoint.py SRC --inspect               # the architecture; what maps, what is missing

Any ELSA-Swin converts, not only the published sizes: the architecture (embed dim, depths, heads, which
stages use ELSA, window and ELSA kernel sizes, ...) is read from the checkpoint's own keys and shapes,
written into the output file's metadata, and printed as the ``timm.create_model`` call that rebuilds the
model, e.g. ``timm.create_model("elsa_swin_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=DST),
embed_dim=48, depths=(2, 2, 4, 2), ...)``. A checkpoint of a published size names that size and needs no
extra arguments. ``--model`` maps onto a given model instead (bias tables of another window size are then
resized). Two hyperparameters are not stored in any checkpoint: the ghost head's exponent ``lam`` and scale
``gamma``; they default to the original's 0 and 1, and ``--lam`` / ``--gamma`` set them.
"""

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import timm
import torch

from .checkpoint import CheckpointError, head_classes, load_checkpoint_file, unwrap_state_dict
from .classifier import ELSASwinTransformer, checkpoint_filter_fn
from .files import atomic_torch_save, atomic_write_bytes

__all__ = ["Conversion", "convert", "create_model_call", "main", "read_architecture"]

# The model every architecture is built from (its registered defaults are all overridden by the
# architecture read from a checkpoint), and the registered sizes a checkpoint may turn out to be.
BASE_MODEL = "elsa_swin_tiny"
REGISTERED = ("elsa_swin_nano", "elsa_swin_tiny", "elsa_swin_small", "elsa_swin_base")
DEFAULT_LAM = 0.0
DEFAULT_GAMMA = 1.0


def _block_prefixes(state: dict[str, torch.Tensor]) -> dict[int, list[str]]:
    """``layers.I.blocks.J.`` prefixes of the checkpoint, per stage I, in block order.

    Args:
        state (dict[str, Tensor]): the checkpoint's tensors.

    Returns:
        dict[int, list[str]]: the block prefixes of each stage.
    """
    stages: dict[int, set[int]] = {}
    for k in state:
        m = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            stages.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not stages or sorted(stages) != list(range(len(stages))):
        raise CheckpointError(f"its stages are not numbered layers.0 ... layers.N: found {sorted(stages)}")
    prefixes = {}
    for i, blocks in stages.items():
        if sorted(blocks) != list(range(len(blocks))):
            raise CheckpointError(f"the blocks of stage {i} are not numbered 0 ... N: found {sorted(blocks)}")
        prefixes[i] = [f"layers.{i}.blocks.{j}." for j in range(len(blocks))]
    return prefixes


def _one(values: Sequence[Any], what: str) -> Any:
    """The single value that every stage or block agrees on; a clear error if they differ.

    Args:
        values (Sequence[Any]): one value per block (not empty).
        what (str): what the values are, for the error message.

    Returns:
        Any: the value.
    """
    distinct = sorted(set(values), key=str)
    if len(distinct) != 1:
        raise CheckpointError(f"its {what} differ between blocks ({distinct}); the model takes one value")
    return distinct[0]


def read_architecture(
    state: dict[str, torch.Tensor],
    lam: float | None = None,
    gamma: float | None = None,
) -> dict[str, Any]:
    """The keyword arguments of :class:`elsa_swin.ELSASwinTransformer` that a classifier checkpoint was
    trained with, read from its keys and shapes; the original's names and ours both work.

    Args:
        state (dict[str, Tensor]): the model's tensors (already unwrapped from a training checkpoint).
        lam (float, optional): the exponent of the multiplicative ghost kernel, which checkpoints do not
            store. None: 0 when the checkpoint has no multiplicative kernel, else an error asks for it.
            Default: None.
        gamma (float, optional): the scale of the additive ghost kernel, which checkpoints do not store.
            None: 1 when the checkpoint has an additive kernel, else 0. Default: None.

    Returns:
        dict[str, Any]: ``in_chans``, ``patch_size``, ``embed_dim``, ``depths``, ``num_heads``,
        ``elsa_stages``, ``window_size``, ``kernel_size``, ``group_width``, ``lam``, ``gamma``,
        ``mlp_ratio``, ``qkv_bias`` and ``num_classes`` (0 for a checkpoint without a classifier head).
        Raises :class:`CheckpointError` for what is not an ELSA-Swin classifier our model can rebuild.
    """
    if "patch_embed.proj.weight" not in state:
        raise CheckpointError("it holds no patch_embed.proj.weight: not an ELSA-Swin classifier (give --model?)")
    if "absolute_pos_embed" in state:
        raise CheckpointError("it has an absolute position embedding (ape=True), which ELSA-Swin here does not build")
    if "patch_embed.norm.weight" not in state:
        raise CheckpointError("its patch embedding has no norm (patch_norm=False), which ELSA-Swin here always has")
    embed_dim, in_chans, patch_size, _ = state["patch_embed.proj.weight"].shape
    prefixes = _block_prefixes(state)
    depths: list[int] = []
    num_heads: list[Any] = []
    elsa_stages: list[tuple[int, bool]] = []
    kernels: list[int] = []
    group_widths: list[int] = []
    windows: list[int] = []
    mlp_ratios: list[float] = []
    qkv_biases: list[bool] = []
    ghosts: list[tuple[bool, bool]] = []
    for i in sorted(prefixes):
        dim = embed_dim * 2**i
        depths.append(len(prefixes[i]))
        heads = []
        for p in prefixes[i]:
            if p + "attn.attn.0.weight" in state:  # an ELSA block
                conv, logits = state[p + "attn.attn.0.weight"], state[p + "attn.attn.2.weight"]
                K = conv.shape[-1]
                kernels.append(K)
                group_widths.append(conv.shape[1])
                heads.append(logits.shape[0] // (K * K))
                qkv_biases.append(p + "attn.pre_proj.bias" in state)
                ghosts.append(_ghosts_of(state, p + "attn."))
                kind = True
            elif p + "attn.rb" in state:  # the original's window attention: table [heads, (2w - 1)^2]
                heads.append(state[p + "attn.rb"].shape[0])
                windows.append(_window_of(state[p + "attn.rb"].shape[1], p))
                qkv_biases.append(p + "attn.pre_proj.bias" in state)
                kind = False
            elif p + "attn.relative_position_bias_table" in state:  # ours: [(2w - 1)^2, heads]
                table = state[p + "attn.relative_position_bias_table"]
                heads.append(table.shape[1])
                windows.append(_window_of(table.shape[0], p))
                qkv_biases.append(p + "attn.qkv.bias" in state)
                kind = False
            else:
                raise CheckpointError(f"block {p.rstrip('.')} has neither ELSA nor window attention weights")
            if p + "mlp.fc1.weight" in state:
                mlp_ratios.append(state[p + "mlp.fc1.weight"].shape[0] / dim)
            elsa_stages.append((i, kind))
        num_heads.append(heads)
    kernel_size = int(_one(kernels, "ELSA kernel sizes")) if kernels else 7
    num_heads = [_one(heads, f"head counts in stage {i}") for i, heads in enumerate(num_heads)]
    stage_kinds = [
        _one([k for j, k in elsa_stages if j == i], f"attention kinds in stage {i}") for i in sorted(prefixes)
    ]
    has_mul, has_add = _one(ghosts, "ghost heads") if ghosts else (False, False)
    single_packed = any(k.endswith("ghost_head") and v.dim() == 4 for k, v in state.items())
    if single_packed and lam is not None and lam != 0 and gamma == 0:
        has_mul, has_add = True, False  # the one packed kernel is the multiplicative one, as the caller says
    if has_mul and lam is None:
        raise CheckpointError(
            "its ELSA layers have a multiplicative ghost kernel (lam != 0), whose exponent lam checkpoints do not "
            "store: give --lam (the value the model was trained with)"
        )
    lam = lam if lam is not None else DEFAULT_LAM
    if gamma is None:
        gamma = DEFAULT_GAMMA if has_add else 0.0
    if ghosts and (lam != 0, gamma != 0) != (has_mul, has_add):
        raise CheckpointError(
            f"lam={lam} and gamma={gamma} give the ELSA layers {_ghost_names(lam != 0, gamma != 0)}, but the "
            f"checkpoint holds {_ghost_names(has_mul, has_add)}"
        )
    arch: dict[str, Any] = dict(
        in_chans=int(in_chans),
        patch_size=int(patch_size),
        embed_dim=int(embed_dim),
        depths=tuple(depths),
        num_heads=tuple(int(h) for h in num_heads),
        elsa_stages=tuple(stage_kinds),
        window_size=int(_one(windows, "window sizes")) if windows else 7,
        kernel_size=kernel_size,
        group_width=int(_one(group_widths, "ELSA group widths")) if group_widths else 8,
        lam=float(lam),
        gamma=float(gamma),
        mlp_ratio=float(_one(mlp_ratios, "MLP ratios")) if mlp_ratios else 4.0,
        qkv_bias=bool(_one(qkv_biases, "q/k/v biases")),
        num_classes=head_classes(state) or 0,
    )
    return arch


def _ghosts_of(state: dict[str, torch.Tensor], prefix: str) -> tuple[bool, bool]:
    """(has a multiplicative, has an additive ghost kernel) of one ELSA layer. The original packs both in
    ``ghost_head`` [2, 1, C, K, K], or the one it has in [1, C, K, K]: the additive one unless the layer was
    built with gamma = 0, which only the caller can know, so one packed kernel counts as additive here.

    Args:
        state (dict[str, Tensor]): the checkpoint's tensors.
        prefix (str): the layer's prefix, ending in ``attn.``.

    Returns:
        tuple[bool, bool]: whether ``ghost_mul`` and ``ghost_add`` are present.
    """
    if prefix + "ghost_head" in state:
        packed = state[prefix + "ghost_head"]
        return (True, True) if packed.dim() == 5 else (False, True)
    return prefix + "ghost_mul" in state, prefix + "ghost_add" in state


def _ghost_names(mul: bool, add: bool) -> str:
    """Args: mul (bool), add (bool): which ghost kernels. Returns: str: their names, for messages."""
    names = [n for n, present in (("ghost_mul", mul), ("ghost_add", add)) if present]
    return " and ".join(names) or "no ghost kernel"


def _window_of(positions: int, prefix: str) -> int:
    """The window size w of a relative position bias table with (2w - 1)^2 rows.

    Args:
        positions (int): the table's number of positions.
        prefix (str): the block's prefix, for the error message.

    Returns:
        int: w.
    """
    side = math.isqrt(positions)
    if side * side != positions or side % 2 == 0:
        raise CheckpointError(f"{prefix}attn's bias table has {positions} positions, not (2w - 1)^2 for a window w")
    return (side + 1) // 2


def create_model_call(name: str, kwargs: dict[str, Any], file: str | Path, num_classes: int) -> str:
    """The ``timm.create_model`` call (Python source) that rebuilds a converted model from ``file``.

    Args:
        name (str): the registered model name.
        kwargs (dict[str, Any]): the architecture arguments to pass besides the name (may be empty).
        file (str | Path): the converted file.
        num_classes (int): classes of its head; it goes into the pretrained cfg, since timm drops pretrained
            head weights whose size differs from the cfg's ``num_classes``.

    Returns:
        str: one line of Python.
    """
    args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    overlay = f'dict(file="{file}", num_classes={num_classes})'
    return f'timm.create_model("{name}", pretrained=True, pretrained_cfg_overlay={overlay}{args})'


class Conversion:
    """The result of :func:`convert`.

    Attributes:
        model_name (str): the registered model to create.
        model_kwargs (dict[str, Any]): the arguments to create it with besides ``num_classes``: for a
            registered size (or with ``--model``) only ``lam``/``gamma`` where they are not the defaults,
            otherwise the full architecture.
        architecture (dict[str, Any]): the architecture read from the checkpoint (empty with ``--model``).
        num_classes (int): classes of the classifier head (0: no head).
        tensors (dict[str, Tensor]): the mapped tensors that the model has.
        missing (list[str]): keys the model has and the checkpoint lacks.
        unexpected (list[str]): keys the checkpoint has and the model lacks.
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: dict[str, Any],
        architecture: dict[str, Any],
        num_classes: int,
        tensors: dict[str, torch.Tensor],
        missing: list[str],
        unexpected: list[str],
    ) -> None:
        self.model_name = model_name
        self.model_kwargs = model_kwargs
        self.architecture = architecture
        self.num_classes = num_classes
        self.tensors = tensors
        self.missing = missing
        self.unexpected = unexpected


def _registered_match(arch: dict[str, Any]) -> str | None:
    """The registered model whose defaults are exactly ``arch`` (its head size and lam/gamma aside),
    read from the model itself rather than from a table of sizes.

    Args:
        arch (dict[str, Any]): from :func:`read_architecture`.

    Returns:
        str | None: the registered name, or None.
    """
    for name in REGISTERED:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=arch["num_classes"], lam=arch["lam"], gamma=arch["gamma"])
        try:
            own = read_architecture(model.state_dict(), lam=arch["lam"], gamma=arch["gamma"])
        except CheckpointError:
            continue
        if own == arch:
            return name
    return None


def convert(
    src: Path,
    model_name: str | None = None,
    use_ema: bool = False,
    lam: float | None = None,
    gamma: float | None = None,
) -> Conversion:
    """Read ``src`` and map its tensors onto the model it was trained as (or onto ``model_name``).

    Args:
        src (Path): checkpoint file (``.pth``, ``.pth.tar``, ``.safetensors``), the original's or ours.
        model_name (str, optional): map onto this registered model (with its default architecture)
            instead of the architecture read from the checkpoint. Default: None.
        use_ema (bool): take the EMA weights (``state_dict_ema``). Default: False.
        lam (float, optional): exponent of the multiplicative ghost kernel (not stored in checkpoints);
            see :func:`read_architecture`. Default: None.
        gamma (float, optional): scale of the additive ghost kernel (not stored in checkpoints).
            Default: None.

    Returns:
        Conversion: the model to create, the mapped tensors and what does not fit. Raises
        :class:`CheckpointError` for an unreadable file or a checkpoint that does not fit its model's shapes.
    """
    checkpoint = load_checkpoint_file(src)
    state = unwrap_state_dict(checkpoint, use_ema=use_ema, source=str(src))
    if model_name is not None:
        num_classes = head_classes(state) or 0
        arch: dict[str, Any] = {}
        kwargs = {k: v for k, v in (("lam", lam), ("gamma", gamma)) if v is not None}
    else:
        try:
            arch = read_architecture(state, lam=lam, gamma=gamma)
        except CheckpointError as e:
            raise CheckpointError(f"{src}: {e}") from None
        num_classes = arch["num_classes"]
        registered = _registered_match(arch)
        if registered is not None:
            # A registered size needs only the ghost head's hyperparameters, where they are not its defaults.
            model_name = registered
            kwargs = {
                k: arch[k] for k, default in (("lam", DEFAULT_LAM), ("gamma", DEFAULT_GAMMA)) if arch[k] != default
            }
        else:
            # Any other architecture is the base model with every architecture argument overridden; the head
            # size goes into the pretrained cfg (timm drops a head whose size differs from the cfg's).
            model_name = BASE_MODEL
            kwargs = {k: v for k, v in arch.items() if k != "num_classes"}
    build: dict[str, Any] = dict(kwargs, num_classes=num_classes)
    with torch.device("meta"):
        try:
            model = timm.create_model(model_name, **build)
        except RuntimeError as e:
            raise CheckpointError(f"--model {model_name}: {e}") from None
    mapped = checkpoint_filter_fn(state, cast(ELSASwinTransformer, model))
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
    return Conversion(model_name, kwargs, arch, num_classes, tensors, missing, unexpected)


def _format_arch(arch: dict[str, Any]) -> str:
    """Args: arch (dict[str, Any]): an architecture. Returns: str: ``key=value`` pairs, for printing."""
    return ", ".join(f"{k}={v!r}" for k, v in arch.items())


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/convert_checkpoint.py``: convert or inspect one checkpoint.

    Args:
        argv (Sequence[str], optional): command-line arguments; None reads ``sys.argv``. Default: None.

    Returns:
        int: the exit status, 0 on success, 1 with a one-line error on stderr.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="checkpoint to convert (.pth/.pth.tar/.safetensors)")
    parser.add_argument("dst", type=Path, nargs="?", help="output file: .safetensors, or .pth")
    parser.add_argument(
        "--model",
        default=None,
        help="map onto this registered model (default: the architecture read from the checkpoint)",
    )
    parser.add_argument("--ema", action="store_true", help="take the EMA weights (state_dict_ema)")
    parser.add_argument(
        "--lam",
        type=float,
        default=None,
        help="exponent of the multiplicative ghost kernel, not stored in checkpoints (default: 0, none)",
    )
    parser.add_argument(
        "--gamma",
        type=float,
        default=None,
        help="scale of the additive ghost kernel, not stored in checkpoints (default: 1 if there is one)",
    )
    parser.add_argument(
        "--backbone",
        action="store_true",
        help="write the backbone only (no classifier head or final norm), for det/seg model.pretrained",
    )
    parser.add_argument(
        "--inspect",
        action="store_true",
        help="print the architecture, what maps, what is missing and unexpected; write nothing",
    )
    args = parser.parse_args(argv)
    if not args.inspect and args.dst is None:
        parser.error("give DST, or --inspect")
    if args.dst is not None and args.dst.suffix not in (".safetensors", ".pth", ".tar"):
        parser.error(f"DST must end in .safetensors or .pth, got {args.dst}")
    try:
        c = convert(args.src, args.model, args.ema, lam=args.lam, gamma=args.gamma)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    name = c.model_name
    if args.inspect:
        print(f"{args.src}: {name}, {c.num_classes} classes{' (EMA weights)' if args.ema else ''}")
        if c.architecture:
            print(f"architecture: {_format_arch(c.architecture)}")
        print(f"maps onto the model: {len(c.tensors)} tensors, {sum(t.numel() for t in c.tensors.values()):,} values")
        print(f"missing (the model has, the file lacks): {', '.join(c.missing) or 'none'}")
        print(f"unexpected (the file has, the model lacks): {', '.join(c.unexpected) or 'none'}")
        return 0
    if c.missing or c.unexpected:
        print(
            f"error: {args.src} does not fit {name}: missing {c.missing[:5]}, unexpected {c.unexpected[:5]} "
            "(see --inspect)",
            file=sys.stderr,
        )
        return 1
    tensors = c.tensors
    if args.backbone:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(("head.", "norm."))}
    args.dst.parent.mkdir(parents=True, exist_ok=True)
    if args.dst.suffix == ".safetensors":
        from safetensors.torch import save

        meta = {
            "format": "pt",
            "architecture": name,
            "model_kwargs": json.dumps(c.model_kwargs),
            "num_classes": str(c.num_classes),
            "backbone": str(args.backbone),
        }
        atomic_write_bytes(args.dst, save(tensors, metadata=meta))
    else:
        atomic_torch_save({"state_dict": tensors, "arch": name, "model_kwargs": c.model_kwargs}, args.dst)
    print(f"wrote {args.dst}: {name}{' backbone' if args.backbone else ''}, {len(tensors)} tensors")
    if c.architecture:
        print(f"architecture: {_format_arch(c.architecture)}")
    print(f"load it with: {create_model_call(name, c.model_kwargs, args.dst, c.num_classes)}")
    return 0
