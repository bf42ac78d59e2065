"""ELSA: the enhanced local self-attention operator and layer (Zhou et al., arXiv 2112.12786).

Needs torch only: ``elsa_function`` (the operator), ``elsa_reference`` (its pure-PyTorch definition)
and ``ELSAAttention`` (the layer). The ELSA-Swin models are in the ``elsa_swin`` package.
"""

from importlib import metadata
from pathlib import Path

import torch  # (also loads the libtorch libraries that _C links against)

from ._archs import torch_mismatch

# An installed wheel (no C++ sources beside it) holds a library built against one torch minor, which its
# requirements pin: another torch gets one line instead of a crash or an undefined symbol.
if not (Path(__file__).parent / "csrc").is_dir():
    try:
        _mismatch = torch_mismatch(metadata.requires("elsa-vision") or [], torch.__version__)
    except metadata.PackageNotFoundError:
        _mismatch = None
    if _mismatch is not None:
        raise ImportError(_mismatch)

try:
    from . import _C  # type: ignore[attr-defined]  # noqa: F401  (registers the elsa_op::* operators)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "elsa_op._C, the compiled ELSA operator, is not built or does not match this torch. "
        "Install the project from the repository root with `pip install --no-build-isolation -e .` "
        "(or run `bash run.sh setup`, which sets everything up)."
    ) from e

# The fake kernels, autograd formula and FLOP formulas of the operators: registrations, imported for their
# effect.
from . import _registration, decomposition, flops  # noqa: F401
from .checks import check_elsa_args
from .functional import BACKENDS, elsa_function
from .layers import ELSAAttention
from .reference import elsa_reference

__all__ = ["BACKENDS", "ELSAAttention", "check_elsa_args", "elsa_function", "elsa_reference"]
