#!/usr/bin/env python3
"""Instruction budget of elsa_op's CUDA kernels, read from the built library (no GPU needed).

    python benchmarks/sass_budget.py                  # every arch the library holds, K = 7
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

Whole kernels. The inner loop is not what a kernel costs. For the kernels ELSA-Swin runs in training (K = 7,
16-byte vectors, ghost_add only: gather_kernel<T,7,V,false,false,true> forward and grad features,
attn_ghost_kernel<T,7,V> through its branch without ghost_mul, and ghost_reduce_kernel<float>; chunk_sum
never runs, every head's 32 channels being one chunk) it builds each kernel's control-flow graph (basic
blocks, dominators, post-dominators, natural loops) and walks the launch grid of ELSA-Swin-T's stages
1-3 at batch 128 and batch 1 warp by warp:
  - gathers: each warp's lanes are items (run of 4 pixels, channel vector) of one row, past the row's end
    idle; a lane's run takes the inside-the-image path or the border path by the geometry, and a warp
    with both runs both (the straight code before and after each path's loops: their dominators and
    post-dominators; each loop times its trips; on the border path a window row outside the image costs
    its check only and a tap costs only if some lane of the warp needs it);
  - the fused pass: each block's warps through the per-thread set-up, then per step the three parts
    between its barriers (part 1 for the warp that writes the runs, the others pass it; part 2's products
    loop per run, a pair's half of the body only in warps where some lane's pair is live; part 3's sum
    per (pixel, tap) item, its loops' trips from their unrolling, as many rounds as the warp has items),
    then the ghost partial sums; ghost_reduce per thread, its slice of the tiles' partial sums.
Beside the instructions it counts L1 wavefronts (each warp-wide global access: the distinct 128-byte
lines of each group of 8, 16 or 32 lanes, for 16-, 8- and narrower bytes per lane; shared memory: the most
words in one bank), the FP32 lanes' instructions, the compulsory HBM bytes plus the ghost partial sums,
and the warps per SM that registers and shared memory allow. Per device:
  issue   = warp instructions / (SMs used x 4 schedulers x clock)
  L1      = wavefronts / (SMs used x clock)          (one 128-byte wavefront per clock per SM)
  HBM     = bytes / HBM peak
  FMA     = FP32 lane instructions / (SMs used x FP32 lanes x clock)
  latency = dependent rounds of loads of one thread x 500 ns (ghost_reduce only: its threads chain
            their partial sums)
  estimate = the largest, and the bound that gives it; roofline = max(compulsory bytes / HBM peak, 2 FMA
  per channel-tap at the FP32 peak); share of the roofline = roofline / estimate. It also sums the op's
  forward + backward over every ELSA layer of one training step of ELSA-Swin-T/S/B at batch 128.
Not modelled: launch gaps, barrier stalls, L2, and latency where warps are few. Estimates are good to
about 2x until a GPU measures them (tools/gpu_check.sh prints them next to the measured times).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
    predicated: bool = False  # under a guard predicate (@P0, @!P1): a branch or exit that may fall through


INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
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
            guard = m.group(2) or ""
            ins = Instruction(
                int(m.group(1), 16), m.group(3), m.group(4).strip(), None, bool(guard) and "PT" not in guard
            )
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
# Control flow: basic blocks, dominators and loops of one kernel, for the whole-kernel estimate


@dataclasses.dataclass
class Counts:
    """What a stretch of code issues, per warp that runs it."""

    instructions: float = 0.0
    fp32: float = 0.0  # FFMA, FMUL, FADD: the FP32 lanes' instructions

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.instructions + other.instructions, self.fp32 + other.fp32)

    def __mul__(self, k: float) -> Counts:
        return Counts(self.instructions * k, self.fp32 * k)

    __rmul__ = __mul__


def counts_of(code: list[Instruction]) -> Counts:
    return Counts(len(code), sum(i.opcode.split(".")[0] in FP32_PIPE for i in code))


@dataclasses.dataclass
class Block:
    index: int
    code: list[Instruction]
    succs: list[int]
    preds: list[int] = dataclasses.field(default_factory=list)

    @property
    def start(self) -> int:
        return self.code[0].address


@dataclasses.dataclass
class Loop:
    header: int  # block index
    latch: int  # the block whose branch goes back to the header (the last one, by address)
    blocks: frozenset[int]
    parent: Loop | None = None
    children: list[Loop] = dataclasses.field(default_factory=list)


EXIT_NODE = -1  # the virtual block every EXIT leads to


class Flow:
    """The control-flow graph of one kernel: blocks, (post)dominators and natural loops."""

    def __init__(self, code: list[Instruction]):
        self.code = code
        by_address = {i.address: n for n, i in enumerate(code)}
        leaders = {0}
        for n, ins in enumerate(code):
            base = ins.opcode.split(".")[0]
            if ins.target is not None and ins.target in by_address:
                leaders.add(by_address[ins.target])
            if base in {"BRA", "EXIT", "RET", "JMP", "BRX"} and n + 1 < len(code):
                leaders.add(n + 1)
        starts = sorted(leaders)
        block_of = {}
        self.blocks: list[Block] = []
        for k, lo in enumerate(starts):
            hi = starts[k + 1] if k + 1 < len(starts) else len(code)
            self.blocks.append(Block(k, code[lo:hi], []))
            block_of[code[lo].address] = k
        for blk in self.blocks:
            last = blk.code[-1]
            base = last.opcode.split(".")[0]
            conditional = last.predicated or re.match(r"!?U?P\d", last.operands) is not None
            falls = blk.index + 1 < len(self.blocks)
            if base == "BRA" and last.target in block_of:
                blk.succs.append(block_of[last.target])
                if conditional and falls:
                    blk.succs.append(blk.index + 1)
            elif base in {"EXIT", "RET"}:
                if conditional and falls:
                    blk.succs.append(blk.index + 1)
            elif falls:
                blk.succs.append(blk.index + 1)
        for blk in self.blocks:
            for s in blk.succs:
                self.blocks[s].preds.append(blk.index)
        # Only what the entry reaches (the code after the last EXIT is the callees' and padding).
        seen, stack = {0}, [0]
        while stack:
            for s in self.blocks[stack.pop()].succs:
                if s not in seen:
                    seen.add(s)
                    stack.append(s)
        self.reachable = seen
        # blocks that may leave the kernel (an EXIT, predicated or not): edges to a virtual exit, EXIT_NODE
        self.exits = {b.index for b in self.blocks if b.code[-1].opcode.split(".")[0] in {"EXIT", "RET"}}
        self.dom = self._dominators(forward=True)
        self.postdom = self._dominators(forward=False)
        self.loops = self._loops()

    def _dominators(self, forward: bool) -> dict[int, set[int]]:
        nodes = sorted(self.reachable)
        if forward:
            roots = [0]
            into = {n: [p for p in self.blocks[n].preds if p in self.reachable] for n in nodes}
        else:
            roots = [EXIT_NODE]
            into = {n: list(self.blocks[n].succs) + ([EXIT_NODE] if n in self.exits else []) for n in nodes}
            nodes = [EXIT_NODE, *nodes]
        dom = {n: set(nodes) for n in nodes}
        for r in roots:
            dom[r] = {r}
        changed = True
        while changed:
            changed = False
            for n in nodes if forward else reversed(nodes):
                if n in roots:
                    continue
                ins = [dom[p] for p in into[n]]
                new = (set.intersection(*ins) if ins else set()) | {n}
                if new != dom[n]:
                    dom[n], changed = new, True
        return dom

    def _loops(self) -> list[Loop]:
        found: dict[int, tuple[int, set[int]]] = {}
        for n in self.reachable:
            for h in self.blocks[n].succs:
                if h in self.dom[n]:  # a back edge n -> h
                    body, stack = {h, n}, [n] if n != h else []
                    while stack:
                        for p in self.blocks[stack.pop()].preds:
                            if p not in body and p in self.reachable:
                                body.add(p)
                                stack.append(p)
                    latch, old = found.get(h, (n, set()))
                    found[h] = (max(latch, n), old | body)
        loops = [Loop(h, latch, frozenset(body)) for h, (latch, body) in found.items()]
        for lp in loops:
            outer = [o for o in loops if o is not lp and lp.blocks < o.blocks]
            if outer:
                lp.parent = min(outer, key=lambda o: len(o.blocks))
                lp.parent.children.append(lp)
        return sorted(loops, key=lambda lp: self.blocks[lp.header].start)

    def count(self, blocks) -> Counts:
        if not hasattr(self, "_counts"):
            self._counts = [counts_of(b.code) for b in self.blocks]
        total, fp32 = 0.0, 0.0
        for b in blocks:
            if b != EXIT_NODE:
                total += self._counts[b].instructions
                fp32 += self._counts[b].fp32
        return Counts(total, fp32)

    def own(self, loop: Loop) -> set[int]:
        """The loop's blocks outside its inner loops."""
        inner = set().union(*(c.blocks for c in loop.children)) if loop.children else set()
        return set(loop.blocks) - inner

    def unconditional(self, loop: Loop) -> set[int]:
        """The loop's own blocks every trip runs: those that dominate its latch."""
        return {b for b in self.own(loop) if b in self.dom[loop.latch]}

    def exit_block(self, loop: Loop) -> int:
        """Where the loop goes when it ends (the first block after it that it branches or falls to, else
        the kernel's end)."""
        outside = {s for b in loop.blocks for s in self.blocks[b].succs if s not in loop.blocks}
        return min(outside) if outside else EXIT_NODE

    def path(self, loop: Loop) -> set[int]:
        """The straight-line blocks every thread that runs `loop` runs: those before it (its header's
        dominators) and after it (the post-dominators of where it exits)."""
        return (self.dom[loop.header] - {loop.header}) | self.postdom[self.exit_block(loop)]

    def ancestors(self, loop: Loop) -> list[Loop]:
        out, p = [], loop.parent
        while p is not None:
            out.append(p)
            p = p.parent
        return out

    def loads(self, blocks) -> tuple[int, int]:
        """(loads narrower than 64 bits, 128-bit loads) of global memory in these blocks."""
        bits = [load_bits(i.opcode) for b in blocks for i in self.blocks[b].code if i.opcode.startswith("LDG")]
        return sum(x < 64 for x in bits), sum(x == 128 for x in bits)

    def opcodes(self, blocks, prefix: str) -> int:
        return sum(i.opcode.startswith(prefix) for b in blocks for i in self.blocks[b].code)

    def innermost(self) -> list[Loop]:
        return [lp for lp in self.loops if not lp.children]


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
    role: str = ""  # forward, grad features, attn+ghost, ghost_reduce: what ELSA-Swin runs it as ("" if not)
    flow: Flow | None = dataclasses.field(default=None, repr=False, compare=False)


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


