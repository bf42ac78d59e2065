"""Deployment speed: ELSA-Swin-T against timm's Swin-T, both exported the same way, in one run.

For each model: eager PyTorch, its ONNX export (``torch.onnx.export(..., dynamo=True)``, dynamic batch) in
onnxruntime on the CPU, and its AOTInductor package (``elsa_swin.aoti``) on the CPU, at batch 1 and 8.
The timings of the two models are interleaved (one run of each in turn, repeated), so that a machine
whose speed drifts slows both alike; each cell is the median. Prints a markdown table with images/s
and the ratios ELSA-Swin-T / Swin-T and package / eager.

    python benchmarks/bench_deploy.py                  # 2 threads, batch 1 and 8
    python benchmarks/bench_deploy.py --threads 4 --batches 1 --skip-aoti
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

import elsa_swin  # noqa: F401  (registers the ELSA-Swin models with timm)
from elsa_swin.aoti import count_elsa_calls, export_program, load_package, package
from elsa_swin.onnx import export

MODELS = {"ELSA-Swin-T": "elsa_swin_tiny", "Swin-T": "swin_tiny_patch4_window7_224"}


def onnx_session(model: torch.nn.Module, path: Path, img_size: int, threads: int) -> Callable[[Any], Any]:
    """Export ``model`` to ONNX at ``path`` (dynamic batch) and return a function that runs it in onnxruntime."""
    import onnxruntime

    export(model, torch.randn(2, 3, img_size, img_size), path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})


def time_interleaved(runners: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per call of each runner, calling them in turn ``rounds`` times."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for key, run in runners.items():
            start = time.perf_counter()
            run()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of onnxruntime and PyTorch")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per cell (interleaved)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-aoti", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None, help="where to keep the exported files (default: temp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # the AOTInductor packages' OpenMP threads
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_deploy_"))
    workdir.mkdir(parents=True, exist_ok=True)

    runtimes: dict[str, dict[str, Callable[[torch.Tensor], Any]]] = {"eager": {}, "onnxruntime": {}, "AOTInductor": {}}
    torch.manual_seed(0)
    for label, name in MODELS.items():
        model = timm.create_model(name).eval()
        runtimes["eager"][label] = torch.no_grad()(model)
        if not args.skip_onnx:
            print(f"exporting {label} to ONNX ...", file=sys.stderr, flush=True)
            runtimes["onnxruntime"][label] = onnx_session(model, workdir / f"{name}.onnx", args.img_size, args.threads)
        if not args.skip_aoti:
            print(f"packaging {label} with AOTInductor ...", file=sys.stderr, flush=True)
            program = export_program(model, torch.randn(2, 3, args.img_size, args.img_size))
            if label == "ELSA-Swin-T":
                print(f"  {count_elsa_calls(program)} ELSA layers call elsa_op::elsa_forward", file=sys.stderr)
            compiled = load_package(package(program, workdir / f"{name}.pt2"))
            runtimes["AOTInductor"][label] = torch.no_grad()(compiled)

    results: dict[tuple[str, int, str], float] = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, args.img_size, args.img_size)
        runners = {
            f"{runtime}|{label}": (lambda f=f, x=x: f(x))
            for runtime, per_model in runtimes.items()
            for label, f in per_model.items()
        }
        print(f"timing batch {batch} ...", file=sys.stderr, flush=True)
        for key, seconds in time_interleaved(runners, args.rounds, args.warmup).items():
            runtime, label = key.split("|")
            results[(runtime, batch, label)] = batch / seconds

    elsa, swin = MODELS
    print(f"\nCPU, {args.threads} threads, {args.img_size}x{args.img_size}, images/s (median of {args.rounds}):\n")
    print(f"| runtime | batch | {elsa} | {swin} | {elsa} / {swin} | {elsa} vs its eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for runtime, per_model in runtimes.items():
        if not per_model:
            continue
        for batch in args.batches:
            e, s = results[(runtime, batch, elsa)], results[(runtime, batch, swin)]
            vs_eager = e / results[("eager", batch, elsa)]
            print(f"| {runtime} | {batch} | {e:.2f} | {s:.2f} | {e / s:.2f}x | {vs_eager:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
