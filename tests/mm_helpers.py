"""Running det/ and seg/ tools in a subprocess on a small config, and reading the Runner's logs."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_tool(project: str, args, timeout=1500):
    env = dict(os.environ, OMP_NUM_THREADS="2")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO / project, env=env, capture_output=True, text=True, timeout=timeout
    )


def losses(work_dir: Path):
    """Training losses in logging order from the Runner's scalars.json."""
    files = sorted(work_dir.glob("*/vis_data/scalars.json"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r]


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
