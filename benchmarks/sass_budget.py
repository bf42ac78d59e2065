#!/usr/bin/env python3
"""Instruction budget of elsa_op's CUDA kernels, read from the built library (no GPU needed).

    python benchmarks/sass_budget.py                  # tables for sm_90 and sm_80, K = 7
    python benchmarks/sass_budget.py --all            # every templated K
    python benchmarks/sass_budget.py --markdown       # the tables as Markdown (docs/kernels.md)
    python benchmarks/sass_budget.py --json out.json  # everything as JSON

It disassembles `elsa_op/_C*.so` with `cuobjdump -sass` (from the CUDA toolkit, or the copy triton ships),
names each kernel instantiation (c++filt), and finds its inner loops from their back-branches. For each
kernel it takes the inner loop of its common path and counts the instructions of one trip by class, per
channel and tap (one trip covers the taps of `taps per trip` attention weights, or pixel-tap pairs, times V
channels). Predicated and uniform (U*) instructions are counted: each takes an issue slot. Registers and
spills come from `cuobjdump -res-usage`.

How one trip's channel-taps are recognised (the kernels' structure, kernels.cuh):
  - forward and grad features: each tap of each pixel of a thread's run loads one attention weight, the
    one load of the loop narrower than 64 bits; channel-taps = those loads x V. Of a kernel's inner loops
    (the inside-the-image path and the border path) the one with the fewest instructions per channel-tap
    is taken: the inside-the-image path, which most pixels take. The gathers are compiled once per
    combination of ghost kernels given; the one with both (m * w + a per channel-tap) is counted, since
    the others do less.
  - the fused attention/ghost pass: each (pixel, tap) of a thread's pairs loads one grad_out and one
    features vector (the loop's 128-bit loads); channel-taps = those loads / 2 x V. It has a loop without
    ghost_mul, one weighted by it and one for its gradient, which also loads an attention weight (the
    narrower loads); of the first two the one with fewer instructions per channel-tap, the one without
    ghost_mul as ELSA-Swin runs, is counted.

Time estimates, per device, at ELSA-Swin-T stage 1 (batch 128, C = 96, 56 x 56, 3 heads, K = 7, ghost_add
only as ELSA-Swin uses it):
  issue time    = instructions per channel-tap x channel-taps / (SMs x 4 schedulers x 32 lanes x clock)
  FP32 time     = FP32 instructions (FFMA, FMUL, FADD) x channel-taps / (SMs x FP32 lanes x clock)
  memory time   = compulsory bytes (each input read once, each output written once) / HBM peak
  estimate      = max(issue, FP32, memory)            (inner loop only: set-up and border pixels add more)
  roofline      = max(memory time, 2 FP32 FMA per channel-tap x channel-taps / (SMs x FP32 lanes x clock))
  % of roofline = roofline / estimate
Estimates are good to about 2x until a GPU measures them (tools/gpu_check.sh prints them next to the
measured times).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    arch: str  # the code it runs
    sms: int
    fp32_lanes: int  # FP32 lanes per SM
    clock_ghz: float
    hbm_tb_s: float
    source: str


# Peak numbers (vendor datasheets and architecture whitepapers). The clock is the one the datasheet's FP32
# rate implies: FP32 TFLOP/s = SMs x FP32 lanes x 2 x clock.
DEVICES = [
    Device(
        "H100 SXM",
        "sm_90",
        132,
        128,
        1.98,
        3.35,
        "NVIDIA H100 Tensor Core GPU datasheet (SXM5: 67 TFLOP/s FP32, 3.35 TB/s HBM3); Hopper whitepaper (132 SMs,"
        " 128 FP32 lanes per SM); 67e12 / (132 x 128 x 2) = 1.98 GHz",
    ),
    Device(
        "H200",
        "sm_90",
        132,
        128,
        1.98,
        4.8,
        "NVIDIA H200 Tensor Core GPU datasheet (SXM: 67 TFLOP/s FP32, 4.8 TB/s HBM3e); the H100's 132 SMs",
    ),
    Device(
        "A100 SXM 80GB",
        "sm_80",
        108,
        64,
        1.41,
        2.039,
        "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB: 19.5 TFLOP/s FP32, 2,039 GB/s HBM2e); Ampere"
        " whitepaper (108 SMs, 64 FP32 lanes per SM, 1410 MHz boost)",
    ),
]
SCHEDULERS, LANES = 4, 32  # per SM, each issuing one warp instruction per clock (Volta to Hopper)

# ELSA-Swin-T stage 1.
STAGE1 = dict(B=128, C=96, H=56, W=56, G=3, K=7)

CLASSES = ("ffma", "fp", "cvt", "ldg", "stg", "lds", "sts", "int", "other")
CLASS_TITLES = {
    "ffma": "FP32 FMA",
    "fp": "other FP",
    "cvt": "conversions",
    "ldg": "global loads",
    "stg": "global stores",
    "lds": "shared loads",
    "sts": "shared stores",
    "int": "integer/address",
    "other": "other",
}
FP32_PIPE = {"FFMA", "FMUL", "FADD"}
FP_OTHER = {"FMUL", "FADD", "FMNMX", "FSETP", "FSEL", "FSET", "FCHK", "MUFU", "FRND", "FSWZADD"}
CONVERSIONS = {"F2F", "F2FP", "I2F", "F2I", "I2I", "I2FP", "F2IP", "PRMT", "FRND"}
INTEGER = {
    "IADD3",
    "IADD",
    "IMAD",
    "IMUL",
    "LEA",
    "SHF",
    "SHL",
    "SHR",
    "LOP3",
    "LOP",
    "ISETP",
    "ICMP",
    "SEL",
    "IABS",
    "IMNMX",
    "VIMNMX",
    "MOV",
    "MOV32I",
    "POPC",
    "FLO",
    "BREV",
    "BMSK",
    "SGXT",
    "IDP",
    "IDP4A",
    "LEPC",
    "PLOP3",
    "P2R",
    "R2P",
    "CS2R",
    "S2R",
    "S2UR",
    "R2UR",
    "LDC",
}


def classify(opcode: str, operands: str) -> str:
    """The class of one instruction (uniform-datapath U* instructions count with their vector twins)."""
    base = opcode.split(".")[0]
    if base.startswith("U") and base[1:] in INTEGER | {"LDC"}:
        return "int"
    if base == "FFMA":
        return "ffma"
    # bfloat16 -> float32 is a shift into the high half: IMAD.U32 x, 0x10000 (or PRMT) makes it; float16 ->
    # float32 is HADD2.F32 (-0 + x).
    if base in CONVERSIONS or (opcode.startswith("IMAD.U32") and "0x10000" in operands) or opcode == "HADD2.F32":
        return "cvt"
    if base in FP_OTHER or base.startswith(("H", "D")) and base[1:] in {"FMA2", "ADD2", "MUL2", "FMA", "ADD", "MUL"}:
        return "fp"
    if base == "LDG":
        return "ldg"
    if base == "STG":
        return "stg"
    if base == "LDS" or base == "LDSM":
        return "lds"
    if base == "STS":
        return "sts"
    if base in INTEGER:
        return "int"
    return "other"


def load_bits(opcode: str) -> int:
    """Width of a load: LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32."""
    for part in opcode.split(".")[1:]:
        digits = re.sub(r"^[US]", "", part)
        if digits.isdigit():
            return int(digits)
    return 32


# --------------------------------------------------------------------------------------------------
# Tools and the library


def find_tool(name: str) -> str | None:
    """`name` on PATH, in the CUDA toolkit, or in the copy of the CUDA tools triton ships."""
    found = shutil.which(name)
    if found:
        return found
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for root in filter(None, roots):
        if (Path(root) / "bin" / name).exists():
            return str(Path(root) / "bin" / name)
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        candidate = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if candidate.exists():
            return str(candidate)
    return None


def find_library() -> Path | None:
    found = sorted((REPO / "elsa_op").glob("_C*.so"))
    return found[0] if found else None


def demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines(), strict=True))


@dataclasses.dataclass
class Instruction:
    address: int
    opcode: str
    operands: str
    target: int | None  # a branch's target address


INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
LABEL = re.compile(r"^\s*(\.L_x_\d+):")


def parse_sass(text: str) -> dict[str, list[Instruction]]:
    """{mangled function name: its instructions} from `cuobjdump -sass` output for one architecture."""
    functions: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    labels: dict[str, int] = {}
    pending: list[str] = []
    unresolved: list[tuple[Instruction, str]] = []

    def finish():
        for ins, label in unresolved:
            ins.target = labels.get(label)
        unresolved.clear()
        labels.clear()

    for line in text.splitlines():
        if m := re.match(r"\s*Function : (\S+)", line):
            finish()
            current = functions.setdefault(m.group(1), [])
            pending = []
            continue
        if current is None:
            continue
        if m := LABEL.match(line):
            pending.append(m.group(1))
            continue
        if m := INSTRUCTION.search(line):
            ins = Instruction(int(m.group(1), 16), m.group(2), m.group(3).strip(), None)
            for label in pending:
                labels[label] = ins.address
            pending = []
            if ins.opcode.split(".")[0] in {"BRA", "JMP", "BRX", "JMX"}:
                if t := re.search(r"`\((\.L_x_\d+)\)", ins.operands):
                    unresolved.append((ins, t.group(1)))
                elif t := re.search(r"0x([0-9a-f]+)", ins.operands):
                    ins.target = int(t.group(1), 16)
            current.append(ins)
    finish()
    return functions


def parse_resources(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """{(arch, mangled name): {REG, STACK, SHARED, LOCAL, ...}} from `cuobjdump -res-usage`."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    arch = None
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if m := re.match(r"\s*arch = (sm_\d+)", line):
            arch = m.group(1)
        if (m := re.match(r"\s*Function (\S+):", line)) and i + 1 < len(lines):
            out[(arch or "?", m.group(1))] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", lines[i + 1])}
    return out


