"""Forward+backward time and peak memory of elsa_op against the original's unfold path.

The shapes are ELSA-Swin-T's stages 1-3 at 224x224 (K=7; batch 8 on CPU, 128 on CUDA, where batch 8
measures launch latency rather than bandwidth). The unfold path is what the original ran without its CUDA
extension (and what `elsa_op.elsa_reference` computes): unfold the features, weight them with attention *
ghost kernels expanded to the batch, sum. Both are measured in the same run; the ratio column is unfold /
elsa_op. Each shape runs in both memory layouts the op takes: NCHW, and channels-last (NHWC memory,
attention [B, H, W, heads, K*K]), which is what the ELSA-Swin models hand it.

    python benchmarks/bench_op.py [--device cpu|cuda] [--batch N] [--ghost add|mul|both] [--reps 5]
                                  [--dtypes float32 ...] [--layouts nchw channels_last] [--split] [--no-unfold]

CPU peak memory is the growth of the peak resident size (VmHWM, reset just before) during one
forward+backward, each case in a fresh subprocess; on CUDA it is torch.cuda.max_memory_allocated above
the inputs. On CUDA the table also gives the achieved bandwidth: the bytes a perfect implementation must
move (each input read once, each result written once) over the time, against the device's peak and a
measured device-to-device copy. `--split` adds a table per kernel: forward, gradient of the features,
and the one pass for the gradients of the attention and the ghost kernels.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from elsa_op import elsa_function, elsa_reference

# name: (channels, heads, size, kernel); the batch is --batch
SHAPES = {
    "stage1": (96, 3, 56, 7),
    "stage2": (192, 6, 28, 7),
    "stage3": (384, 12, 14, 7),
}
IMPLS = ("elsa_op", "unfold")
LAYOUTS = ("nchw", "channels_last")
GHOSTS = ("add", "mul", "both")


def make_inputs(shape: str, batch: int, device: str, dtype: torch.dtype, layout: str, ghost: str = "add"):
    """x, h, ghost_mul, ghost_add, K; ghost kernels are float32 beside half/bfloat16 (as under autocast)."""
    C, G, S, K = SHAPES[shape]
    B = batch
    g = torch.Generator().manual_seed(0)
    if layout == "nchw":
        x = torch.randn(B, C, S, S, generator=g).to(device, dtype)
        h = torch.randn(B, G, K * K, S, S, generator=g).softmax(2).to(device, dtype)
    else:
        x = torch.randn(B, S, S, C, generator=g).to(device, dtype).permute(0, 3, 1, 2)
        h = torch.randn(B, S, S, G, K * K, generator=g).softmax(-1).to(device, dtype).permute(0, 3, 4, 1, 2)
    x.requires_grad_()
    h.requires_grad_()
    gdtype = torch.float64 if dtype == torch.float64 else torch.float32
    m = a = None
    if ghost in ("mul", "both"):
        m = (1 + 0.1 * torch.randn(C, K, K, generator=g)).to(device, gdtype).requires_grad_()
    if ghost in ("add", "both"):
        a = (0.02 * torch.randn(C, K, K, generator=g)).to(device, gdtype).requires_grad_()
    return x, h, m, a, K


def step(impl: str, x, h, m, a, K: int) -> None:
    if impl == "elsa_op":
        out = elsa_function(x, h, m, a, kernel_size=K)
    else:  # the original expands the layer's ghost head to the batch before calling the op
        B = x.shape[0]
        out = elsa_reference(
            x,
            h,
            m.expand(B, -1, -1, -1) if m is not None else None,
            a.expand(B, -1, -1, -1) if a is not None else None,
            kernel_size=K,
        )
    out.backward(torch.ones_like(out))


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def compulsory_bytes(x, h, m, a) -> dict:
    """Bytes a perfect kernel must move, per kernel: each input read once, each result written once."""
    xb, hb = _nbytes(x), _nbytes(h)
    ghosts = _nbytes(m, a)
    return {
        "forward": 2 * xb + hb + ghosts,  # read x, h, m, a; write out
        "grad features": 2 * xb + hb + ghosts,  # read grad_out, h, m, a; write grad_x
        # read grad_out, x (and h for grad m); write grad_h and the ghost gradients
        "grad attn+ghost": 2 * xb + hb + (hb if m is not None else 0) + ghosts,
    }


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _median_time(fn, device: str, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_case(impl, shape, batch, device, dtype, layout, ghost, reps):
    x, h, m, a, K = make_inputs(shape, batch, device, dtype, layout, ghost)
    leaves = [t for t in (x, h, m, a) if t is not None]

    def run():
        for t in leaves:
            t.grad = None
        step(impl, x, h, m, a, K)

    return _median_time(run, device, reps), sum(compulsory_bytes(x, h, m, a).values())


def time_kernels(shape, batch, device, dtype, layout, ghost, reps) -> dict:
    """Seconds and compulsory bytes of each of the op's kernels, called directly."""
    x, h, m, a, K = make_inputs(shape, batch, device, dtype, layout, ghost)
    x, h = x.detach(), h.detach()
    m, a = (t.detach() if t is not None else None for t in (m, a))
    ops = torch.ops.elsa_op
    G = h.shape[1]
    go = ops.elsa_forward(x, h, m, a, K, 1, 1)
    calls = {
        "forward": lambda: ops.elsa_forward(x, h, m, a, K, 1, 1),
        "grad features": lambda: ops.elsa_backward_features(go, h, m, a, x.shape[2], x.shape[3], K, 1, 1),
        "grad attn+ghost": lambda: ops.elsa_backward_attn_ghost(
            go, x, h, m, G, K, 1, 1, True, m is not None, a is not None, False, False
        ),
    }
    nbytes = compulsory_bytes(x, h, m, a)
    return {name: (_median_time(fn, device, reps), nbytes[name]) for name, fn in calls.items()}


