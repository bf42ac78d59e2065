"""tools/gpu_check.sh rehearsed on CPU: a GPU is lent rarely and for minutes, so the script must survive
its one run. Without a GPU it must notice, skip what needs one with the reason, and still write its
summary; with a GPU that cannot build in time it must stop the build at its cap and not retry it. Every
step is bounded, the summary is what the logs say, and $OUT stays within what the device tool brings back
(at most 8 files, no folders, plain names)."""

import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "gpu_check.sh"
STEP_LINE = re.compile(r"^(\S+): (ok|FAILED|TIMED OUT after \d+s) \(rc=(\d+), (\d+)s, ([\w.-]+)\)$")


def _run(tmp_path: Path, python: str, budget: int, step_cap: int, extra_env=None):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=python, BUDGET=str(budget), STEP_CAP=str(step_cap))
    env.update(TMPDIR=str(tmp_path), **(extra_env or {}))
    start = time.monotonic()
    r = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=budget + 60)
    return r, out, time.monotonic() - start


def _summary_true_to_logs(out: Path, step_cap: int) -> dict:
    """Each step's summary line against its log: the header with its timeout (at most the cap) and the rc line.
    Returns {step: verdict line}."""
    steps = {}
    for line in (out / "summary.txt").read_text().splitlines():
        if m := STEP_LINE.match(line):
            name, verdict, rc, _, log = m.groups()
            text = (out / log).read_text()
            header = re.search(rf"^===== {re.escape(name)} \(timeout (\d+)s\)", text, re.M)
            assert header, f"{name}: no header in {log}"
            assert int(header.group(1)) <= step_cap, f"{name} ran with a timeout above the cap"
            assert re.search(rf"^----- {re.escape(name)}: rc={rc} after \d+s$", text, re.M), f"{name}: rc not in {log}"
            assert (verdict == "ok") == (rc == "0") and verdict.startswith("TIMED OUT") == (rc in ("124", "137"))
            steps[name] = line
        elif ": SKIPPED (" in line:
            steps[line.split(":")[0]] = line
    return steps


def _out_within_limits(out: Path):
    entries = list(out.iterdir())
    assert len(entries) <= 8, sorted(e.name for e in entries)
    for e in entries:
        assert e.is_file() and not e.is_symlink(), e
        assert re.fullmatch(r"[A-Za-z0-9._-]+", e.name), e.name


def test_every_python_call_of_the_script_has_a_timeout():
    """Statically: each line that runs the python is a bounded step or under `timeout` (a call with no
    bound could hang the one GPU run), scripts run by path (not `-m` on folders without __init__.py), and
    pytest is stopped with SIGINT so that it prints its summary."""
    text = SCRIPT.read_text()
    for line in text.replace("\\\n", " ").splitlines():  # one logical line per command
        if '"$PY"' in line and not line.lstrip().startswith("#"):
            assert "step " in line or "timeout " in line, f"gpu_check.sh runs python unbounded: {line}"
        assert not re.search(r"-m (tools|benchmarks)\.", line), f"gpu_check.sh: {line}"
    assert "timeout --signal=INT" in text
    assert "gpu_check_out/" in (REPO / ".gitignore").read_text().splitlines()


def test_rehearsal_without_a_gpu(tmp_path):
    """No CUDA device: every GPU step is skipped with the reason, the summary is still written and true
    to the logs, and the script says it did not pass."""
    r, out, seconds = _run(tmp_path, sys.executable, budget=120, step_cap=60)
    assert r.returncode == 1, r.stdout + r.stderr
    _out_within_limits(out)
    summary = (out / "summary.txt").read_text()
    assert "device: no CUDA device" in summary
    steps = _summary_true_to_logs(out, 60)
    for name in ("build", "tests", "memcheck", "bench_op", "cls_dist", "det_dist", "seg_dist", "bench_models"):
        assert steps[name] == f"{name}: SKIPPED (no CUDA device)", summary
    assert steps["env"].startswith("env: ok"), summary
    env_log = (out / "env.log").read_text()
    for tool in ("ninja", "compute-sanitizer", "nvcc"):
        assert re.search(rf"^{tool}: ", env_log, re.M), f"{tool} not looked up"
    # The minimum torch comes from pyproject.toml.
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    minimum = next(re.search(r">=\s*([\d.]+)", d).group(1) for d in deps if re.match(r"torch\b", d))
    assert f"(pyproject.toml asks for >= {minimum})" in summary
    assert "estimates" in steps and "total:" in summary
    assert seconds < 120


def test_rehearsal_of_a_build_that_runs_out_of_time(tmp_path):
    """A GPU that answers (a stand-in python reports sm_90) but whose build does not finish: the build is
    stopped at its cap and not retried, its architecture is the GPU's and not the environment's, no
    ptxas verdict is made up for a build that did not happen, and the script stops with its summary."""
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        'for a in "$@"; do case "$a" in\n'
        '  *get_device_capability*) printf "yes\\n9.0 Stand-in H100\\n"; exit 0;;\n'
        '  setup.py) echo "arch list: $TORCH_CUDA_ARCH_LIST"; exec sleep 120;;\n'
        "esac; done\n"
        f'exec {sys.executable} "$@"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    r, out, seconds = _run(tmp_path, str(fake), budget=100, step_cap=4, extra_env={"TORCH_CUDA_ARCH_LIST": "8.0;8.6"})
    assert r.returncode == 1, r.stdout + r.stderr
    _out_within_limits(out)
    summary = (out / "summary.txt").read_text()
    steps = _summary_true_to_logs(out, 4)
    assert "device: Stand-in H100 (arch 9.0)" in summary
    assert steps["build"].startswith("build: TIMED OUT"), summary
    assert "build-retry" not in summary and "ptxas" not in summary
    assert "arch list: 9.0\n" in (out / "build.log").read_text()
    assert steps["smoke"].startswith(("smoke: FAILED", "smoke: TIMED OUT")) and "stopping" in summary
    assert seconds < 60
