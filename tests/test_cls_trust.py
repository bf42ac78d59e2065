"""cls: bad data, bad checkpoints, bad options and kills never give silently wrong numbers or lost runs."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from cls_helpers import CLS, TRAIN_ARGS, read_summary, run, tool_error, write_digits
from PIL import Image

import elsa_swin  # noqa: F401


def image_folder(root: Path, splits: dict, size: int = 32) -> Path:
    """splits: {"train": {"cat": 3, ...}, "val": {...}}: that many distinct images per class."""
    for split, classes in splits.items():
        for k, (name, n) in enumerate(classes.items()):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (size, size), (40 * k, 20 * i, 128)).save(folder / f"{i}.png")
    return root


# ---- labels -------------------------------------------------------------------------------------
def test_val_split_is_labelled_through_train_classes(tmp_path):
    from elsa_cls.data import ImageFolderDataset

    data = image_folder(tmp_path, {"train": {"a": 1, "b": 1, "c": 1}, "val": {"a": 1, "c": 2}})
    train = ImageFolderDataset(data / "train")
    val = ImageFolderDataset(data / "val", class_names=train.class_names)
    assert [t for _, t in val.samples] == [0, 2, 2]  # "c" keeps its label 2, though val has no "b"


def test_val_class_unknown_to_train_is_refused_at_start(tmp_path):
    data = image_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1, "zebra": 1}})
    error = tool_error("train", [str(data), *TRAIN_ARGS, "--epochs", "1", "--output", str(tmp_path / "o")])
    assert "has class folders the model does not know: zebra" in error
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.pth.tar"))


def test_validate_refuses_folders_that_do_not_line_up(tmp_path):
    data = image_folder(tmp_path / "d", {"val": {"a": 1, "b": 1, "c": 1}})
    error = tool_error(
        "validate", [str(data), "--model", "elsa_swin_nano", "--num-classes", "4", "--img-size", "32", "-j", "0"]
    )
    assert "has 3 class folders but the model has 4 classes" in error


def test_unreadable_val_image_is_left_out_not_counted_twice(tmp_path):
    data = image_folder(tmp_path / "d", {"val": {"a": 2, "b": 1}})
    (data / "val" / "a" / "0.png").write_bytes(b"not an image")
    results = tmp_path / "r.json"
    r = run(
        [
            "validate.py",
            str(data),
            "--model",
            "elsa_swin_nano",
            "--num-classes",
            "2",
            "--img-size",
            "32",
            "-j",
            "0",
            "--results-file",
            str(results),
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(results.read_text())["images"] == 2
    assert "0.png: cannot be read" in r.stderr and "left out of the evaluation" in r.stderr


def test_images_that_need_care(tmp_path):
    from elsa_cls.data import ImageReadError, load_image

    deep = np.full((8, 8), 20000, dtype=np.uint16)  # about 30% grey in 16 bits
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    assert abs(int(np.asarray(load_image(tmp_path / "deep.png"))[0, 0, 0]) - 20000 * 255 // 65535) <= 1
    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "t.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "t.jpg").read_bytes()[:300])
    with pytest.raises(ImageReadError, match=f"{tmp_path / 'cut.jpg'}: cannot be read"):
        load_image(tmp_path / "cut.jpg")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 1000  # the same check that stops a 20000x20000 image
        with pytest.raises(ImageReadError, match=f"{tmp_path / 't.jpg'}: too many pixels"):
            load_image(tmp_path / "t.jpg")
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_symlink_loop_is_refused(tmp_path):
    data = image_folder(tmp_path / "d", {"train": {"a": 1}, "val": {"a": 1}})
    (data / "train" / "a" / "loop").symlink_to(data / "train")
    error = tool_error("train", [str(data), *TRAIN_ARGS, "--epochs", "1", "--output", str(tmp_path / "o")])
    assert "symlink loop" in error


# ---- options --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--epochs", "0"], "error: --epochs must be at least 1, got 0"),
        (["--resume", "/nonexistent/last.pth.tar"], "error: checkpoint /nonexistent/last.pth.tar does not exist"),
        (["-c", "CONFIG"], "unknown options weight_decy"),
        (["-c", "/nonexistent.yaml"], "error: -c /nonexistent.yaml: no such file"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, extra, message):
    data = image_folder(tmp_path / "d", {"train": {"a": 1}, "val": {"a": 1}})
    (tmp_path / "c.yaml").write_text("weight_decy: 0.1\nepochs: 2\n")
    extra = [str(tmp_path / "c.yaml") if e == "CONFIG" else e for e in extra]
    assert message in tool_error("train", [str(data), *TRAIN_ARGS, *extra, "--output", str(tmp_path / "o")])


# ---- checkpoints ---------------------------------------------------------------------------------
def test_initial_checkpoint_that_fits_nothing_is_refused(tmp_path):
    data = image_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    weights = timm.create_model("elsa_swin_nano", num_classes=2).state_dict()
    for name, state in (("empty.pth", {}), ("prefixed.pth", {f"encoder.{k}": v for k, v in weights.items()})):
        torch.save(state, tmp_path / name)
        args = [str(data), *TRAIN_ARGS, "--epochs", "1", "--output", str(tmp_path / "o")]
        error = tool_error("train", [*args, "--initial-checkpoint", str(tmp_path / name)])
        assert f"{tmp_path / name} holds no weights of elsa_swin_nano" in error


@pytest.mark.slow
def test_initial_checkpoint_of_another_class_count_resets_the_head(tmp_path):
    data = image_folder(tmp_path / "d", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}})
    pretrained = timm.create_model("elsa_swin_nano", num_classes=10)
    torch.save({"state_dict": pretrained.state_dict()}, tmp_path / "p.pth")
    r = run(
        [
            "train.py",
            str(data),
            *TRAIN_ARGS,
            "--epochs",
            "1",
            "-b",
            "2",
            "--lr",
            "0",
            "--warmup-lr",
            "0",
            "--output",
            str(tmp_path / "o"),
            "--experiment",
            "ft",
            "--initial-checkpoint",
            str(tmp_path / "p.pth"),
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "its classifier has 10 classes, the model 2: the classifier (head.fc) starts from scratch" in r.stderr
    tuned = torch.load(tmp_path / "o" / "ft" / "last.pth.tar", weights_only=False)["state_dict"]
    torch.testing.assert_close(tuned["patch_embed.proj.weight"], pretrained.state_dict()["patch_embed.proj.weight"])
    assert tuned["head.fc.weight"].shape == (2, 256)


def test_reusing_a_run_folder_without_resume_is_refused(tmp_path):
    data = image_folder(tmp_path / "d", {"train": {"a": 1}, "val": {"a": 1}})
    run_dir = tmp_path / "o" / "x"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.csv").write_text("epoch\n0\n")
    error = tool_error("train", [str(data), *TRAIN_ARGS, "--output", str(tmp_path / "o"), "--experiment", "x"])
    assert "already holds a run (summary.csv)" in error


# ---- writes -----------------------------------------------------------------------------------------
def test_full_disk_keeps_the_previous_file(tmp_path, monkeypatch, full_disk):
    import os

    from elsa_swin import files

    path = tmp_path / "last.pth.tar"
    files.atomic_torch_save({"epoch": 1}, path)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as any new file, not the temporary file's 0600
    full_disk()
    with pytest.raises(files.NoSpaceError, match=f"no space left on {tmp_path} while writing last.pth.tar"):
        files.atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pth.tar"]


# Kills this training process at the N-th os.replace: right before a file would take its final name.
_KILL_AT_NTH_REPLACE = """
import os, signal, sys
real, calls = os.replace, [0]
def replace(src, dst):
    calls[0] += 1
    if calls[0] == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)