def copy_bandwidth() -> float:
    """Bytes/s of a device-to-device copy of 1 GiB (read + write)."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    seconds = _median_time(lambda: dst.copy_(src), "cuda", 10)
    return 2 * src.numel() * src.element_size() / seconds


def peak_memory_cuda(impl, shape, batch, dtype, layout, ghost) -> int:
    x, h, m, a, K = make_inputs(shape, batch, "cuda", dtype, layout, ghost)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(impl, x, h, m, a, K)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory_cpu_child(impl, shape, batch, dtype, layout, ghost) -> int:
    x, h, m, a, K = make_inputs(shape, batch, "cpu", dtype, layout, ghost)
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM, the peak resident size, to the current one
        f.write("5")
    base = _proc_status_kib("VmRSS")
    step(impl, x, h, m, a, K)
    return (_proc_status_kib("VmHWM") - base) * 1024


def peak_memory_cpu(impl, shape, batch, dtype_name, layout, ghost) -> int:
    out = subprocess.run(
        [sys.executable, __file__, "--child-memory", impl, shape, str(batch), dtype_name, layout, ghost],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def device_peak_bandwidth() -> float:
    """Bytes/s of the current GPU's memory (double data rate)."""
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2 * clock_khz * 1e3 * bus_bits / 8


