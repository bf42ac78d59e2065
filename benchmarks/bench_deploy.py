"""Deployment speed: ELSA-Swin-T against timm's Swin-T, both exported the same way, in one run.

For each model: eager PyTorch, its ONNX export (``torch.onnx.export(..., dynamo=True)``, dynamic batch) in
onnxruntime on the CPU, and its AOTInductor package (``elsa_swin.aoti``) on the CPU, at batch 1 and 8.
The timings of the two models are interleaved (one run of each in turn, repeated), so that a machine
whose speed drifts slows both alike. Prints a markdown table with images/s (the median over the rounds)
and the ratios ELSA-Swin-T / Swin-T and package / eager: the median of the rounds' ratios, with their
range over the rounds as the spread. ``benchmarks/profile_aoti.py`` shows where the packages' time goes.

A second table shows the forms an ELSA layer can be exported in (``elsa_op.decomposition.FORMS``): for
ELSA-Swin-T's first ELSA layer (56x56 pixels, 96 channels at 224x224) alone in onnxruntime, its export
time, its time per call and the peak memory one call adds to a fresh process, at each batch.

    python benchmarks/bench_deploy.py                  # 2 threads, batch 1 and 8
    python benchmarks/bench_deploy.py --threads 4 --batches 1 --skip-aoti
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch

import elsa_swin  # noqa: F401  (registers the ELSA-Swin models with timm)
from elsa_op import ELSAAttention
from elsa_op.decomposition import FORMS
from elsa_swin.aoti import count_elsa_calls, export_program, load_package, package
from elsa_swin.onnx import export

MODELS = {"ELSA-Swin-T": "elsa_swin_tiny", "Swin-T": "swin_tiny_patch4_window7_224"}


def onnx_runner(path: Path, threads: int) -> Callable[[Any], Any]:
    """A function that runs the ONNX file at ``path`` in onnxruntime on the CPU with ``threads`` threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle threads sleep rather than spin: spinning ones take the cores from the runtime timed next, and
    # from the ELSA operator's many short parallel loops most of all.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x if isinstance(x, np.ndarray) else x.numpy()})


def onnx_session(model: torch.nn.Module, path: Path, img_size: int, threads: int, form: str) -> Callable[[Any], Any]:
    """Export ``model`` to ONNX at ``path`` (dynamic batch) and return a function that runs it in onnxruntime."""
    export(model, torch.randn(2, 3, img_size, img_size), path, form)
    return onnx_runner(path, threads)


# Run in a fresh interpreter that imports onnxruntime and numpy only, so that its peak resident memory before
# the call is that of the loaded session, not of torch's import. Prints the growth over one call, in bytes:
# of the peak (ru_maxrss, KiB) and of the resident memory that onnxruntime's arena keeps after it.
_PEAK_SCRIPT = """
import os, resource, sys
import numpy as np, onnxruntime
path, threads, shape = sys.argv[1], int(sys.argv[2]), [int(n) for n in sys.argv[3:]]
options = onnxruntime.SessionOptions()
options.intra_op_num_threads = threads
session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
peak, now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resident()
session.run(None, {session.get_inputs()[0].name: x})
print(max((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) * 1024, resident() - now))
"""


def peak_memory(path: Path, shape: tuple[int, ...], threads: int) -> int:
    """Bytes that one onnxruntime call of the file at ``path`` on an input of ``shape`` adds to the memory of
    a fresh process (Linux): the tensors the call makes, as onnxruntime's arena holds them."""
    command = [sys.executable, "-c", _PEAK_SCRIPT, str(path), str(threads), *map(str, shape)]
    return int(subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()[-1])