os.replace = replace
from elsa_cls.train import main
main(sys.argv[2:])
"""


@pytest.mark.slow
def test_kills_while_saving_lose_nothing(tmp_path):
    """SIGKILL at several points of the saves, each time resuming: the run still ends with a loadable
    last.pth.tar, one summary row per epoch, and model_best the best epoch of the whole run."""
    data = write_digits(tmp_path / "digits", per_class=6, val_per_class=3)
    out, epochs = tmp_path / "out", 4
    args = [
        str(data),
        *TRAIN_ARGS,
        "-b",
        "8",
        "--epochs",
        str(epochs),
        "--output",
        str(out),
        "--experiment",
        "run",
        "--checkpoint-hist",
        "2",
    ]
    last = out / "run" / "last.pth.tar"
    kills = 0
    for nth in (3, 5, 2, 4, 6, 0):  # 0: no kill, finish the run
        resume = ["--resume", str(last)] if last.exists() else []
        r = subprocess.run(
            [sys.executable, "-c", _KILL_AT_NTH_REPLACE, str(nth), *args, *resume],
            cwd=CLS,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if r.returncode == -signal.SIGKILL:
            kills += 1
            if last.exists():
                torch.load(last, weights_only=False)  # whole after every kill
            continue
        assert r.returncode == 0, r.stderr[-3000:]
        if nth == 0 or torch.load(last, weights_only=False)["epoch"] == epochs - 1:
            break
    assert kills >= 4
    final = torch.load(last, weights_only=False)
    assert final["epoch"] == epochs - 1
    rows = read_summary(out / "run" / "summary.csv")
    assert [int(r["epoch"]) for r in rows] == list(range(epochs))
    top1 = [float(r["eval_top1"]) for r in rows]
    best = torch.load(out / "run" / "model_best.pth.tar", weights_only=False)
    assert best["epoch"] == top1.index(max(top1)) and best["metric"] == max(top1)
    kept = sorted(int(p.name.split("-")[1].split(".")[0]) for p in (out / "run").glob("checkpoint-*.pth.tar"))
    assert len(kept) == 2 and kept == sorted(sorted(range(epochs), key=lambda e: (-top1[e], e))[:2])
    assert not list((out / "run").glob(".*"))  # no temporary file left behind


@pytest.mark.slow
def test_resume_keeps_the_best_epoch_and_the_history(tmp_path):
    """Resumed epochs that are worse (a learning rate that wrecks the model) replace neither model_best
    nor the kept checkpoints, and the summary has one row per epoch."""
    data = write_digits(tmp_path / "digits", per_class=10, val_per_class=4)
    run_dir = tmp_path / "out" / "run"
    args = [
        str(data),
        *TRAIN_ARGS,
        "-b",
        "8",
        "--output",
        str(tmp_path / "out"),
        "--experiment",
        "run",
        "--checkpoint-hist",
        "2",
    ]
    r = run(["train.py", *args, "--epochs", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run(
        [
            "train.py",
            *args,
            "--epochs",
            "4",
            "--resume",
            str(run_dir / "last.pth.tar"),
            "--no-resume-opt",
            "--lr",
            "5",
            "--warmup-lr",
            "5",
            "--min-lr",
            "5",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_summary(run_dir / "summary.csv")
    assert [int(row["epoch"]) for row in rows] == [0, 1, 2, 3]
    top1 = [float(row["eval_top1"]) for row in rows]
    best = torch.load(run_dir / "model_best.pth.tar", weights_only=False)
    assert best["epoch"] == top1.index(max(top1)) and best["metric"] == max(top1)
    kept = sorted(int(p.name.split("-")[1].split(".")[0]) for p in run_dir.glob("checkpoint-*.pth.tar"))
    assert kept == sorted(sorted(range(4), key=lambda e: (-top1[e], e))[:2])
    assert not list(run_dir.glob(".*"))  # no temporary file left behind


# ---- preemption: SIGTERM / SIGUSR1, --resume auto, the same result as an uninterrupted run ----------
_FAKE_SRUN = """#!{python}
# srun for tests: checks its options, starts --ntasks copies of the command here with SLURM's variables,
# forwards SIGTERM/SIGUSR1 to them as srun does, and exits with the highest exit code.
import json, os, signal, subprocess, sys
argv = sys.argv[1:]
opts = []
while argv[0].startswith("-"):
    opt = argv.pop(0)
    opts.append(opt if "=" in opt or opt.startswith("--") else opt + "=" + argv.pop(0))