def inner_loops(code: list[Instruction]) -> list[list[Instruction]]:
    """The bodies of the innermost loops: a back-branch's target up to the branch, holding no other loop."""
    loops = sorted({(i.target, i.address) for i in code if i.target is not None and i.target <= i.address})
    innermost = [
        (lo, hi)
        for lo, hi in loops
        if not any((lo2, hi2) != (lo, hi) and lo <= lo2 and hi2 <= hi for lo2, hi2 in loops)
    ]
    return [[i for i in code if lo <= i.address <= hi] for lo, hi in innermost]


# --------------------------------------------------------------------------------------------------
# Kernels


KERNEL = re.compile(r"::(gather_kernel|attn_ghost_kernel|ghost_reduce_kernel|chunk_sum_kernel)<([^()]*)>\(")
DTYPES = {"float": "float32", "double": "float64", "c10::Half": "float16", "c10::BFloat16": "bfloat16"}


@dataclasses.dataclass
class LoopCount:
    variant: str  # the kernel as it is reported: forward, grad features, attn+ghost, attn+ghost (grad ghost_mul)
    instructions: int
    channel_taps: int
    classes: dict[str, int]
    fp32_pipe: int  # FFMA, FMUL and FADD: the instructions of the FP32 lanes

    def per_ct(self, cls: str | None = None) -> float:
        n = self.instructions if cls is None else self.classes.get(cls, 0)
        return n / self.channel_taps


