"""det/ and seg/ test helpers: running the tools (in a subprocess, or their main() in this process) on a
small config, reading the Runner's logs, building a config's model, the published model sizes."""

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def run_tool(project: str, args, timeout=1500):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO / project, env=env, capture_output=True, text=True, timeout=timeout
    )


def scalars(work_dir: Path, key: str) -> list:
    """The values of one logged scalar ("loss", "lr", ...) in logging order, from the Runner's scalars.json."""
    files = sorted(work_dir.glob("*/vis_data/scalars.json"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    return [r[key] for r in rows if key in r]


def losses(work_dir: Path):
    """Training losses in logging order from the Runner's scalars.json."""
    return scalars(work_dir, "loss")


def falling(values) -> bool:
    k = max(1, len(values) // 3)
    return sum(values[-k:]) / k < sum(values[:k]) / k


def upstream_tool(package: str, tool: str) -> Path:
    """mmdet's or mmseg's own tools/train.py or tools/test.py, as pip installs them."""
    module = __import__(package)
    return Path(module.__file__).parent / ".mim" / "tools" / tool


def run_upstream(package: str, tool: str, args, cwd: Path, timeout=1500):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, str(upstream_tool(package, tool)), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def load_tool(project: str, name: str) -> ModuleType:
    """det/ or seg/ tools/<name>.py as a module, to call its ``main(argv)`` in this process."""
    path = REPO / project / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"elsa_{project}_tools_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The published models' sizes in millions (the original's README): Mask R-CNN T/S 49M/72M, Cascade Mask
# R-CNN T/S 86M/110M, UPerNet T/S 61M/85M. The ELSA-Swin-B UPerNet is ours (126M), not published.
PUBLISHED_MPARAMS = {
    "mask-rcnn_elsa-swin-t": 49,
    "mask-rcnn_elsa-swin-s": 72,
    "cascade-mask-rcnn_elsa-swin-t": 86,
    "cascade-mask-rcnn_elsa-swin-s": 110,
    "upernet_elsa-swin-t": 61,
    "upernet_elsa-swin-s": 85,
    "upernet_elsa-swin-b": 126,
}


def published_mparams(config: Path) -> int:
    """The published size (millions of parameters) of the model a det/seg config builds."""
    return PUBLISHED_MPARAMS[config.stem.split("_fpn")[0].split("_8xb2")[0]]


def build_model(config: Path, cfg=None):
    """The model of a det/ or seg/ config, built on the meta device (no memory, no init); mmdet's and mmseg's
    SwinTransformer read their drop-path rates from a tensor, so theirs are built on the CPU. Returns
    (cfg, model)."""
    import torch
    from mmengine.config import Config

    cfg = cfg if cfg is not None else Config.fromfile(str(config))
    package = "mmdet" if REPO / "det" in config.parents else "mmseg"
    registry = importlib.import_module(f"{package}.registry")
    importlib.import_module(f"{package}.utils").register_all_modules()
    with torch.device("cpu" if cfg.model.backbone.type == "SwinTransformer" else "meta"):
        model = registry.MODELS.build(cfg.model)
    return cfg, model


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def tool_error(project: str, name: str, argv) -> str:
    """Run a det/ or seg/ tool's main(argv) in this process where it must refuse its input; returns the
    one-line message it exits with."""
    import pytest

    tool = load_tool(project, name)
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(a) for a in argv])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def capture_runs(monkeypatch) -> list:
    """Replaces the Runner of our tools by one that records the config it is given and runs nothing; returns
    the list the configs go to. The tools' checks before the Runner (files, options) still run."""
    import elsa_mm.tools

    seen = []

    class Runner:
        model = None

        @staticmethod
        def from_cfg(cfg):
            seen.append(cfg)
            return Runner()

        def train(self):
            pass

        def test(self):
            return {}

    monkeypatch.setattr(elsa_mm.tools, "Runner", Runner)
    monkeypatch.setattr(elsa_mm.tools, "check_fits", lambda *args: None)
    return seen


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(project: str, script: str, args, env=None, timeout=900):
    """bash tools/<script> of det/ or seg/ with a free master port, as a user runs it from the project folder."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PORT=str(free_port()), PYTHON=sys.executable, **(env or {}))
    return subprocess.run(
        ["bash", f"tools/{script}", *map(str, args)],
        cwd=REPO / project,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def logged_metrics(work_dir: Path) -> dict:
    """The metrics of the last test run in work_dir, from the Runner's <timestamp>.json."""
    files = sorted(p for p in work_dir.glob("*/*.json") if p.stem == p.parent.name)
    return json.loads(files[-1].read_text().splitlines()[-1])


FAKE_SRUN = """#!{python}
# srun's stand-in: records its arguments, then starts --ntasks processes of the command here, with the
# variables SLURM gives each task.
import json, os, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_SRUN_LOG"], "w") as f:
    json.dump(args, f)
options, i = {{}}, 0
while args[i].startswith("-"):
    if args[i] == "-p":
        options["-p"], i = args[i + 1], i + 2
        continue
    key, _, value = args[i].partition("=")
    options[key], i = value, i + 1
tasks, per_node = int(options["--ntasks"]), int(options["--ntasks-per-node"])
env = dict(os.environ, SLURM_NTASKS=str(tasks), SLURM_NODELIST="localhost", SLURM_JOB_NAME=options["--job-name"])
procs = [
    subprocess.Popen(args[i:], env=dict(env, SLURM_PROCID=str(r), SLURM_LOCALID=str(r % per_node)))
    for r in range(tasks)
]
sys.exit(max(p.wait() for p in procs))
"""

FAKE_SCONTROL = """#!/usr/bin/env bash
# scontrol show hostnames NODELIST, for the one node "localhost"
echo "$3"
"""


def fake_slurm(tmp_path: Path) -> dict:
    """A bin folder with stand-ins of srun and scontrol first on PATH; returns the environment to run
    tools/slurm_*.sh with (srun's arguments go to the file FAKE_SRUN_LOG names)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN.format(python=sys.executable)), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_SRUN_LOG=str(tmp_path / "srun_args.json"))
    env["MASTER_PORT"] = str(free_port())
    return env