def _role(template: str, args: list[str]) -> str:
    """What ELSA-Swin runs this instantiation as (K = 7, 16-byte vectors, ghost_add only), "" for the
    others: the whole-kernel estimate models these."""
    if template == "gather_kernel" and args[1] == "7" and args[2] != "1" and args[4:6] == ["false", "true"]:
        return "grad features" if args[3] == "true" else "forward"
    if template == "attn_ghost_kernel" and args[1] == "7" and args[2] != "1":
        return "attn+ghost"
    return "ghost_reduce" if template == "ghost_reduce_kernel" and args[0] == "float" else ""


def library_archs(library: Path, cuobjdump: str) -> list[str]:
    """Every architecture the library holds code for, newest first."""
    out = subprocess.run([cuobjdump, "-lelf", str(library)], capture_output=True, text=True, check=False).stdout
    found = {m.group(1) for m in re.finditer(r"\.(sm_\d+a?)\.", out)}
    return sorted(found, key=lambda a: -int(re.sub(r"\D", "", a)))


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
                    _role(template, args),
                    Flow(code) if _role(template, args) else None,
                )
            )
    return kernels


# --------------------------------------------------------------------------------------------------
# Whole kernels: every warp of the grid, as ELSA-Swin calls the kernels in training


@dataclasses.dataclass(frozen=True)
class Layer:
    """One ELSA layer's call of the op: batch, channels, image, heads, window (stride and dilation 1)."""

    B: int
    C: int
    H: int
    W: int
    G: int
    K: int = 7


