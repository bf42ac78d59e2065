"""Fixtures shared by the test modules, and the skips behind the markers of pyproject.toml: `cuda` tests need a
CUDA GPU, `mm` tests the OpenMMLab stack. Test modules take what they need from here as fixtures: pytest
advises against importing conftest, which it loads in its own way."""

import errno
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "data"

MM_PACKAGES = ("mmengine", "mmcv", "mmdet", "mmseg")


def pytest_collection_modifyitems(config, items):
    """Skips the `cuda` tests without a GPU and the `mm` tests without the OpenMMLab stack, with the reason."""
    marked = {name: [item for item in items if item.get_closest_marker(name)] for name in ("cuda", "mm")}
    if marked["cuda"] and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in marked["cuda"]:
            item.add_marker(skip)
    # find_spec, not import: collection stays fast, and a broken install still fails in the tests themselves.
    missing = [name for name in MM_PACKAGES if marked["mm"] and importlib.util.find_spec(name) is None]
    if missing:
        skip = pytest.mark.skip(reason=f"needs {', '.join(missing)} (the OpenMMLab stack)")
        for item in marked["mm"]:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def inductor_cache(tmp_path_factory):
    """torch.compile's and AOTInductor's compiled code (and the tools' subprocesses', which inherit the
    variable) go to the session's temporary folder, removed with it, not to a cache in /tmp that grows
    with every run. A cache the caller chose is kept."""
    with pytest.MonkeyPatch.context() as patch:
        if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
            patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        yield


@pytest.fixture(autouse=True)
def fresh_visualizers():
    """mmdet's and mmseg's configs name their visualizer "visualizer", and mmengine hands an existing instance of
    that name to the next Runner of the process, with the folder of the run that made it. A tool that a test
    runs in-process would then write into an earlier test's folder, removed when that test passed."""
    yield
    if "mmengine" in sys.modules:
        from mmengine.visualization import Visualizer

        pending = [Visualizer]
        while pending:
            cls = pending.pop()
            cls._instance_dict.clear()
            pending += cls.__subclasses__()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """tests/data: the original implementation's tensors and the published checkpoints' manifests."""
    return DATA


@pytest.fixture
def full_disk(monkeypatch):
    """Call it to make the atomic writes of elsa_swin.files hit a full disk (ENOSPC) after a few bytes;
    undo with monkeypatch.undo()."""
    from elsa_swin import files

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[:10])
            raise OSError(errno.ENOSPC, "No space left on device")

    return lambda: monkeypatch.setattr(files.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
