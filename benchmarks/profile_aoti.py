"""Where ELSA-Swin-T's AOTInductor package spends its time, beside Swin-T's package.

Both models are packaged for the CPU the way ``benchmarks/bench_deploy.py`` packages them, with Inductor's
kernel profiling on (``cpp.enable_kernel_profile``: every generated C++ kernel records itself), then run
under ``torch.profiler``. Each top-level event of a call is put in a category, by what it runs:

- the ELSA operator (``elsa_op::elsa_forward``, the compiled kernels the package calls);
- matrix products (``addmm`` / ``mm`` / ``bmm``: the linear layers, and Swin's window attention), with the
  bias copies they make;
- convolutions, by kind: 1x1 (ELSA's projections to q, k, v and to the attention logits), grouped K x K
  (ELSA's attention-weight branch) and the patch embedding;
- Inductor's fused kernels, by what they fuse: the softmax (with the layout the next operator reads),
  layer norms (with the residual adds, window shifts and partitions), GELU, ELSA's q * k, and the rest.

Prints milliseconds per call and each category's share of the call, for both models, at each batch:

    python benchmarks/profile_aoti.py                  # 2 threads, batch 1 and 8
    python benchmarks/profile_aoti.py --batches 8 --calls 10
"""

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import timm
import torch
from torch._inductor import config
from torch.autograd.profiler_util import EventList, FunctionEvent

import elsa_swin  # noqa: F401  (registers the ELSA-Swin models with timm)
from elsa_swin.aoti import ELSA_OP_NAME, export_program, load_package, package

MODELS = {"ELSA-Swin-T": "elsa_swin_tiny", "Swin-T": "swin_tiny_patch4_window7_224"}

# Inductor names a fused kernel after the operators it fuses (``cpp_fused_<op>_<op>_..._<n>``); the first
# of these found in the name says what the kernel is for.
FUSED = (
    ("softmax", "softmax (+ layout for the next operator)"),
    ("native_layer_norm", "layer norm (+ residual add, window shift / partition)"),
    ("gelu", "GELU"),
    ("convolution_mul", "ELSA's q * k"),
)


def _convolution_kind(event: FunctionEvent) -> str:
    """The kind of a convolution, from the weight shape its ``mkldnn_convolution`` child records."""
    shapes = _first_shapes(event)
    if not shapes or len(shapes) < 2 or len(shapes[0]) != 4 or len(shapes[1]) != 4:
        return "convolution"
    channels, (per_group, kh, kw) = shapes[0][1], shapes[1][1:]
    if channels == 3:
        return "convolution: patch embedding"
    if kh == kw == 1:
        return "convolution: 1x1 (ELSA's q/k/v and logits projections)"
    if per_group < channels:
        return "convolution: grouped K x K (ELSA's attention weights)"
    return "convolution: other"


def _first_shapes(event: FunctionEvent) -> list | None:
    """The first recorded input shapes under ``event`` (depth first)."""
    if event.input_shapes:
        return event.input_shapes
    for child in event.cpu_children:
        found = _first_shapes(child)
        if found:
            return found
    return None


def category(event: FunctionEvent) -> str:
    """The category of a top-level profiler event of a package's call.

    Args:
        event (FunctionEvent): an event without a parent.

    Returns:
        str: its category's name.
    """
    name = event.name
    if name == ELSA_OP_NAME:
        return "ELSA operator"
    if name.startswith("aoti_torch_cpu_") and name.endswith(("addmm_out", "_mm_out", "bmm_out")):
        return "matrix products (linear layers, window attention)"
    if "convolution" in name and "cpp_fused" not in name:
        return _convolution_kind(event)
    if "cpp_fused" in name:
        fused = name.split("cpp_fused", 1)[1]
        for key, label in FUSED:
            if key in fused:
                return f"fused: {label}"
        return "fused: other"
    return f"other ({name})"


def profile(compiled, x: torch.Tensor, calls: int) -> dict[str, float]:
    """Seconds per call of each category, over ``calls`` calls of ``compiled`` on ``x`` (after 2 warm-up
    calls); the key ``"total"`` holds the wall time per call."""
    with torch.no_grad():
        for _ in range(2):
            compiled(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(calls):
                compiled(x)
    events: EventList = prof.events()
    seconds: dict[str, float] = defaultdict(float)
    for event in events:
        if event.cpu_parent is None:
            seconds[category(event)] += event.cpu_time_total / 1e6 / calls
    starts = [e.time_range.start for e in events if e.cpu_parent is None]
    ends = [e.time_range.end for e in events if e.cpu_parent is None]
    seconds["total"] = (max(ends) - min(starts)) / 1e6 / calls
    return dict(seconds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of PyTorch and the packages")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--calls", type=int, default=5, help="profiled calls per model and batch")
    parser.add_argument("--workdir", type=Path, default=None, help="where to keep the packages (default: temp)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="profile_aoti_"))
    torch.manual_seed(0)
    packages = {}
    for label, name in MODELS.items():
        print(f"packaging {label} with kernel profiling ...", file=sys.stderr, flush=True)
        program = export_program(timm.create_model(name).eval(), torch.randn(2, 3, args.img_size, args.img_size))
        with config.patch({"cpp.enable_kernel_profile": True}):
            packages[label] = load_package(package(program, workdir / f"{name}_profiled.pt2"))

    for batch in args.batches:
        x = torch.randn(batch, 3, args.img_size, args.img_size)
        found = {label: profile(compiled, x, args.calls) for label, compiled in packages.items()}
        first = next(iter(MODELS))
        keys = {k for f in found.values() for k in f if k != "total"}
        labels = sorted(keys, key=lambda k: (-found[first].get(k, 0.0), k))
        print(f"\nbatch {batch}, CPU, {args.threads} threads, ms per call (share of the call), {args.calls} calls:\n")
        print("| where | " + " | ".join(MODELS) + " |")
        print("|---|" + "---:|" * len(MODELS))
        for key in [*labels, "total"]:
            cells = []
            for label in MODELS:
                ms, total = found[label].get(key, 0.0) * 1e3, found[label]["total"] * 1e3
                cells.append(f"{ms:.1f} ({ms / total:.0%})" if ms else "-")
            print(f"| {key} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
