"""The ELSA-Swin model table: parameters, GFLOPs, peak training memory and images/s of
elsa_swin_{tiny,small,base} next to timm's swin_{tiny,small,base}_patch4_window7_224, measured in one
run on the current device; then parameters and GFLOPs of the det/seg configs.

    python benchmarks/model_table.py [--device cpu|cuda] [--batch 8] [--reps 3] [--no-speed] [--no-dense]

GFLOPs are multiply-adds (as Swin's and ELSA's tables count them): torch.utils.flop_counter's FLOPs / 2,
which count the ELSA op through its registered formula. Peak training memory is one forward + backward
+ SGD step at --batch: on CUDA torch.cuda.max_memory_allocated, on CPU the growth of the process's peak
resident size (each model in a fresh process). Images/s are medians of --reps timed steps after a warm-up,
ELSA-Swin and Swin taking turns step by step; the last column is ELSA-Swin's rate over Swin's.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import timm
import torch
from bench_models import images_per_second, make_step  # the same timing as bench_models.py (this folder)
from torch.utils.flop_counter import FlopCounterMode

import elsa_swin  # noqa: F401  (registers the ELSA-Swin models)

PAIRS = [
    ("elsa_swin_tiny", "swin_tiny_patch4_window7_224"),
    ("elsa_swin_small", "swin_small_patch4_window7_224"),
    ("elsa_swin_base", "swin_base_patch4_window7_224"),
]
REPO = Path(__file__).resolve().parents[1]
DENSE = [  # config, published parameters (M), test input (H, W)
    ("det/configs/elsa_swin/mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py", 49, (800, 1344)),
    ("det/configs/elsa_swin/mask-rcnn_elsa-swin-s_fpn_ms-crop-1x_coco.py", 72, (800, 1344)),
    ("det/configs/elsa_swin/cascade-mask-rcnn_elsa-swin-t_fpn_ms-crop-1x_coco.py", 86, (800, 1344)),
    ("det/configs/elsa_swin/cascade-mask-rcnn_elsa-swin-s_fpn_ms-crop-1x_coco.py", 110, (800, 1344)),
    ("seg/configs/elsa_swin/upernet_elsa-swin-t_8xb2-160k_ade20k-512x512.py", 61, (512, 2048)),
    ("seg/configs/elsa_swin/upernet_elsa-swin-s_8xb2-160k_ade20k-512x512.py", 85, (512, 2048)),
]


def gmacs(model: torch.nn.Module, x: torch.Tensor, **kwargs) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, **kwargs)
    return counter.get_total_flops() / 2 / 1e9


def peak_train_memory_mib(name: str, device: str, batch: int) -> float:
    """One training step of ``name`` in a fresh process: the memory it takes at its peak."""
    code = f"""
import json, torch, timm, elsa_swin
from pathlib import Path
device = torch.device({device!r})
model = timm.create_model({name!r}).to(device)
x = torch.randn({batch}, 3, 224, 224, device=device)
opt = torch.optim.SGD(model.parameters(), lr=1e-4)
def rss_peak():
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM")).split()[1]) * 1024
if device.type == "cuda":
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
else:
    Path("/proc/self/clear_refs").write_text("5"); base = rss_peak()
model(x).logsumexp(-1).mean().backward(); opt.step()
peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_peak()
print(json.dumps((peak - base) / 2**20))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def dense_rows(device: torch.device):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    for config, published, (H, W) in DENSE:
        project = "mmdet" if config.startswith("det/") else "mmseg"
        cfg = Config.fromfile(str(REPO / config))
        init_default_scope(project)
        if project == "mmdet":
            from mmdet.registry import MODELS
            from mmdet.structures import DetDataSample as Sample
        else:
            from mmseg.registry import MODELS
            from mmseg.structures import SegDataSample as Sample
        model = MODELS.build(cfg.model).to(device).eval()
        params = sum(p.numel() for p in model.parameters()) / 1e6
        shape = (H, W)
        sample = Sample(
            metainfo=dict(
                img_shape=shape, ori_shape=shape, pad_shape=shape, batch_input_shape=shape, scale_factor=(1.0, 1.0)
            )
        )
        x = torch.randn(1, 3, H, W, device=device)
        g = gmacs(model, x, data_samples=[sample], mode="tensor")
        yield Path(config).stem, params, published, f"{H}x{W}", g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="default: 64 on CUDA, 8 on CPU")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-speed", action="store_true", help="parameters and GFLOPs only")
    parser.add_argument("--no-dense", action="store_true", help="leave out the det/seg configs")
    args = parser.parse_args()
    device = torch.device(args.device)
    batch = args.batch or (64 if device.type == "cuda" else 8)
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# classifiers at 224x224; memory and images/s at batch {batch}; {where}; torch {torch.__version__}")
    print(
        "| model | params (M) | GFLOPs | peak train memory (MiB) | inference img/s | training img/s "
        "| vs Swin (inference / training) |"
    )
    print("|---|---|---|---|---|---|---|")
    x = torch.randn(batch, 3, 224, 224, device=device)
    for pair in PAIRS:
        models = [timm.create_model(name).to(device) for name in pair]
        inference = training = [None, None]
        if not args.no_speed:  # ELSA-Swin and Swin take turns
            inference = images_per_second([make_step(m, x, False) for m in models], x, args.reps)
            training = images_per_second([make_step(m, x, True) for m in models], x, args.reps)
        for k, (name, model) in enumerate(zip(pair, models, strict=True)):
            params = sum(p.numel() for p in model.parameters()) / 1e6
            cells = [f"{params:.2f}", f"{gmacs(model.eval(), x[:1]):.2f}"]
            if args.no_speed:
                cells += ["-", "-", "-", "-"]
            else:
                cells += [
                    f"{peak_train_memory_mib(name, args.device, batch):.0f}",
                    f"{inference[k]:.1f}",
                    f"{training[k]:.1f}",
                    f"{inference[k] / inference[1]:.2f}x / {training[k] / training[1]:.2f}x",
                ]
            print(f"| {name} | {' | '.join(cells)} |", flush=True)
        del models
    if args.no_dense:
        return
    print()
    print(f"# det/seg configs (whole models); GFLOPs at the test input size; {where}")
    print("| config | params (M) | published params (M) | input | GFLOPs |")
    print("|---|---|---|---|---|")
    for name, params, published, size, g in dense_rows(device):
        print(f"| {name} | {params:.2f} | {published} | {size} | {g:.0f} |", flush=True)


if __name__ == "__main__":
    main()
