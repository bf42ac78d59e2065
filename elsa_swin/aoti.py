"""Package an ELSA-Swin classifier (or the dense backbone) with AOTInductor, PyTorch's ahead-of-time
compiler, then load the package and check it against eager PyTorch (``tools/export_aoti.py``).

    python tools/export_aoti.py --model elsa_swin_tiny --checkpoint elsa_swin_tiny.safetensors -o elsa_swin_tiny.pt2
    python tools/export_aoti.py --model elsa_swin_tiny --dense -o elsa_swin_tiny_backbone.pt2

The model is captured with ``torch.export`` (batch axis dynamic) and compiled with
``torch._inductor.aoti_compile_and_package`` for the CPU, or for CUDA when a GPU is present (``--device``).
Inductor compiles everything around it, and the ELSA operator stays a call into the compiled ``elsa_op``
library, so the package runs the same kernels as eager PyTorch. The machine that loads the package
therefore needs ``elsa_op`` installed and imported first, which registers the operator:

    import elsa_op, torch
    model = torch._inductor.aoti_load_package("elsa_swin_tiny.pt2")
    logits = model(images)
"""

import argparse
import json
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from elsa_op import ELSAAttention  # (importing elsa_op registers elsa_op::elsa_forward, which packages call)

from .checkpoint import load_checkpoint_file
from .classifier import create_from_checkpoint
from .convert import read_architecture

__all__ = ["ELSA_OP", "count_elsa_calls", "export_program", "load_package", "main", "package", "package_elsa_calls"]

ELSA_OP = torch.ops.elsa_op.elsa_forward.default
ELSA_OP_NAME = "elsa_op::elsa_forward"


def export_program(
    model: torch.nn.Module,
    example: torch.Tensor,
    dynamic_size: bool = False,
) -> ExportedProgram:
    """Capture ``model`` (in eval mode) with ``torch.export``, its input's batch axis dynamic.

    Args:
        model (nn.Module): the model; it is put in eval mode.
        example (Tensor[B, 3, H, W]): an example input with B >= 2 (an example batch of 1 would be
            specialised to 1).
        dynamic_size (bool): make the height and width dynamic too (the dense backbone takes any size;
            the classifier's window-attention stages are built for one). Default: False.

    Returns:
        ExportedProgram: the program, whose ELSA layers call ``torch.ops.elsa_op.elsa_forward``.
    """
    if example.shape[0] < 2:
        raise ValueError(f"the example batch must be at least 2 for a dynamic batch axis, got {example.shape[0]}")
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if dynamic_size:
        dims.update({2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO})
    with torch.no_grad():
        return torch.export.export(model.eval(), (example,), dynamic_shapes=(dims,))


def count_elsa_calls(program: ExportedProgram) -> int:
    """How many nodes of the exported graph call the ELSA operator (one per ELSA layer).

    Args:
        program (ExportedProgram): an exported model.

    Returns:
        int: the number of ``torch.ops.elsa_op.elsa_forward`` calls.
    """
    return sum(1 for node in program.graph.nodes if node.op == "call_function" and node.target is ELSA_OP)


def package(
    program: ExportedProgram,
    path: Path,
) -> Path:
    """Compile ``program`` with AOTInductor into the package ``path`` (``.pt2``), for the device its
    parameters are on.

    Args:
        program (ExportedProgram): from :func:`export_program`.
        path (Path): the package to write; its folder is created.

    Returns:
        Path: ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


def package_elsa_calls(path: Path) -> int:
    """How many calls into the ``elsa_op`` library the compiled package makes: the ELSA operator nodes of
    its extern-kernel tables (``*.json``; the operators that Inductor does not compile but calls through
    the dispatcher). A rewrite of the operator into other operators would leave none.

    Args:
        path (Path): a package written by :func:`package`.

    Returns:
        int: the number of ``elsa_op::elsa_forward`` calls.
    """
    calls = 0
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            if name.endswith(".json"):
                try:
                    table = json.loads(z.read(name))
                except ValueError:
                    continue
                nodes = table.get("nodes", []) if isinstance(table, dict) else []
                calls += sum(1 for n in nodes if n.get("node", {}).get("target") == ELSA_OP_NAME)
    return calls


def load_package(path: Path) -> Any:
    """Load a package; ``elsa_op`` is imported by this module, so its operator is registered.

    Args:
        path (Path): a package written by :func:`package`.

    Returns:
        AOTICompiledModel: callable like the model, on a batch of any size.
    """
    return torch._inductor.aoti_load_package(str(path))


def _outputs(out: Any) -> list[torch.Tensor]:
    """Args: out (Tensor | tuple[Tensor, ...]): a model's output. Returns: list[Tensor]: its tensors."""
    return list(out) if isinstance(out, (list, tuple)) else [out]


