"""Runs that survive preemption: the stop signals schedulers send, randomness that a resumed run replays,
and the rendezvous of tasks started by SLURM's ``srun``.

- SIGTERM and SIGUSR1 (what SLURM, Kubernetes and cloud schedulers send before they kill a job) only set
  a flag; the trainer finishes the step it is in, saves a resumable ``last.pth.tar`` atomically and exits
  with :data:`EXIT_PREEMPTED`.
- Every random draw of a step comes from generators seeded by (seed, rank, epoch, step), so a run resumed
  in the middle of an epoch sees the same batches and drop paths as one that was never stopped, and with
  ``-j 0`` the same augmentations and mixup too (loader workers draw theirs afresh).
"""

import logging
import os
import random
import re
import signal
import subprocess

import numpy as np
import torch

_logger = logging.getLogger(__name__)

# EX_TEMPFAIL of sysexits.h: a temporary failure, the invocation may be retried (requeued).
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Remembers the first stop signal received after :meth:`install`, for the trainer to act on
    between steps."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            self.signal = signum
            _logger.warning(f"{signal.Signals(signum).name} received: finishing this step, then saving")

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""


def reseed(seed: int, rank: int, epoch: int, step: int) -> None:
    """Seed torch, numpy and random from (seed, rank, epoch, step); step -1 is the start of the epoch."""
    state = np.random.SeedSequence([seed, rank, epoch, step + 1]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))
    np.random.seed(int(state[0]))
    random.seed(int(state[1]))


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list, e.g. ``gpu[01-03,07],login`` (``scontrol show hostnames`` where it
    exists, otherwise parsed here)."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        if out:
            return out
    except (OSError, subprocess.SubprocessError):
        pass
    hosts = []
    for prefix, ranges in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?,?", nodelist):
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def slurm_rendezvous() -> None:
    """For a task started by ``srun`` (timm reads its rank and world size from SLURM_PROCID and
    SLURM_NTASKS), the address torch's ``env://`` rendezvous needs: MASTER_ADDR (the job's first node)
    and MASTER_PORT (29500), unless already set."""
    env = os.environ
    if "SLURM_PROCID" not in env:
        return
    if "MASTER_ADDR" not in env:
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "")
        env["MASTER_ADDR"] = nodes[0] if nodes else "127.0.0.1"
    env.setdefault("MASTER_PORT", "29500")
