"""ELSA: the enhanced local self-attention operator and layer (Zhou et al., arXiv 2112.12786)."""
import torch  # noqa: F401  (loads the libtorch libraries that _C links against)

try:
    from . import _C  # noqa: F401  (registers the elsa_op::* operators)
except ImportError as e:  # pragma: no cover - depends on the build
    raise ImportError(
        "elsa_op._C, the compiled ELSA operator, is not built or does not match this torch. "
        "Build it from the repository root with `python setup.py build_ext --inplace` "
        "(or run `bash run.sh test`, which sets everything up)."
    ) from e

from .checks import check_elsa_args
from .ops import elsa_function
from .reference import elsa_reference

__all__ = ["check_elsa_args", "elsa_function", "elsa_reference"]