@dataclasses.dataclass
class Kernel:
    arch: str
    template: str  # gather_kernel, attn_ghost_kernel, ...
    dtype: str
    K: int  # 0: runtime K
    V: int
    resources: dict[str, int]
    loops: list[LoopCount]


def count_loop(body: list[Instruction]) -> dict[str, int]:
    classes = dict.fromkeys(CLASSES, 0)
    for ins in body:
        classes[classify(ins.opcode, ins.operands)] += 1
    return classes


def analyse(template: str, args: list[str], body_list: list[list[Instruction]]) -> list[LoopCount]:
    """The inner loops that do the kernel's per-channel-tap work, with their channel-taps per trip."""
    V = int(args[2]) if template in {"gather_kernel", "attn_ghost_kernel"} else 0
    if template == "gather_kernel" and args[4:6] not in ([], ["true", "true"]):
        return []  # without one of the ghost kernels: less work than the instantiation counted
    found: dict[str, LoopCount] = {}
    for body in body_list:
        loads = [load_bits(i.opcode) for i in body if i.opcode.startswith("LDG")]
        narrow, wide = sum(b < 64 for b in loads), sum(b == 128 for b in loads)
        if template == "gather_kernel" and V > 1 and narrow and wide:
            variant = "grad features" if args[3] == "true" else "forward"
            ct = narrow * V
        elif template == "attn_ghost_kernel" and V > 1 and wide >= 2:
            variant = "attn+ghost (grad ghost_mul)" if narrow else "attn+ghost"
            ct = wide // 2 * V
        else:
            continue
        fp32_pipe = sum(i.opcode.split(".")[0] in FP32_PIPE for i in body)
        count = LoopCount(variant, len(body), ct, count_loop(body), fp32_pipe)
        # The common path: the fewest instructions per channel-tap.
        if variant not in found or count.per_ct() < found[variant].per_ct():
            found[variant] = count
    return list(found.values())


