"""Where onnxruntime spends the time of ELSA-Swin-T's first ELSA layer, node by node.

Exports the layer (56x56 pixels, 96 channels at 224x224) in one form of ``elsa_op.decomposition``, runs it
in onnxruntime on the CPU with its profiler on (``SessionOptions.enable_profiling``), and prints the
nodes that took the most time: their operator, milliseconds per call, share of the layer and output
shape. ``benchmarks/bench_deploy.py`` times the same layer in every form.

    python benchmarks/profile_onnx.py                   # blocks form, batch 8, 2 threads
    python benchmarks/profile_onnx.py --form windows --batch 1
"""

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime
import timm
import torch

import elsa_swin  # noqa: F401  (registers the ELSA-Swin models with timm)
from elsa_op import ELSAAttention
from elsa_op.decomposition import FORMS
from elsa_swin.onnx import export


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--form", choices=FORMS, default=FORMS[0], help="how the layer is exported")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime's threads")
    parser.add_argument("--calls", type=int, default=6, help="profiled calls, after one warm-up call")
    parser.add_argument("--top", type=int, default=12, help="how many nodes to list")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = timm.create_model("elsa_swin_tiny").eval()
    layer = next(m for m in model.modules() if isinstance(m, ELSAAttention))
    shape = (56, 56, int(layer.dim))
    workdir = Path(tempfile.mkdtemp(prefix="profile_onnx_"))
    path = workdir / f"elsa_layer_{args.form}.onnx"
    export(layer, torch.randn(2, *shape), path, args.form)

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.enable_profiling = True
    options.profile_file_prefix = str(workdir / "profile")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal((args.batch, *shape), np.float32)}
    for _ in range(args.calls + 1):  # the first call warms up, and is left out below
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())

    # Each node's kernel time over the calls after the first: onnxruntime records one event per node run.
    runs: dict[str, list[float]] = {}
    kind, shapes = {}, {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            runs.setdefault(node, []).append(event["dur"] / 1e3)
            kind[node] = event["args"]["op_name"]
            shapes[node] = [list(t.values())[0] for t in event["args"].get("output_type_shape", [])]
    per_call = Counter({node: sum(ms[1:]) / max(len(ms) - 1, 1) for node, ms in runs.items()})
    total = sum(per_call.values())
    print(
        f"\nELSA-Swin-T's first ELSA layer, {args.form} form, batch {args.batch}, {args.threads} threads, onnxruntime "
        f"{onnxruntime.__version__}: {total:.1f} ms per call in its nodes ({args.calls} calls)\n"
    )
    print("| node | operator | ms per call | share | output shape |")
    print("|---|---|---:|---:|---|")
    for node, ms in per_call.most_common(args.top):
        print(f"| {node} | {kind[node]} | {ms:.2f} | {ms / total:.0%} | {shapes[node]} |")
    by_op: Counter = Counter()
    for node, ms in per_call.items():
        by_op[kind[node]] += ms
    print("\nby operator: " + ", ".join(f"{op} {ms / total:.0%}" for op, ms in by_op.most_common()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
