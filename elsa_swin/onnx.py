"""Export an ELSA-Swin classifier to ONNX with a dynamic batch axis, then check the file with onnxruntime
against PyTorch on the same input (``tools/export_onnx.py``).

    python tools/export_onnx.py --model elsa_swin_tiny --checkpoint elsa_swin_tiny.safetensors -o elsa_swin_tiny.onnx

It is plain ``torch.onnx.export(model, x, path, dynamo=True)``: while exporting, the ELSA operator
records itself written in standard ONNX operators (:mod:`elsa_op.decomposition`, in the form
``--elsa-form`` names), so the file runs in any ONNX runtime, with no part of this project installed.
The tool prints how long the export took and the graph's nodes by operator type.
"""

import argparse
import collections
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from elsa_op.decomposition import FORMS, decomposition_form

from .checkpoint import load_checkpoint_file
from .classifier import create_from_checkpoint


def export(model: torch.nn.Module, x: torch.Tensor, path: Path, form: str = "blocks") -> None:
    """Write ``model`` (in eval mode) as ONNX, its input's batch axis dynamic.

    Args:
        model (nn.Module): the model; it is put in eval mode.
        x (Tensor[B, 3, H, W]): the example input, B >= 2 (a batch of 1 would be specialised to 1).
        path (Path): the ``.onnx`` file to write; its folder is created.
        form (str): how the ELSA layers are written, one of :data:`elsa_op.decomposition.FORMS`.
            Default: ``"blocks"``.
    """
    batch = torch.export.Dim("batch", min=1)
    with decomposition_form(form):
        program = torch.onnx.export(
            model.eval(),
            (x,),
            dynamo=True,
            dynamic_shapes=({0: batch},),
            input_names=["image"],
            output_names=["output"],
            verbose=False,
        )
    if program is None:  # only the deprecated TorchScript exporter returns nothing
        raise RuntimeError("torch.onnx.export returned no program")
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(str(path))


def node_counts(path: Path) -> dict[str, int]:
    """The nodes of an ONNX file's main graph by operator type, most frequent first.

    Args:
        path (Path): the ``.onnx`` file.

    Returns:
        dict[str, int]: ``{op_type: count}``.
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(collections.Counter(node.op_type for node in graph.node).most_common())


def check(
    model: torch.nn.Module,
    path: Path,
    x: torch.Tensor,
) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's outputs on ``x``.

    Args:
        model (nn.Module): the PyTorch model the file was exported from.
        path (Path): the ``.onnx`` file.
        x (Tensor[B, 3, H, W]): the input (CPU, float32).

    Returns:
        float: the largest absolute difference.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model.eval()(x)
    return float((torch.from_numpy(got) - want).abs().max())


def main(argv: Sequence[str] | None = None) -> int:
    """``tools/export_onnx.py``: export one classifier and check it in onnxruntime.

    Args:
        argv (Sequence[str], optional): command-line arguments; None reads ``sys.argv``. Default: None.

    Returns:
        int: the exit status, 0 when onnxruntime matches PyTorch within ``--atol``.
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="elsa_swin_tiny", help="timm model name")
    parser.add_argument(
        "--checkpoint", default="", help="weights (ours, the original's, .safetensors); default: random"
    )
    parser.add_argument("--num-classes", type=int, default=None, help="default: from the checkpoint, else 1000")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument(
        "--check-batch",
        type=int,
        default=3,
        help="batch of the onnxruntime check (the export traces batch 2; the axis is dynamic)",
    )
    parser.add_argument("--atol", type=float, default=1e-4, help="largest difference the check accepts")
    parser.add_argument(
        "--elsa-form",
        choices=FORMS,
        default="blocks",
        help="how each ELSA layer is written (elsa_op.decomposition): 'blocks' (blocks of K x K pixels, each "
        "one MatMul; the fastest and the least memory), 'windows' (every pixel's window gathered, K*K times "
        "the features' memory) or 'taps' (a slice, multiply and add per window tap)",
    )
    args = parser.parse_args(argv)
    try:
        checkpoint = load_checkpoint_file(args.checkpoint) if args.checkpoint else None
        model = create_from_checkpoint(args.model, checkpoint, args.checkpoint, args.num_classes, args.img_size)
    except ValueError as e:  # an unreadable file, an unknown model or weights that do not fit it
        print(f"error: {e}", file=sys.stderr)
        return 1
    model.eval()
    torch.manual_seed(0)
    start = time.perf_counter()
    export(model, torch.randn(2, 3, args.img_size, args.img_size), args.output, args.elsa_form)
    seconds = time.perf_counter() - start
    counts = node_counts(args.output)
    print(f"exported {args.model} in {seconds:.1f} s ({args.elsa_form} form): {sum(counts.values())} nodes")
    print("nodes by type: " + ", ".join(f"{op} {n}" for op, n in counts.items()))
    diff = check(model, args.output, torch.randn(args.check_batch, 3, args.img_size, args.img_size))
    print(f"wrote {args.output}; onnxruntime vs PyTorch, batch {args.check_batch}: max abs difference {diff:.3g}")
    if diff > args.atol:
        print(f"error: the difference is above --atol {args.atol}", file=sys.stderr)
        return 1
    return 0