def read_kernels(library: Path, archs: list[str], cuobjdump: str) -> list[Kernel]:
    resources = parse_resources(
        subprocess.run([cuobjdump, "-res-usage", str(library)], capture_output=True, text=True, check=True).stdout
    )
    kernels = []
    for arch in archs:
        sass = subprocess.run(
            [cuobjdump, "-sass", "-arch", arch, str(library)], capture_output=True, text=True, check=False
        )
        functions = parse_sass(sass.stdout)
        names = demangle(list(functions))
        for mangled, code in functions.items():
            m = KERNEL.search(names[mangled])
            if not m:
                continue
            template, args = m.group(1), [a.strip() for a in m.group(2).split(",")]
            dtype = DTYPES.get(args[0], args[0])
            K = int(args[1]) if template in {"gather_kernel", "attn_ghost_kernel"} else 0
            V = int(args[2]) if template in {"gather_kernel", "attn_ghost_kernel"} else 1
            kernels.append(
                Kernel(
                    arch,
                    template,
                    dtype,
                    K,
                    V,
                    resources.get((arch, mangled), {}),
                    analyse(template, args, inner_loops(code)),
                )
            )
    return kernels


# --------------------------------------------------------------------------------------------------
# Estimates


def stage1_bytes(variant: str, dtype: str) -> int:
    """Compulsory bytes of one kernel at stage 1: each input read once, each output written once."""
    s = STAGE1
    item = {"float32": 4, "float64": 8}.get(dtype, 2)
    image = s["B"] * s["C"] * s["H"] * s["W"]  # features, grad_out, output, grad features (stride 1)
    attention = s["B"] * s["G"] * s["K"] ** 2 * s["H"] * s["W"]
    tensors = {
        "forward": 2 * image + attention,  # x, attention -> out
        "grad features": 2 * image + attention,  # grad_out, attention -> grad x
        "attn+ghost": 2 * image + attention,  # grad_out, x -> grad attention
        "attn+ghost (grad ghost_mul)": 2 * image + 2 * attention,  # and the attention read
    }[variant]
    return tensors * item


def stage1_channel_taps() -> int:
    s = STAGE1
    return s["B"] * s["C"] * s["H"] * s["W"] * s["K"] ** 2


@dataclasses.dataclass
class Estimate:
    device: str
    variant: str
    dtype: str
    per_ct: float
    issue_ms: float
    fp32_ms: float
    memory_ms: float
    estimate_ms: float
    roofline_ms: float

    @property
    def percent(self) -> float:
        return 100 * self.roofline_ms / self.estimate_ms


def estimate(device: Device, loop: LoopCount, dtype: str) -> Estimate:
    ct = stage1_channel_taps()
    issue_rate = device.sms * SCHEDULERS * LANES * device.clock_ghz * 1e9
    fp32_rate = device.sms * device.fp32_lanes * device.clock_ghz * 1e9
    fp32_per_ct = loop.fp32_pipe / loop.channel_taps
    issue = loop.per_ct() * ct / issue_rate
    fp32 = fp32_per_ct * ct / fp32_rate
    memory = stage1_bytes(loop.variant, dtype) / (device.hbm_tb_s * 1e12)
    roofline = max(memory, 2 * ct / fp32_rate)
    est = max(issue, fp32, memory)
    return Estimate(
        device.name,
        loop.variant,
        dtype,
        loop.per_ct(),
        issue * 1e3,
        fp32 * 1e3,
        memory * 1e3,
        est * 1e3,
        roofline * 1e3,
    )


# --------------------------------------------------------------------------------------------------
# Report


def pick_devices(name: str | None) -> list[Device]:
    """The DEVICES a GPU name (torch.cuda.get_device_name) stands for: H100, H200 or A100; all for None."""
    if not name:
        return DEVICES
    for key in ("H200", "H100", "A100"):
        if key in name:
            return [d for d in DEVICES if d.name.startswith(key)]
    return DEVICES


BENCH_KERNELS = {"forward": "forward", "grad features": "grad features", "grad attn+ghost": "attn+ghost"}


def measured_times(bench_log: Path) -> dict[tuple[str, str], float]:
    """{(variant, dtype): ms} of stage 1, channels-last, batch 128, from bench_op.py --split output."""
    times: dict[tuple[str, str], float] = {}
    batch = None
    for line in bench_log.read_text(errors="replace").splitlines():
        if line.startswith("#") and (m := re.search(r"batch (\d+)", line)):
            batch = int(m.group(1))
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0] == "stage1" and cells[2] == "channels_last" and cells[3] in BENCH_KERNELS:
            if batch == STAGE1["B"]:
                times[(BENCH_KERNELS[cells[3]], cells[1])] = float(cells[4])
    return times