def max_difference(
    compiled: Any,
    model: torch.nn.Module,
    x: torch.Tensor,
) -> float:
    """Largest absolute difference between the package's and eager PyTorch's outputs on ``x``.

    Args:
        compiled (AOTICompiledModel): the loaded package.
        model (nn.Module): the eager model (in eval mode).
        x (Tensor[B, 3, H, W]): the input, on the model's device.

    Returns:
        float: the maximum over every output.
    """
    with torch.no_grad():
        got, want = _outputs(compiled(x)), _outputs(model(x))
    if len(got) != len(want):
        raise RuntimeError(f"the package returned {len(got)} outputs, the model {len(want)}")
    return max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))


def _dense_backbone(classifier: torch.nn.Module) -> torch.nn.Module:
    """The detection/segmentation backbone (``elsa_mm.ELSASwin``) of ``classifier``'s architecture,
    with its weights (the final norm and head aside; the backbone's per-output norms stay at their init).

    Args:
        classifier (nn.Module): an :class:`elsa_swin.ELSASwinTransformer`.

    Returns:
        nn.Module: the backbone.
    """
    try:
        from elsa_mm import ELSASwin
    except ImportError as e:
        raise RuntimeError(f"--dense needs the det/seg extras (mmengine, mmdet): {e}") from None
    attn = next((m for m in classifier.modules() if isinstance(m, ELSAAttention)), None)
    lam, gamma = (attn.lam, attn.gamma) if attn is not None else (None, None)
    arch = read_architecture(classifier.state_dict(), lam=lam, gamma=gamma)
    kwargs = {k: v for k, v in arch.items() if k not in ("num_classes", "in_chans")}
    backbone = ELSASwin(in_channels=arch["in_chans"], **kwargs)
    state = {k: v for k, v in classifier.state_dict().items() if not k.startswith(("head.", "norm."))}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("norm") for k in missing):
        raise RuntimeError(f"the backbone does not fit the classifier: missing {missing}, unexpected {unexpected}")
    return backbone


def _build(args: argparse.Namespace) -> torch.nn.Module:
    """Args: args (argparse.Namespace): the parsed command line. Returns: nn.Module: the model to package."""
    checkpoint = load_checkpoint_file(args.checkpoint) if args.checkpoint else None
    model = create_from_checkpoint(args.model, checkpoint, args.checkpoint, args.num_classes, args.img_size)
    return _dense_backbone(model) if args.dense else model


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/export_aoti.py``: export, package, load and check one model.

    Args:
        argv (Sequence[str], optional): command-line arguments; None reads ``sys.argv``. Default: None.

    Returns:
        int: the exit status, 0 when the package matches eager within ``--atol``.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="elsa_swin_tiny", help="timm model name")
    parser.add_argument(
        "--checkpoint", default="", help="weights (ours, the original's, .safetensors); default: random"
    )
    parser.add_argument("--num-classes", type=int, default=None, help="default: from the checkpoint, else 1000")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument(
        "--dense",
        action="store_true",
        help="package the detection/segmentation backbone (elsa_mm.ELSASwin, four feature maps, any image size) "
        "of the model's architecture instead of the classifier",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device to compile for (default: cuda when available, else cpu)",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .pt2 package to write")
    parser.add_argument("--check-batch", type=int, default=3, help="batch of the check (the export traces batch 2)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest difference the check accepts")
    args = parser.parse_args(argv)
    if args.output.suffix != ".pt2":
        parser.error(f"the package must end in .pt2, got {args.output}")
    try:
        model = _build(args).eval().to(args.device)
    except (RuntimeError, ValueError) as e:  # a bad file, model or --dense without mmengine
        print(f"error: {e}", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    size = args.img_size
    program = export_program(model, torch.randn(2, 3, size, size, device=args.device), dynamic_size=args.dense)
    calls = count_elsa_calls(program)
    package(program, args.output)
    packaged = package_elsa_calls(args.output)
    if packaged != calls:
        print(
            f"error: {args.output} calls elsa_op::elsa_forward {packaged} times for {calls} ELSA layers: "
            "the operator was rewritten instead of called",
            file=sys.stderr,
        )
        return 1
    compiled = load_package(args.output)
    check_size = (size, size + 32) if args.dense else (size, size)
    x = torch.randn(args.check_batch, 3, *check_size, device=args.device)
    diff = max_difference(compiled, model, x)
    print(
        f"wrote {args.output} ({args.device}; {calls} ELSA layers calling elsa_op::elsa_forward); package vs eager, "
        f"input {tuple(x.shape)}: max abs difference {diff:.3g}"
    )
    if diff > args.atol:
        print(f"error: the difference is above --atol {args.atol}", file=sys.stderr)
        return 1
    return 0