with open(os.environ["FAKE_SRUN_LOG"], "w") as f:
    json.dump(opts, f)
n = int(dict(o.split("=", 1) for o in opts if "=" in o)["--ntasks"])
procs = [
    subprocess.Popen(argv, env=dict(os.environ, SLURM_PROCID=str(r), SLURM_NTASKS=str(n), SLURM_LOCALID=str(r),
                                    SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="1"))
    for r in range(n)
]
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda s, _: [p.send_signal(s) for p in procs])
sys.exit(max(p.wait() for p in procs))
"""


def _preempt_args(data: Path, out: Path, experiment: str) -> list[str]:
    return [
        str(data),
        *TRAIN_ARGS,
        "-b",
        "4",
        "--epochs",
        "2",
        "--log-interval",
        "1",
        "--model-ema",
        "--model-ema-decay",
        "0.9",
        "--drop-path",
        "0.1",
        "--mixup",
        "0.8",
        "--cutmix",
        "1.0",
        "--reprob",
        "0.25",
        "--output",
        str(out),
        "--experiment",
        experiment,
        "--resume",
        "auto",
        "--device",
        "cpu",
    ]


def _signal_when(cmd: list[str], env: dict, marker: str, sig=signal.SIGTERM) -> tuple[int, str]:
    """Run ``cmd``, send ``sig`` once a log line holds ``marker``; (exit code, log)."""
    proc = subprocess.Popen(cmd, cwd=CLS, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = []
    assert proc.stderr is not None
    for line in proc.stderr:
        log.append(line)
        if marker in line:
            proc.send_signal(sig)
            break
    rest = proc.communicate(timeout=600)[1]
    return proc.returncode, "".join(log) + rest


def _same_run(a: Path, b: Path) -> None:
    assert read_summary(a / "summary.csv") == read_summary(b / "summary.csv")
    sa, sb = (torch.load(d / "last.pth.tar", weights_only=False) for d in (a, b))
    assert sa["epoch"] == sb["epoch"] == 1 and "resume_step" not in sa
    for key in ("state_dict", "state_dict_ema"):
        for name, tensor in sa[key].items():
            assert torch.equal(tensor, sb[key][name]), f"{key}.{name}"


@pytest.mark.slow
def test_signal_saves_and_resume_auto_matches_an_uninterrupted_run(tmp_path):
    """One process: SIGUSR1 (SIGTERM: the next test) in the middle of the first epoch ends the run after its
    step with exit code 75 and a resumable last.pth.tar; --resume auto then ends where a run that was never
    stopped ends, bit for bit (weights, EMA and every summary row), with the LR stepped per update. Resumed
    with another batch size, the stopped epoch starts again from its first step."""
    data = write_digits(tmp_path / "digits", per_class=8, val_per_class=2)
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def args(experiment):
        return [*_preempt_args(data, out, experiment), "--sched-on-updates"]

    r = run(["train.py", *args("straight")])  # --resume auto, nothing there: fresh
    assert r.returncode == 0 and "starting afresh" in r.stderr, r.stderr[-3000:]

    code, log = _signal_when([sys.executable, "train.py", *args("stopped")], env, "Train: 0 [   1/", signal.SIGUSR1)
    assert code == 75, log[-3000:]
    assert "SIGUSR1: stopped after epoch 0 step" in log
    state = torch.load(out / "stopped" / "last.pth.tar", weights_only=False)
    assert state["epoch"] == -1 and state["resume_step"]["epoch"] == 0 and 0 < state["resume_step"]["step"] < 8
    shutil.copytree(out / "stopped", out / "rebatched")
    r = run(["train.py", *args("stopped")])
    assert r.returncode == 0 and "resuming from" in r.stderr, r.stderr[-3000:]
    _same_run(out / "straight", out / "stopped")

    r = run(["train.py", *args("rebatched"), "-b", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 0 starts again from its first step" in r.stderr, r.stderr[-3000:]


@pytest.mark.slow
def test_slurm_train_sh_two_tasks_signal_and_resume(tmp_path):
    """slurm_train.sh hands srun mmdet's options; two tasks started as srun starts them (SLURM_PROCID, ...)
    train with gloo, stop together on SIGTERM forwarded by srun, and resume to the uninterrupted result."""
    data = write_digits(tmp_path / "digits", per_class=8, val_per_class=2)
    out, bin_dir = tmp_path / "out", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(_FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "srun").chmod(0o755)
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        GPUS="2",
        GPUS_PER_NODE="2",
        CPUS_PER_TASK="1",
        SRUN_ARGS="--quotatype=auto --signal=USR1@120",
        FAKE_SRUN_LOG=str(tmp_path / "srun.json"),
        MASTER_PORT=str(29500 + os.getpid() % 1000),
    )

    def slurm(experiment):
        return ["bash", "slurm_train.sh", "part", "elsa", *_preempt_args(data, out, experiment)]

    r = subprocess.run(slurm("straight"), cwd=CLS, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distributed: 2 processes, backend gloo" in r.stderr
    assert json.loads((tmp_path / "srun.json").read_text()) == [
        "-p=part",
        "--job-name=elsa",
        "--gres=gpu:2",
        "--ntasks=2",
        "--ntasks-per-node=2",
        "--cpus-per-task=1",
        "--kill-on-bad-exit=1",
        "--quotatype=auto",
        "--signal=USR1@120",
    ]
    code, log = _signal_when(slurm("stopped"), env, "Train: 1 [   1/")
    assert code == 75, log[-3000:]
    assert "SIGTERM: stopped after epoch 1 step" in log
    r = subprocess.run(slurm("stopped"), cwd=CLS, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _same_run(out / "straight", out / "stopped")


def test_nonfinite_loss_stops_in_one_line_or_is_skipped(tmp_path):
    from elsa_cls.train import main

    data = write_digits(tmp_path / "digits", per_class=4, val_per_class=1)
    blow_up = [str(data), *TRAIN_ARGS, "-b", "4", "--epochs", "1", "--lr", "1e30", "--output", str(tmp_path / "o")]
    error = tool_error("train", blow_up)
    assert error.startswith("error: non-finite loss (") and "at epoch 0 step " in error
    assert "--skip-nonfinite-loss" in error
    assert main([*blow_up, "--skip-nonfinite-loss", "--experiment", "skip"]).name == "skip"
