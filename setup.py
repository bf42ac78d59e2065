"""Builds `elsa_op._C`, the ELSA operator's C++/CUDA library; the project's metadata is in pyproject.toml.

    pip install --no-build-isolation -e .        # or .[mm] for det/ and seg/
    python setup.py build_ext --inplace          # rebuild only the library, incrementally

The CUDA kernels are built whenever nvcc is found (or FORCE_CUDA=1), with or without a GPU, for the archs
of elsa_op/_archs.py's `arch_list`: TORCH_CUDA_ARCH_LIST when set; else the building machine's GPUs; else, with
no GPU, every arch the installed torch ships plus PTX for the newest. DEBUG=1 builds with -O0 -g.

Every route (`pip install -e .`, `build_ext --inplace`, a wheel) compiles into the same build/ folder, so
each reuses the others' objects: only sources changed since are compiled again.
"""

import filecmp
import glob
import importlib.util
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup


def _set_cuda_home() -> None:
    """torch takes the toolkit root from nvcc's location; where nvcc is a wrapper outside the toolkit
    (here /usr/local/bin/nvcc) that root has no libcudart and linking fails, so find the real one."""
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ or not shutil.which("nvcc"):
        return
    for root in (Path(shutil.which("nvcc")).resolve().parent.parent, Path("/usr/local/cuda")):
        if (root / "bin" / "nvcc").exists() and any((root / "lib64").glob("libcudart.so*")):
            os.environ["CUDA_HOME"] = str(root)
            return


_set_cuda_home()

import torch  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402

ROOT = Path(__file__).resolve().parent
CSRC = Path("elsa_op") / "csrc"

# The arch policy, read from its file: importing the elsa_op package would need the library being built.
_spec = importlib.util.spec_from_file_location("_elsa_archs", ROOT / "elsa_op" / "_archs.py")
assert _spec is not None and _spec.loader is not None
archs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(archs)


def _cuda_include_dirs() -> list[str]:
    """Headers that torch's CUDA headers include but a toolkit-only nvcc install may lack.

    PyPI's torch ships them inside its nvidia-* wheels (nvidia/cu13/include for CUDA 13), installed beside it.
    """
    site = Path(torch.__file__).resolve().parent.parent
    return sorted(str(p) for p in site.glob("nvidia/cu*/include") if p.is_dir())


def _extension():
    debug = os.getenv("DEBUG", "0") == "1"
    use_cuda = os.getenv("FORCE_CUDA", "0") == "1" or CUDA_HOME is not None
    sources = [str(CSRC / "elsa.cpp")] + sorted(glob.glob(str(CSRC / "cpu" / "*.cpp")))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    cxx += ["-std=c++20", "-fdiagnostics-color=always"]
    link = ["-O0", "-g"] if debug else []
    # at::parallel_for is inline and runs serially unless this library is itself built with OpenMP;
    # libgomp then resolves to the copy torch has already loaded.
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    kwargs = dict(
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
        depends=sorted(str(p) for p in CSRC.rglob("*") if p.suffix in (".h", ".cuh")),
    )
    if not use_cuda:
        return CppExtension("elsa_op._C", sources, **kwargs)
    sources += sorted(glob.glob(str(CSRC / "cuda" / "*.cu")))
    # --threads 0: nvcc compiles the archs of one source in parallel, one per core (else one after another).
    nvcc = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["-std=c++20", "--threads", "0"]
    kwargs["extra_compile_args"]["nvcc"] = nvcc
    kwargs["include_dirs"] = _cuda_include_dirs()
    return CUDAExtension("elsa_op._C", sources, **kwargs)


class _BuildExtension(BuildExtension):
    """torch's builder, with one object folder for every route and the CUDA archs of the policy."""

    def finalize_options(self) -> None:
        super().finalize_options()
        # pip's editable and wheel builds would compile in a fresh temporary folder each time.
        self.build_temp = str(ROOT / "build" / f"temp.{self.plat_name}-{sys.implementation.cache_tag}")

    def copy_file(self, infile, outfile, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Into the source tree (`--inplace`): only a library that changed, by renaming a copy, so that a
        process that has the old one loaded keeps it intact."""
        if os.path.exists(outfile) and filecmp.cmp(infile, outfile, shallow=False):
            return outfile, False
        super().copy_file(infile, f"{outfile}.tmp", *args, **kwargs)
        os.replace(f"{outfile}.tmp", outfile)
        return outfile, True

    def build_extensions(self) -> None:
        # torch forces every build, so that ninja decides what to compile; the link is left to the
        # compiler's own rule: only when an object is newer than the library.
        self.compiler.force = False
        for ext in self.extensions:
            # Recorded as "sm_80/compute_90": nvcc splits the value of an option at commas.
            if "nvcc" in ext.extra_compile_args:
                ext.extra_compile_args["nvcc"] += [f'-DELSA_CUDA_ARCHS=\\"{"/".join(_cuda_archs())}\\"']
        super().build_extensions()


def _cuda_archs() -> list[str]:
    """Sets TORCH_CUDA_ARCH_LIST by the policy and returns the archs nvcc builds, which the library records."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    chosen = archs.environment_arch_list(torch, CUDA_HOME)
    if chosen is not None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = chosen
    built = archs.built_archs(_get_cuda_arch_flags())
    print(f"elsa_op._C: CUDA code for {', '.join(built)}", file=sys.stderr)
    return built


setup(ext_modules=[_extension()], cmdclass={"build_ext": _BuildExtension})