def elsa_layer_forms(
    model: torch.nn.Module, img_size: int, batches: list[int], threads: int, rounds: int, workdir: Path
) -> list[tuple[str, float, int, float, int]]:
    """The first ELSA layer of ``model``, exported in each form: (form, export seconds, batch, seconds per
    call, peak bytes), one row per form and batch; the forms' timings are interleaved."""
    layer = next(m for m in model.modules() if isinstance(m, ELSAAttention))
    patch = model.patch_embed.patch_size[0]
    shape = (img_size // int(patch), img_size // int(patch), int(layer.dim))
    paths, export_seconds = {}, {}
    for form in FORMS:
        print(f"exporting one ELSA layer, {form} form ...", file=sys.stderr, flush=True)
        paths[form] = workdir / f"elsa_layer_{form}.onnx"
        start = time.perf_counter()
        export(layer, torch.randn(2, *shape), paths[form], form)
        export_seconds[form] = time.perf_counter() - start
    sessions = {form: onnx_runner(path, threads) for form, path in paths.items()}
    rows = []
    for batch in batches:
        x = torch.randn(batch, *shape).numpy()
        runners = {form: (lambda f=f, x=x: f(x)) for form, f in sessions.items()}
        seconds = time_interleaved(runners, rounds, warmup=1)
        for form, path in paths.items():
            peak = peak_memory(path, (batch, *shape), threads)
            rows.append((form, export_seconds[form], batch, statistics.median(seconds[form]), peak))
    return rows


def time_interleaved(runners: dict[str, Callable[[], Any]], rounds: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each runner, one per round, calling them in turn ``rounds`` times.

    Every round calls the runners in a new order (shuffled, the same from run to run): a runtime's threads
    may keep spinning for a while after its call (OpenMP's do by default), which slows the call after it,
    and a fixed order would always charge that to the same runner.
    """
    for run in runners.values():
        for _ in range(warmup):
            run()
    order = list(runners)
    shuffle = random.Random(0).shuffle
    times: dict[str, list[float]] = {k: [] for k in order}
    for _ in range(rounds):
        shuffle(order)
        for key in order:
            start = time.perf_counter()
            runners[key]()
            times[key].append(time.perf_counter() - start)
    return times


def speedup(base: list[float], other: list[float]) -> str:
    """How many times faster ``other`` ran than ``base`` (seconds per call, timed in the same rounds): the median
    of the rounds' ratios, and their range in brackets (a round compares calls made moments apart)."""
    per_round = sorted(b / o for b, o in zip(base, other, strict=True))
    return f"{statistics.median(per_round):.2f}x ({per_round[0]:.2f}-{per_round[-1]:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of onnxruntime and PyTorch")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=10, help="timed calls per cell (interleaved)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--skip-aoti", action="store_true")
    parser.add_argument(
        "--elsa-forms",
        nargs="+",
        choices=FORMS,
        default=["blocks", "windows"],
        help="the forms ELSA-Swin-T's ELSA layers are exported in to ONNX, one onnxruntime row each",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where to keep the exported files (default: temp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # the AOTInductor packages' OpenMP threads
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_deploy_"))
    workdir.mkdir(parents=True, exist_ok=True)

    elsa, swin = MODELS
    # One onnxruntime row per form of ELSA-Swin-T's export; Swin-T, which has no ELSA layer, is exported once
    # and its timings serve every row.
    onnx_forms = [] if args.skip_onnx else args.elsa_forms
    onnx_rows = [f"onnxruntime, {form} form" for form in onnx_forms]
    runtimes: dict[str, dict[str, Callable[[torch.Tensor], Any]]] = {"eager": {}}
    runtimes.update({row: {} for row in onnx_rows})
    runtimes["AOTInductor"] = {}
    torch.manual_seed(0)
    for label, name in MODELS.items():
        model = timm.create_model(name).eval()
        runtimes["eager"][label] = torch.no_grad()(model)
        for row, form in zip(onnx_rows, onnx_forms, strict=True):
            if label == swin and row != onnx_rows[0]:
                continue
            print(f"exporting {label} to ONNX" + (f" ({form} form)" if label == elsa else "") + " ...", file=sys.stderr)
            path = workdir / f"{name}_{form}.onnx"
            start = time.perf_counter()
            runtimes[row][label] = onnx_session(model, path, args.img_size, args.threads, form)
            print(f"  exported in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        if not args.skip_aoti:
            print(f"packaging {label} with AOTInductor ...", file=sys.stderr, flush=True)
            program = export_program(model, torch.randn(2, 3, args.img_size, args.img_size))
            if label == "ELSA-Swin-T":
                print(f"  {count_elsa_calls(program)} ELSA layers call elsa_op::elsa_forward", file=sys.stderr)
            compiled = load_package(package(program, workdir / f"{name}.pt2"))
            runtimes["AOTInductor"][label] = torch.no_grad()(compiled)

    results: dict[tuple[str, int, str], list[float]] = {}
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
            results[(runtime, batch, label)] = seconds

    print(
        f"\nCPU, {args.threads} threads, {args.img_size}x{args.img_size}, images/s (median of {args.rounds} "
        "rounds); ratios: median of the rounds' ratios (their range):\n"
    )
    print(f"| runtime | batch | {elsa} | {swin} | {elsa} / {swin} | {elsa} vs its eager |")
    print("|---|---:|---:|---:|---:|---:|")
    for runtime, per_model in runtimes.items():
        if not per_model:
            continue
        for batch in args.batches:
            e = results[(runtime, batch, elsa)]
            s = results[(onnx_rows[0] if runtime in onnx_rows else runtime, batch, swin)]
            speed_e, speed_s = batch / statistics.median(e), batch / statistics.median(s)
            vs_swin, vs_eager = speedup(s, e), speedup(results[("eager", batch, elsa)], e)
            print(f"| {runtime} | {batch} | {speed_e:.2f} | {speed_s:.2f} | {vs_swin} | {vs_eager} |")
    if not args.skip_onnx:
        elsa_model = timm.create_model(MODELS[elsa]).eval()
        rows = elsa_layer_forms(elsa_model, args.img_size, args.batches, args.threads, args.rounds, workdir)
        print(f"\n{elsa}'s first ELSA layer alone in onnxruntime, by export form (median of {args.rounds}):\n")
        print("| form | export | batch | ms per call | peak memory of a call |")
        print("|---|---:|---:|---:|---:|")
        for form, export_s, batch, seconds, peak in rows:
            print(f"| {form} | {export_s:.1f} s | {batch} | {seconds * 1e3:.1f} | {peak / 2**20:.0f} MiB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