# ELSA-Swin at 224 x 224: (embed dim, blocks per stage, heads per stage); ELSA in stages 1-3.
MODELS = {
    "ELSA-Swin-T": (96, (2, 2, 6), (3, 6, 12)),
    "ELSA-Swin-S": (96, (2, 2, 18), (3, 6, 12)),
    "ELSA-Swin-B": (128, (2, 2, 18), (4, 8, 16)),
}


def stage_layer(model: str, stage: int, batch: int) -> Layer:
    dim, _, heads = MODELS[model]
    side = 56 >> (stage - 1)
    return Layer(batch, dim << (stage - 1), side, side, heads[stage - 1])


# Per SM (Volta to Hopper): registers, warps, blocks; shared memory per SM by architecture.
REGISTERS_PER_SM, MAX_WARPS, MAX_BLOCKS = 65536, 64, 32
SHARED_PER_SM = {"sm_90": 228 * 1024, "sm_80": 164 * 1024}
MEMORY_LATENCY_NS = 500  # a global load that misses L1, loaded: the one figure here no datasheet gives
LINE = 128  # bytes per L1 wavefront


def occupancy(arch: str, threads: int, registers: int, shared: int) -> int:
    """Resident warps per SM from registers (allocated per warp in units of 256) and shared memory."""
    warps = threads // 32
    per_warp = -(-max(registers, 1) * 32 // 256) * 256
    blocks = min(MAX_BLOCKS, REGISTERS_PER_SM // (per_warp * warps), MAX_WARPS // warps)
    if shared:
        blocks = min(blocks, SHARED_PER_SM.get(arch, 164 * 1024) // (shared + 1024))
    return blocks * warps


def wavefronts(addresses: list[int], width: int) -> int:
    """L1 wavefronts of one warp-wide access: the distinct 128-byte lines each group of lanes touches
    (loads of 16 bytes go 8 lanes at a time, of 8 bytes 16 at a time, narrower ones all 32 together)."""
    group = {16: 8, 8: 16}.get(width, 32)
    return sum(
        len({a // LINE for a in addresses[k : k + group]}) for k in range(0, len(addresses), group) if addresses[k:]
    )


def vector_waves(addresses: list[int], nbytes: int) -> int:
    """Wavefronts of a warp's vectors of nbytes each, loaded 16 bytes at a time."""
    if nbytes <= 16:
        return wavefronts(addresses, nbytes)
    return sum(wavefronts([a + k for a in addresses], 16) for k in range(0, nbytes, 16))


def bank_wavefronts(words: list[int]) -> int:
    """Shared-memory wavefronts of a warp's 4-byte accesses: the most distinct words in one bank."""
    banks: dict[int, set[int]] = {}
    for w in words:
        banks.setdefault(w % 32, set()).add(w)
    return max((len(s) for s in banks.values()), default=0)


def sum_stride(chunk_vectors: int) -> int:
    """kernels.cuh's attn_ghost_sum_stride: the fused pass's slots per tap in a pixel's weighted sums, the
    chunk's channel vectors padded to an odd count, so that 32 taps read at that stride hit 32 banks."""
    return chunk_vectors | 1


def sum_store_words(chunk_vectors: int, pairs: list[int]) -> list[int]:
    """The shared words the fused pass's step 2 stores the weighted sums of (channel vector, tap) pairs at."""
    return [pp // chunk_vectors * sum_stride(chunk_vectors) + pp % chunk_vectors for pp in pairs]


def sum_read_words(chunk_vectors: int, chunk_taps: int, items: list[int]) -> list[int]:
    """The first shared word of each (pixel, tap) item's sums that step 3 reads (its next ones follow)."""
    stride = sum_stride(chunk_vectors)
    return [i // chunk_taps * chunk_taps * stride + i % chunk_taps * stride for i in items]


@dataclasses.dataclass
class Whole:
    """A kernel over its whole grid: what every warp issues, and what it costs the memory paths."""

    kernel: str  # forward, grad features, attn+ghost, ghost_reduce, chunk_sum
    dtype: str
    layer: Layer
    warp_instructions: float  # summed over the grid's warps
    fp32_instructions: float  # warp instructions on the FP32 lanes
    wavefronts: float  # L1 and shared-memory wavefronts
    hbm_bytes: float  # compulsory bytes, and the partial sums written and read back
    channel_taps: float  # the work: B * C * Ho * Wo * K * K (0 for the reductions)
    warps_per_sm: int
    blocks: int
    latency_chain: float = 0.0  # dependent rounds of loads of one thread (the reductions), else 0
    notes: str = ""

    def bounds(self, device: Device) -> dict[str, float]:
        """Seconds by each bound: issue, L1, HBM, FMA (and latency where a thread chains its loads)."""
        sms = min(device.sms, max(self.blocks, 1))
        hz = device.clock_ghz * 1e9
        out = {
            "issue": self.warp_instructions / (sms * SCHEDULERS * hz),
            "L1": self.wavefronts / (sms * hz),
            "HBM": self.hbm_bytes / (device.hbm_tb_s * 1e12),
            "FMA": self.fp32_instructions * LANES / (sms * device.fp32_lanes * hz),
        }
        if self.latency_chain:
            out["latency"] = self.latency_chain * MEMORY_LATENCY_NS * 1e-9
        return out

    def estimate_ms(self, device: Device) -> float:
        return 1e3 * max(self.bounds(device).values())

    def binding(self, device: Device) -> str:
        b = self.bounds(device)
        return max(b, key=b.get)

    def roofline_ms(self, device: Device) -> float:
        fma = 2 * self.channel_taps / (device.sms * device.fp32_lanes * device.clock_ghz * 1e9)
        return 1e3 * max(fma, self.compulsory_bytes() / (device.hbm_tb_s * 1e12))

    def compulsory_bytes(self) -> float:
        return layer_bytes(self.kernel, self.dtype, self.layer)

    def per_ct(self) -> float:
        return self.warp_instructions * LANES / self.channel_taps if self.channel_taps else 0.0


def layer_bytes(kernel: str, dtype: str, L: Layer) -> float:
    """Compulsory bytes of one kernel: each input read once, each output written once (the ghost
    gradient's partial sums belong to ghost_reduce's figure, not to the roofline)."""
    item = {"float32": 4, "float64": 8}.get(dtype, 2)
    image = L.B * L.C * L.H * L.W
    attention = L.B * L.G * L.K**2 * L.H * L.W
    if kernel in ("forward", "grad features", "attn+ghost"):
        return (2 * image + attention) * item
    return 0.0


class GatherShape:
    """Where the SASS of a gather keeps its paths: the inside-the-image loops (the window rows, and for
    16-bit types the parts of the run around them) and the border loops (the run's pixels, then the
    window rows, then taps when the compiler kept a loop over them)."""

    def __init__(self, flow: Flow, K: int):
        self.flow = flow
        qualifying = []
        for lp in flow.innermost():
            narrow, wide = flow.loads(lp.blocks)
            if narrow and wide:
                qualifying.append((flow.count(lp.blocks).instructions / narrow, narrow, lp))
        if len(qualifying) < 2:
            raise ValueError("gather: no inside-the-image and border loops found")
        _, self.taps_inner, self.inner = min(qualifying, key=lambda q: q[0])
        _, self.taps_border, self.border = max(qualifying, key=lambda q: q[0])
        # the loops of each path: up the nest, until the loop that holds both paths (the rows' loop)
        self.inner_nest = [self.inner] + [
            a for a in flow.ancestors(self.inner) if self.border.blocks.isdisjoint(a.blocks)
        ]
        self.border_nest = [self.border] + [
            a for a in flow.ancestors(self.border) if self.inner.blocks.isdisjoint(a.blocks)
        ]
        self.K = K
        # a warp with no items: what every way out of the kernel passes through
        self.idle = set.intersection(*(flow.dom[b] for b in flow.exits & flow.reachable))
        self.inner_path = flow.path(self.inner_nest[-1])
        self.border_path = flow.path(self.border_nest[-1])

    @functools.cache  # noqa: B019  (a handful of shapes, each alive as long as its flow)
    def straight(self, inner: bool, border: bool) -> Counts:
        blocks = set(self.idle)
        if inner:
            blocks |= self.inner_path
        if border:
            blocks |= self.border_path
        return self.flow.count(blocks)

    @functools.cache  # noqa: B019
    def inner_cost(self, parts: int) -> Counts:
        f = self.flow
        row = f.count(f.own(self.inner)) * self.K
        if len(self.inner_nest) == 1:
            return row * parts
        outer = self.inner_nest[1]
        return (f.count(f.own(outer)) + row) * parts

    def border_cost(self, pixels: list[list[int]]) -> Counts:
        """pixels[u][p]: taps of window row p live for some lane of the warp at the run's pixel u
        (-1: the row lies outside the image for the whole warp)."""
        tap, trip, row_check, row_body, upper = self._border_pieces()
        total = Counts()
        for row_taps in pixels:
            for live in row_taps:
                total = total + row_check
                if live >= 0:
                    total = total + row_body + tap * live
        return total + upper * len(pixels)

    @functools.cache  # noqa: B019
    def _border_pieces(self) -> tuple[Counts, Counts, Counts, Counts, Counts]:
        """(a live tap, a trip of the innermost loop, a window row's check, a row inside the image less its
        taps, a pixel's code outside the rows)."""
        f = self.flow
        lb = self.border
        tap = f.count(f.own(lb) - f.unconditional(lb)) * (1 / self.taps_border)
        trip = f.count(f.unconditional(lb))
        if self.taps_border >= self.K:  # the innermost border loop walks the window rows
            upper, row_check, row_body = self.border_nest[1:], trip, Counts()
        else:  # it walks a row's taps; its parent the window rows
            rows = self.border_nest[1]
            upper = self.border_nest[2:]
            row_check = f.count(f.unconditional(rows))
            row_body = f.count(f.own(rows) - f.unconditional(rows)) + trip * (self.K // self.taps_border)
        outer = Counts()
        for lp in upper:
            outer = outer + f.count(f.own(lp))
        return tap, trip, row_check, row_body, outer


def gather_whole(flow: Flow, kernel: str, dtype: str, L: Layer, V: int, arch: str, registers: int) -> Whole:
    """Forward or grad features over its grid: each warp of each row, its lanes' runs inside the image
    or at its border (a warp with both runs both paths), idle lanes past the row's items. Every image
    of the batch is the same, so one image is counted and multiplied."""
    instr, waves, blocks_x = _gather_image(flow, dtype, L.C, L.H, L.W, L.G, L.K, V)
    instr = instr * L.B
    ct = L.B * L.C * L.H * L.W * L.K * L.K
    return Whole(
        kernel,
        dtype,
        L,
        instr.instructions,
        instr.fp32,
        waves * L.B,
        layer_bytes(kernel, dtype, L),
        ct,
        occupancy(arch, 256, registers, 0),
        blocks_x * L.B * L.H,
    )


@functools.cache
def _gather_image(flow: Flow, dtype: str, C: int, H: int, W: int, G: int, K: int, V: int) -> tuple[Counts, float, int]:
    L = Layer(1, C, H, W, G, K)
    shape = GatherShape(flow, L.K)
    item = 4 if dtype == "float32" else 2
    P, r = 4, L.K // 2
    parts = 1 if item >= 4 else 2
    S = P // parts
    cvs = L.C // V
    cols = L.W  # stride 1: the grid written is as wide as the one read
    items = -(-cols // P) * cvs
    threads = 256
    blocks_x = -(-items // threads)
    per_head = L.C // L.G
    instr, waves = Counts(), 0.0
    inner_waves: dict[tuple, float] = {}
    for i in range(L.H):
        rows_live = [0 <= i + p - r < L.H for p in range(L.K)]
        for warp in range(blocks_x * threads // 32):
            lanes = [w for w in range(warp * 32, warp * 32 + 32) if w < items]
            if not lanes:
                instr = instr + shape.straight(False, False)
                continue
            inner, border = [], []
            for w in lanes:
                run, cv = divmod(w, cvs)
                j0 = run * P
                n = min(P, cols - j0)
                inside = n == P and all(rows_live) and j0 - r >= 0 and j0 + P - 1 + r < cols
                (inner if inside else border).append((j0, n, cv))
            cost = shape.straight(bool(inner), bool(border))
            if inner:
                cost = cost + shape.inner_cost(parts)
                key = tuple(inner)
                if key not in inner_waves:
                    inner_waves[key] = _gather_inner_waves(inner, L, V, item, S, parts, per_head)
                waves += inner_waves[key]
            if border:
                pixels = []
                for u in range(max(n for _, n, _ in border)):
                    row_taps = []
                    for p in range(L.K):
                        if not rows_live[p]:
                            row_taps.append(-1)
                            continue
                        live = sum(any(u < n and 0 <= j0 + u + q - r < cols for j0, n, _ in border) for q in range(L.K))
                        row_taps.append(live)
                    pixels.append(row_taps)
                cost = cost + shape.border_cost(pixels)
                live_taps = sum(max(x, 0) for row in pixels for x in row)
                waves += live_taps * _gather_border_waves(border, L, V, item, per_head)
            instr = instr + cost
    return instr, waves, blocks_x


def _gather_inner_waves(lanes, L: Layer, V: int, item: int, S: int, parts: int, per_head: int) -> float:
    """One warp's L1 wavefronts on the inside path: per part and window row, S + K - 1 column vectors,
    K ghost-table vectors and S * K attention weights."""
    K, r = L.K, L.K // 2
    vec = V * item
    total = 0
    for part in range(parts):
        cols = [[((j0 + part * S - r + k) * L.C + cv * V) * item for j0, _, cv in lanes] for k in range(S + K - 1)]
        total += sum(wavefronts(a, vec) for a in cols)
        total += sum(vector_waves([(t * L.C + cv * V) * 4 for _, _, cv in lanes], V * 4) for t in range(K))
        for q in range(K):
            for u in range(S):
                total += wavefronts(
                    [(((j0 + part * S + u) * L.G + cv * V // per_head) * K * K + q) * item for j0, _, cv in lanes], item
                )
    return total * K


def _gather_border_waves(lanes, L: Layer, V: int, item: int, per_head: int) -> float:
    """One tap of the border path: a column vector, a ghost-table vector and a weight."""
    vec = V * item
    col = wavefronts([(j0 * L.C + cv * V) * item for j0, _, cv in lanes], vec)
    ghost = vector_waves([cv * V * 4 for _, _, cv in lanes], V * 4)
    weight = wavefronts([((j0 * L.G + cv * V // per_head) * L.K * L.K) * item for j0, _, cv in lanes], item)
    return col + ghost + weight


def attn_ghost_whole(flow: Flow, dtype: str, L: Layer, V: int, arch: str, registers: int) -> Whole:
    """The fused attention/ghost gradient pass, block by block, as ELSA-Swin runs it (ghost_add only:
    no ghost_mul weighting, no ghost_mul gradient; the head's channels one chunk): the per-thread set-up,
    each step's three parts and barriers, and the ghost partial sums stored at the end."""
    item = 4 if dtype == "float32" else 2
    plan = attn_plan(L, V)
    cv, ct, npairs = plan["chunk_vectors"], plan["chunk_taps"], plan["chunk_vectors"] * plan["chunk_taps"]
    steps_of_tile = [-(-n // plan["step"]) for n in plan["tile_slots"]]
    step_runs = plan["step"] // 4
    threads, warps = 256, 8
    step = next(lp for lp in flow.loops if flow.opcodes(lp.blocks, "BAR") >= 2 and lp.parent is None)
    bars = sorted(
        flow.blocks[b].start for b in flow.own(step) for i in flow.blocks[b].code if i.opcode.startswith("BAR")
    )
    if len(bars) < 3:
        raise ValueError("attn_ghost: no three barriers in the step loop")
    own = flow.own(step)
    hi = max(flow.blocks[b].code[-1].address for b in step.blocks) + 1
    r1 = {b for b in own if flow.blocks[b].start <= bars[0]}
    r2 = {b for b in own if bars[0] < flow.blocks[b].start <= bars[1]}
    r3 = {b for b in own if flow.blocks[b].start > bars[1]}
    bar1 = next(b for b in r1 if any(i.opcode.startswith("BAR") for i in flow.blocks[b].code))
    products = []
    for lp in step.children:
        narrow, wide = flow.loads(lp.blocks)
        if wide >= 2 and not narrow and bars[0] < flow.blocks[lp.header].start < bars[1]:
            products.append((flow.count(lp.blocks).instructions, lp))
    prod = min(products, key=lambda q: q[0])[1]
    sums = [lp for lp in step.children if flow.blocks[lp.header].start > bars[1]]
    nloop = max(sums, key=lambda lp: flow.opcodes(lp.blocks, "LDS"))
    r2_path = r2 & (flow.dom[prod.header] | flow.postdom[flow.exit_block(prod)])
    r3_path = r3 & (flow.dom[nloop.header] | flow.postdom[flow.exit_block(nloop)])
    setup = flow.count(flow.dom[step.header] - {step.header})
    after = flow.count({b for b in flow.reachable if flow.blocks[b].start >= hi})
    # per step, per warp
    run_cost = flow.count(flow.unconditional(prod))
    pair_cost = flow.count(flow.own(prod) - flow.unconditional(prod)) * 0.5
    # one (pixel, tap) item of part 3: the loop's own code, and its sum's loops by their unrolling
    sum_cost = flow.count(flow.own(nloop))
    remaining = cv
    for inner in sorted(nloop.children, key=lambda lp: -flow.opcodes(lp.blocks, "LDS")):
        unroll = max(flow.opcodes(inner.blocks, "LDS"), 1)
        sum_cost = sum_cost + flow.count(inner.blocks) * (remaining // unroll)
        remaining -= remaining // unroll * unroll
    step_items = plan["step"] * ct
    pixel_sums = ct * sum_stride(cv)
    per_warp_step = []
    waves_step = []
    for w in range(warps):
        tids = range(32 * w, 32 * w + 32)
        live = [sum(t + k * threads < npairs for t in tids) for k in range(2)]
        live_pairs = sum(x > 0 for x in live)
        rounds = [
            [t + k * threads for t in tids if t + k * threads < step_items] for k in range(-(-step_items // threads))
        ]
        rounds = [r for r in rounds if r]
        c = flow.count(r1 if w * 32 < step_runs else r1 & flow.dom[bar1])
        c = c + flow.count(r2_path) + flow.count(r3_path)
        c = c + (run_cost + pair_cost * live_pairs) * step_runs
        c = c + sum_cost * len(rounds)
        per_warp_step.append(c)
        # L1: a run's 4 pixels, a grad_out and a features vector per live pair; a store of each sum
        waves = 0.0
        for k in range(2):
            pairs = [t + k * threads for t in tids if t + k * threads < npairs]
            if not pairs:
                continue
            go = [(pp % cv) * V * item for pp in pairs]
            x = [((pp // cv) % L.K * L.C + (pp % cv) * V) * item for pp in pairs]
            slots = sum_store_words(cv, pairs)
            waves += step_runs * 4 * (vector_waves(go, V * item) + vector_waves(x, V * item) + bank_wavefronts(slots))
        for r in rounds:  # part 3: each item's sums, then its store
            words = sum_read_words(cv, ct, r)
            waves += cv * bank_wavefronts(words) + wavefronts(
                [(i // ct * L.G * L.K**2 + i % ct) * item for i in r], item
            )
        waves_step.append(waves)
    block_steps = sum(steps_of_tile)
    groups = L.G * plan["chunks"]
    instr = Counts()
    for c in per_warp_step:
        instr = instr + c * block_steps
    instr = instr + (setup + after) * (warps * len(steps_of_tile))
    instr = instr * (L.B * groups)
    waves = sum(waves_step) * block_steps * L.B * groups
    tiles = L.B * len(steps_of_tile)
    partials = tiles * L.K * L.K * L.C * 4
    shared = step_runs * 40 + plan["step"] * pixel_sums * 4
    return Whole(
        "attn+ghost",
        dtype,
        L,
        instr.instructions,
        instr.fp32,
        waves,
        layer_bytes("attn+ghost", dtype, L) + partials,
        L.B * L.C * L.H * L.W * L.K * L.K,
        occupancy(arch, threads, registers, shared),
        tiles * groups,
    )


def attn_plan(L: Layer, V: int) -> dict:
    """launch.h's plan_attn_ghost for a layer: chunks, step, the tiles' run slots."""
    cvh, kk, max_pairs = L.C // L.G // V, L.K * L.K, 512
    chunk_vectors = max(d for d in range(1, cvh + 1) if cvh % d == 0 and d * min(kk, max_pairs) <= max_pairs)
    chunk_taps = min(kk, max_pairs // chunk_vectors)
    chunks = (cvh // chunk_vectors) * -(-kk // chunk_taps)
    step = min(max(32768 // (sum_stride(chunk_vectors) * chunk_taps * 4), 1), 8)
    step = max(step // 4, 1) * 4
    plane = L.H * (-(-L.W // 4) * 4)
    others = max(1, L.B * L.G * chunks)
    want = min(max(-(-4096 // others), 1), -(-plane // step))
    per_image = -(-plane // want)
    per_tile = -(-per_image // step) * step
    tiles = -(-plane // per_tile)
    slots = [min(per_tile, plane - t * per_tile) for t in range(tiles)]
    return dict(chunk_vectors=chunk_vectors, chunk_taps=chunk_taps, chunks=chunks, step=step, tile_slots=slots)


REDUCE_SLICES, REDUCE_ITEMS = 8, 32  # kernels.cuh's kReduceSlices (threads per item) and kReduceItems


def ghost_reduce_whole(flow: Flow, L: Layer, V: int, arch: str, registers: int) -> Whole:
    """ghost_reduce<float> summing the ghost_add gradient's partial sums (one per tile): REDUCE_ITEMS items per
    block, each item's tiles in REDUCE_SLICES slices summed by one thread each, then the slices in order."""
    plan = attn_plan(L, V)
    tiles = L.B * len(plan["tile_slots"])
    items = L.C * L.K * L.K
    per_thread = -(-tiles // REDUCE_SLICES)
    loops = sorted((lp for lp in flow.loops if flow.loads(lp.blocks)[0]), key=lambda lp: -flow.loads(lp.blocks)[0])
    remaining, chain, thread = per_thread, 0, Counts()
    for lp in loops:  # the unrolled loop, then the one that takes the rest
        unroll = flow.loads(lp.blocks)[0]
        trips = remaining // unroll
        thread = thread + flow.count(lp.blocks) * trips
        chain += trips
        remaining -= trips * unroll
    in_loops = set().union(*(lp.blocks for lp in flow.loops))
    thread = thread + flow.count(flow.reachable - in_loops)
    blocks = -(-items // REDUCE_ITEMS)
    warps = blocks * 256 // 32
    waves = warps * per_thread * wavefronts([4 * k for k in range(32)], 4)
    return Whole(
        "ghost_reduce",
        "float32",
        L,
        (thread * warps).instructions,
        (thread * warps).fp32,
        waves,
        tiles * items * 4 + items * 4,
        0,
        occupancy(arch, 256, registers, 256 * 4),
        blocks,
        latency_chain=chain + remaining,
    )


def whole(kernel: Kernel, layer: Layer) -> Whole:
    """A kernel ELSA-Swin runs (kernel.role), over its whole grid at this layer."""
    regs = kernel.resources.get("REG", 128)
    if kernel.role in ("forward", "grad features"):
        return gather_whole(kernel.flow, kernel.role, kernel.dtype, layer, kernel.V, kernel.arch, regs)
    if kernel.role == "attn+ghost":
        return attn_ghost_whole(kernel.flow, kernel.dtype, layer, kernel.V, kernel.arch, regs)
    return ghost_reduce_whole(kernel.flow, layer, 16 // {"float32": 4}.get(kernel.dtype, 2), kernel.arch, regs)


ROLES = ["forward", "grad features", "attn+ghost", "ghost_reduce"]


def layer_kernels(kernels: list[Kernel], arch: str, dtype: str, layer: Layer) -> list[Whole]:
    """The op's kernels for one ELSA layer's forward and backward in one dtype: forward, grad features,
    the fused pass and the ghost_add gradient's reduction (in float32 whatever the dtype)."""
    out = []
    for role in ROLES:
        want = "float32" if role == "ghost_reduce" else dtype
        k = next((k for k in kernels if k.arch == arch and k.role == role and k.dtype == want), None)
        if k is None:
            continue
        w = whole(k, layer)
        if role == "ghost_reduce":
            w = dataclasses.replace(w, dtype=dtype, layer=layer)
            # its partials are as many as the fused pass of this dtype makes
            if dtype != "float32":
                w = whole(dataclasses.replace(k, V=8), layer)
                w = dataclasses.replace(w, dtype=dtype)
        out.append(w)
    return out


def training_step(kernels: list[Kernel], arch: str, dtype: str, model: str, device: Device) -> tuple[float, float]:
    """(estimate, roofline) in ms of the op's forward + backward over every ELSA layer of one training
    step of `model` at batch 128."""
    _, depths, _ = MODELS[model]
    est = roof = 0.0
    for stage, depth in enumerate(depths, start=1):
        for w in layer_kernels(kernels, arch, dtype, stage_layer(model, stage, 128)):
            est += depth * w.estimate_ms(device)
            roof += depth * (w.roofline_ms(device) if w.channel_taps else 0.0)
    return est, roof


def inner_per_ct(kernels: list[Kernel], arch: str, role: str, dtype: str) -> str:
    for k in kernels:
        if k.arch == arch and k.dtype == dtype and k.K == STAGE1["K"] and k.V > 1:
            for loop in k.loops:
                if loop.variant == role:
                    return f"{loop.per_ct():.2f}"
    return "-"


def report(
    kernels: list[Kernel],
    all_k: bool,
    markdown: bool,
    devices: list[Device] | None = None,
    measured: dict[tuple[str, str], float] | None = None,
    batches: tuple[int, ...] = (128, 1),
) -> str:
    """Three tables: every kernel's inner loop by class (every arch); the whole kernels ELSA-Swin-T runs,
    stages 1-3, per device; the op's forward + backward per training step of each model."""
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
    out = [
        "Inner loops (instructions per channel and tap of one trip of the common path):",
        "",
        _table(head, rows, markdown),
        "",
    ]
    archs = sorted({k.arch for k in kernels if k.role}, key=lambda a: -int(re.sub(r"\D", "", a)))
    # whole-kernel instructions per channel and tap, every arch in the library (no device needed)
    rows = []
    for arch in archs:
        for dtype in ("float32", "bfloat16"):
            for w in layer_kernels(kernels, arch, dtype, stage_layer("ELSA-Swin-T", 1, 128)):
                if w.channel_taps:
                    rows.append(
                        [
                            arch,
                            w.kernel,
                            dtype,
                            inner_per_ct(kernels, arch, w.kernel, dtype),
                            f"{w.per_ct():.2f}",
                            f"{w.fp32_instructions * LANES / w.channel_taps:.2f}",
                            f"{w.wavefronts / (w.warp_instructions / SCHEDULERS):.2f}",
                            str(w.warps_per_sm),
                        ]
                    )
    head = [
        "arch",
        "kernel",
        "dtype",
        "inner loop /ct",
        "whole kernel /ct",
        "FP32 /ct",
        "L1 waves / issue cycle",
        "warps/SM",
    ]
    out += [
        "Whole kernels at ELSA-Swin-T stage 1, batch 128 (instructions per channel and tap over the grid):",
        "",
        _table(head, rows, markdown),
        "",
    ]
    rows = []
    for device in devices or DEVICES:
        if device.arch not in archs:
            continue
        for batch in batches:
            for stage in (1, 2, 3):
                for dtype in ("float32", "bfloat16"):
                    for w in layer_kernels(kernels, device.arch, dtype, stage_layer("ELSA-Swin-T", stage, batch)):
                        b = w.bounds(device)
                        roof = w.roofline_ms(device) if w.channel_taps else 0.0
                        est = w.estimate_ms(device)
                        row = [
                            device.name,
                            str(stage),
                            str(batch),
                            w.kernel,
                            dtype,
                            f"{w.per_ct():.2f}" if w.channel_taps else "-",
                            str(w.warps_per_sm),
                            *(f"{1e3 * b[x]:.3f}" for x in ("issue", "L1", "HBM", "FMA")),
                            f"{1e3 * b.get('latency', 0):.3f}" if "latency" in b else "-",
                            f"{est:.3f}",
                            f"{roof:.3f}" if roof else "-",
                            f"{100 * roof / est:.0f}%" if roof else "-",
                            w.binding(device),
                        ]
                        if measured is not None:
                            seen = measured.get((w.kernel, dtype)) if stage == 1 and batch == STAGE1["B"] else None
                            if seen and w.kernel == "attn+ghost":  # bench_op times it with ghost_reduce
                                est += sum(
                                    x.estimate_ms(device)
                                    for x in layer_kernels(kernels, device.arch, dtype, w.layer)
                                    if x.kernel == "ghost_reduce"
                                )
                            row += [f"{seen:.3f}", f"{seen / est:.2f}"] if seen else ["-", "-"]
                        rows.append(row)
    head = [
        "device",
        "stage",
        "batch",
        "kernel",
        "dtype",
        "instr/ct",
        "warps/SM",
        "issue ms",
        "L1 ms",
        "HBM ms",
        "FMA ms",
        "latency ms",
        "estimate ms",
        "roofline ms",
        "% roofline",
        "bound",
    ]
    if measured is not None:
        head += ["measured ms", "measured / estimate"]
    out += ["Whole kernels of ELSA-Swin-T (estimate = the largest bound):", "", _table(head, rows, markdown), ""]
    rows = []
    for device in devices or DEVICES:
        if device.arch not in archs:
            continue
        for model in MODELS:
            for dtype in ("float32", "bfloat16"):
                est, roof = training_step(kernels, device.arch, dtype, model, device)
                rows.append([device.name, model, dtype, f"{est:.2f}", f"{roof:.2f}", f"{100 * roof / est:.0f}%"])
    head = ["device", "model", "dtype", "op estimate ms", "roofline ms", "% roofline"]
    out += [
        "The op's forward + backward over all ELSA layers, one training step at batch 128:",
        "",
        _table(head, rows, markdown),
    ]
    return "\n".join(out)


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
    parser.add_argument("--arch", nargs="+", help="the architectures to read (default: every one the library has)")
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
    archs = args.arch or library_archs(library, cuobjdump)
    devices = pick_devices(args.device)
    if args.device and not args.arch:  # one GPU: its architecture only
        archs = [a for a in archs if a in {d.arch for d in devices}] or archs
    kernels = read_kernels(library, archs, cuobjdump)
    if not any(k.loops for k in kernels):
        print(f"error: {library} holds no elsa_op CUDA kernels for {' '.join(archs)}", file=sys.stderr)
        return 2
    measured = measured_times(args.measured) if args.measured and args.measured.exists() else None
    print(report(kernels, args.all, args.markdown, devices, measured))
    if args.json:
        out = {
            "kernels": [
                {f.name: getattr(k, f.name) for f in dataclasses.fields(k) if f.name != "flow"} for k in kernels
            ]
        }
        out["loops"] = [[dataclasses.asdict(loop) for loop in k.loops] for k in kernels]
        out["whole"] = [
            dict(
                device=d.name,
                stage=stage,
                batch=batch,
                kernel=w.kernel,
                dtype=dtype,
                per_ct=w.per_ct(),
                bounds_ms={x: 1e3 * v for x, v in w.bounds(d).items()},
                estimate_ms=w.estimate_ms(d),
                roofline_ms=w.roofline_ms(d) if w.channel_taps else None,
                bound=w.binding(d),
            )
            for d in devices
            if d.arch in archs
            for batch in (128, 1)
            for stage in (1, 2, 3)
            for dtype in ("float32", "bfloat16")
            for w in layer_kernels(kernels, d.arch, dtype, stage_layer("ELSA-Swin-T", stage, batch))
        ]
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