VARIANT_ORDER = ["forward", "grad features", "attn+ghost", "attn+ghost (grad ghost_mul)"]
DTYPE_ORDER = ["float32", "bfloat16", "float16", "float64"]


def _order(arch: str, variant: str, dtype: str) -> tuple:
    return (-int(arch[3:]), VARIANT_ORDER.index(variant), DTYPE_ORDER.index(dtype))


def report(
    kernels: list[Kernel],
    all_k: bool,
    markdown: bool,
    devices: list[Device] | None = None,
    measured: dict[tuple[str, str], float] | None = None,
) -> str:
    rows = []
    chosen = [(k, loop) for k in kernels if k.loops and (all_k or k.K == STAGE1["K"]) for loop in k.loops]
    for k, loop in sorted(chosen, key=lambda kl: (_order(kl[0].arch, kl[1].variant, kl[0].dtype), kl[0].K)):
        r = k.resources
        rows.append(
            [
                loop.variant,
                k.arch,
                k.dtype,
                f"K={k.K or 'any'} V={k.V}",
                str(r.get("REG", "?")),
                str(r.get("STACK", 0) + r.get("LOCAL", 0)),
                f"{loop.instructions}/{loop.channel_taps}",
                *(f"{loop.per_ct(c):.2f}" for c in CLASSES),
                f"{loop.per_ct():.2f}",
            ]
        )
    head = ["kernel", "arch", "dtype", "instance", "regs", "spill B", "loop/ct", *CLASSES, "total"]
    out = [_table(head, rows, markdown), ""]
    est_rows = []
    by_key = {(k.arch, loop.variant, k.dtype): loop for k in kernels if k.K == STAGE1["K"] for loop in k.loops}
    for device in devices or DEVICES:
        for (arch, variant, dtype), loop in sorted(by_key.items(), key=lambda kv: _order(*kv[0])):
            if arch != device.arch or dtype not in ("float32", "bfloat16"):
                continue
            e = estimate(device, loop, dtype)
            seen = (measured or {}).get((variant, dtype))
            extra = [f"{seen:.3f}", f"{seen / e.estimate_ms:.2f}", f"{100 * e.roofline_ms / seen:.0f}%"] if seen else []
            est_rows.append(
                [
                    device.name,
                    variant,
                    dtype,
                    f"{e.per_ct:.2f}",
                    f"{e.issue_ms:.3f}",
                    f"{e.memory_ms:.3f}",
                    f"{e.estimate_ms:.3f}",
                    f"{e.roofline_ms:.3f}",
                    f"{e.percent:.0f}%",
                    *extra,
                ]
            )
    head = [
        "device",
        "kernel",
        "dtype",
        "instr/ct",
        "issue ms",
        "memory ms",
        "estimate ms",
        "roofline ms",
        "% roofline",
    ]
    if measured:
        head += ["measured ms", "measured / estimate", "measured % roofline"]
        est_rows = [r + ["-"] * (len(head) - len(r)) for r in est_rows]
    out.append(_table(head, est_rows, markdown))
    return "\n".join(out)


def _table(head: list[str], rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--library", type=Path, help="the built elsa_op/_C*.so (default: the one in the tree)")
    parser.add_argument("--arch", nargs="+", default=["sm_90", "sm_80"])
    parser.add_argument("--all", action="store_true", help="every templated K, not only K = 7")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", type=Path, help="write every count and estimate here")
    parser.add_argument("--device", help="estimate for this GPU only (a name as torch gives it), else for all")
    parser.add_argument("--measured", type=Path, help="bench_op.py --split output: measured times beside the estimates")
    args = parser.parse_args(argv)
    library = args.library or find_library()
    if library is None or not library.exists():
        print("error: no built elsa_op/_C*.so (build with FORCE_CUDA=1)", file=sys.stderr)
        return 2
    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        print("error: no cuobjdump (CUDA toolkit, or triton's copy)", file=sys.stderr)
        return 2
    kernels = read_kernels(library, args.arch, cuobjdump)
    if not any(k.loops for k in kernels):
        print(f"error: {library} holds no elsa_op CUDA kernels for {' '.join(args.arch)}", file=sys.stderr)
        return 2
    measured = measured_times(args.measured) if args.measured and args.measured.exists() else None
    print(report(kernels, args.all, args.markdown, pick_devices(args.device), measured))
    if args.json:
        args.json.write_text(json.dumps([dataclasses.asdict(k) for k in kernels], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
