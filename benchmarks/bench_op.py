"""Forward+backward time and peak memory of elsa_op against the original's unfold path.

The shapes are ELSA-Swin-T's stages 1-3 at 224x224 (batch 8, K=7). The unfold path is what the
original ran without its CUDA extension (and what `elsa_op.elsa_reference` computes): unfold the
features, weight them with attention * ghost kernels expanded to the batch, sum. Both are measured in
the same run; the ratio column is unfold / elsa_op. Each shape runs in both memory layouts the op
takes: NCHW, and channels-last (NHWC memory, attention [B, H, W, heads, K*K]), which is what the
ELSA-Swin models hand it.

    python benchmarks/bench_op.py [--device cpu|cuda] [--reps 5] [--dtypes float32 ...] [--layouts nchw channels_last]

CPU peak memory is the growth of the peak resident size (VmHWM, reset just before) during one
forward+backward, each case in a fresh subprocess; on CUDA it is torch.cuda.max_memory_allocated above the inputs. On CUDA the table also
gives the achieved bandwidth (compulsory bytes / time) against the device's peak.
"""
import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from elsa_op import elsa_function, elsa_reference

# name: (batch, channels, heads, size, kernel)
SHAPES = {
    "stage1": (8, 96, 3, 56, 7),
    "stage2": (8, 192, 6, 28, 7),
    "stage3": (8, 384, 12, 14, 7),
}
IMPLS = ("elsa_op", "unfold")
LAYOUTS = ("nchw", "channels_last")


def make_inputs(shape: str, device: str, dtype: torch.dtype, layout: str):
    B, C, G, S, K = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    if layout == "nchw":
        x = torch.randn(B, C, S, S, generator=g).to(device, dtype)
        h = torch.randn(B, G, K * K, S, S, generator=g).softmax(2).to(device, dtype)
    else:
        x = torch.randn(B, S, S, C, generator=g).to(device, dtype).permute(0, 3, 1, 2)
        h = torch.randn(B, S, S, G, K * K, generator=g).softmax(-1).to(device, dtype).permute(0, 3, 4, 1, 2)
    x.requires_grad_()
    h.requires_grad_()
    ghost_add = (0.02 * torch.randn(C, K, K, generator=g)).to(device, dtype).requires_grad_()
    return x, h, ghost_add, K


def step(impl: str, x, h, ghost_add, K: int) -> None:
    if impl == "elsa_op":
        out = elsa_function(x, h, None, ghost_add, kernel_size=K)
    else:  # the original expands the layer's ghost head to the batch before calling the op
        out = elsa_reference(x, h, None, ghost_add.expand(x.shape[0], -1, -1, -1), kernel_size=K)
    out.backward(torch.ones_like(out))


def compulsory_bytes(x, h, ghost_add) -> int:
    """Bytes a perfect kernel must move for forward + all input gradients."""
    xb, hb, gb = (t.numel() * t.element_size() for t in (x, h, ghost_add))
    fwd = 2 * xb + hb + gb  # read x, h, a; write out
    bwd_x = 2 * xb + hb + gb  # read grad_out, h, a; write grad_x
    bwd_h = 2 * xb + hb  # read grad_out, x; write grad_h
    bwd_a = 2 * xb + gb  # read grad_out, x; write grad_a
    return fwd + bwd_x + bwd_h + bwd_a


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_case(impl, shape, device, dtype, layout, reps):
    x, h, a, K = make_inputs(shape, device, dtype, layout)
    step(impl, x, h, a, K)  # warm-up
    times = []
    for _ in range(reps):
        for t in (x, h, a):
            t.grad = None
        sync(device)
        t0 = time.perf_counter()
        step(impl, x, h, a, K)
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compulsory_bytes(x, h, a)


def peak_memory_cuda(impl, shape, dtype, layout) -> int:
    x, h, a, K = make_inputs(shape, "cuda", dtype, layout)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(impl, x, h, a, K)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_cpu_child(impl, shape, dtype, layout) -> int:
    x, h, a, K = make_inputs(shape, "cpu", dtype, layout)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident size, to the current one
        f.write("5")
    base = _proc_status_kib("VmRSS")
    step(impl, x, h, a, K)
    return (_proc_status_kib("VmHWM") - base) * 1024


def peak_memory_cpu(impl, shape, dtype_name, layout) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--child-memory", impl, shape, dtype_name, layout],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def device_peak_bandwidth() -> float:
    """Bytes/s of the current GPU's memory (double data rate)."""
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 on CPU; float32 float16 bfloat16 on CUDA")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--child-memory", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_memory:
        impl, shape, dtype_name, layout = args.child_memory
        print(json.dumps(peak_memory_cpu_child(impl, shape, getattr(torch, dtype_name), layout)))
        return

    dtypes = args.dtypes or (["float32", "float16", "bfloat16"] if args.device == "cuda" else ["float32"])
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# elsa_op vs unfold, forward+backward, {where}, torch {torch.__version__}, median of {args.reps}")
    peak_bw = device_peak_bandwidth() if args.device == "cuda" else 0.0
    header = "| shape | dtype | layout | elsa_op ms | unfold ms | speed-up | elsa_op peak MiB | unfold peak MiB | memory ratio |"
    if args.device == "cuda":
        header += " elsa_op GB/s | % of peak |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    cases = [(d, s, lay) for d in dtypes for s in args.shapes for lay in args.layouts]
    for dtype_name, shape, layout in cases:
        dtype = getattr(torch, dtype_name)
        res = {}
        for impl in IMPLS:
            seconds, nbytes = time_case(impl, shape, args.device, dtype, layout, args.reps)
            if args.device == "cuda":
                mem = peak_memory_cuda(impl, shape, dtype, layout)
            else:
                mem = peak_memory_cpu(impl, shape, dtype_name, layout)
            res[impl] = (seconds, mem, nbytes)
        (t_ours, m_ours, nbytes), (t_ref, m_ref, _) = res["elsa_op"], res["unfold"]
        B, C, G, S, K = SHAPES[shape]
        row = (
            f"| {shape} B={B} C={C} heads={G} {S}x{S} K={K} | {dtype_name} | {layout} | {t_ours * 1e3:.1f} | {t_ref * 1e3:.1f} "
            f"| {t_ref / t_ours:.1f}x | {m_ours / 2**20:.1f} | {m_ref / 2**20:.1f} | {m_ref / max(m_ours, 1):.1f}x |"
        )
        if args.device == "cuda":
            gbs = nbytes / t_ours / 1e9
            row += f" {gbs:.0f} | {100 * gbs * 1e9 / peak_bw:.0f}% |" if peak_bw else f" {gbs:.0f} | n/a |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