def _bandwidth_cells(nbytes: int, seconds: float, peak: float, copy: float) -> str:
    gbs = nbytes / seconds / 1e9
    of_peak = f"{100 * gbs * 1e9 / peak:.0f}%" if peak else "n/a"
    return f" {gbs:.0f} | {of_peak} | {100 * gbs * 1e9 / copy:.0f}% |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=None, help="default: 128 on CUDA, 8 on CPU")
    parser.add_argument(
        "--ghost",
        default="add",
        choices=GHOSTS,
        help="ghost kernels given to the op: ghost_add (ELSA-Swin), ghost_mul, or both",
    )
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--dtypes", nargs="+", default=None, help="default: float32 on CPU; float32 bfloat16 on CUDA")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    parser.add_argument("--split", action="store_true", help="also time each kernel on its own")
    parser.add_argument(
        "--no-unfold",
        action="store_true",
        help="leave out the unfold path (it needs about 50x the op's memory at batch 128)",
    )
    parser.add_argument("--child-memory", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_memory:
        impl, shape, batch, dtype_name, layout, ghost = args.child_memory
        print(json.dumps(peak_memory_cpu_child(impl, shape, int(batch), getattr(torch, dtype_name), layout, ghost)))
        return

    cuda = args.device == "cuda"
    batch = args.batch or (128 if cuda else 8)
    if batch < 1:
        parser.error(f"--batch must be positive, got {batch}")
    dtypes = args.dtypes or (["float32", "bfloat16"] if cuda else ["float32"])
    impls = ("elsa_op",) if args.no_unfold else IMPLS
    where = torch.cuda.get_device_name(0) if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# elsa_op vs unfold, forward+backward, {where}, torch {torch.__version__}, batch {batch}, "
        f"ghost {args.ghost}, median of {args.reps}"
    )
    peak_bw = copy_bw = 0.0
    if cuda:
        peak_bw, copy_bw = device_peak_bandwidth(), copy_bandwidth()
        print(f"# memory bandwidth: peak {peak_bw / 1e9:.0f} GB/s, measured copy {copy_bw / 1e9:.0f} GB/s")
    header = "| shape | dtype | layout | elsa_op ms |"
    if not args.no_unfold:
        header += " unfold ms | speed-up |"
    header += " elsa_op peak MiB |"
    if not args.no_unfold:
        header += " unfold peak MiB | memory ratio |"
    if cuda:
        header += " elsa_op GB/s | % of peak | % of copy |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    cases = [(d, s, lay) for d in dtypes for s in args.shapes for lay in args.layouts]
    for dtype_name, shape, layout in cases:
        dtype = getattr(torch, dtype_name)
        res = {}
        for impl in impls:
            seconds, nbytes = time_case(impl, shape, batch, args.device, dtype, layout, args.ghost, args.reps)
            if cuda:
                mem = peak_memory_cuda(impl, shape, batch, dtype, layout, args.ghost)
            else:
                mem = peak_memory_cpu(impl, shape, batch, dtype_name, layout, args.ghost)
            res[impl] = (seconds, mem, nbytes)
        t_ours, m_ours, nbytes = res["elsa_op"]
        C, G, S, K = SHAPES[shape]
        row = f"| {shape} B={batch} C={C} heads={G} {S}x{S} K={K} | {dtype_name} | {layout} | {t_ours * 1e3:.2f} |"
        if not args.no_unfold:
            t_ref = res["unfold"][0]
            row += f" {t_ref * 1e3:.1f} | {t_ref / t_ours:.1f}x |"
        row += f" {m_ours / 2**20:.1f} |"
        if not args.no_unfold:
            m_ref = res["unfold"][1]
            row += f" {m_ref / 2**20:.1f} | {m_ref / max(m_ours, 1):.1f}x |"
        if cuda:
            row += _bandwidth_cells(nbytes, t_ours, peak_bw, copy_bw)
        print(row, flush=True)

    if args.split:
        print()
        header = "| shape | dtype | layout | kernel | ms | MB moved |"
        if cuda:
            header += " GB/s | % of peak | % of copy |"
        print(header)
        print("|" + "---|" * (header.count("|") - 1))
        for dtype_name, shape, layout in cases:
            kernels = time_kernels(shape, batch, args.device, getattr(torch, dtype_name), layout, args.ghost, args.reps)
            for name, (seconds, nbytes) in kernels.items():
                row = f"| {shape} | {dtype_name} | {layout} | {name} | {seconds * 1e3:.3f} | {nbytes / 1e6:.0f} |"
                if cuda:
                    row += _bandwidth_cells(nbytes, seconds, peak_bw, copy_bw)
                print(row, flush=True)


if __name__ == "__main__":
    main()
