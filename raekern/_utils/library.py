"""Loading raekern._C and describing what it contains."""
from __future__ import annotations

import importlib
import logging

import torch

log = logging.getLogger("raekern")

_loaded = False


def load_library() -> None:
    """Import raekern._C once; its static initialisers register torch.ops.raekern.*."""
    global _loaded
    if _loaded:
        return
    try:
        importlib.import_module("raekern._C")
    except ImportError as e:  # pragma: no cover - only on a broken install
        raise ImportError(
            "raekern's compiled library raekern._C could not be imported. Build it first: "
            "`pip install --no-build-isolation -e .` (or `make test`). Cause: " + str(e)
        ) from e
    _loaded = True


def build_info() -> dict[str, str]:
    """Facts about the compiled library: CPU ISA, CUDA archs, OpenMP."""
    load_library()
    raw = torch.ops.raekern.build_info()
    return dict(item.split("=", 1) for item in raw.split(";"))


def release_cpu_output_cache() -> int:
    """Give back the blocks raekern keeps for reuse by large CPU outputs (those of 32 MiB and more,
    which glibc would otherwise map fresh, and the kernel zero, on every call); returns the bytes freed.
    The cache holds at most ``RAEKERN_CPU_OUTPUT_CACHE_MB`` (default 1024; 0 turns it off)."""
    load_library()
    return int(torch.ops.raekern.release_cpu_output_cache())


def cpu_output_cache_bytes() -> int:
    """Bytes of freed large CPU outputs that raekern holds for reuse."""
    load_library()
    return int(torch.ops.raekern.cpu_output_cache_bytes())


def registered_ops() -> dict[str, list[str]]:
    """Every raekern op with the dispatch keys (devices) it has kernels for."""
    load_library()
    out: dict[str, list[str]] = {}
    for name in sorted(torch._C._dispatch_get_all_op_names()):
        if not name.startswith("raekern::"):
            continue
        keys = []
        for key in ("CPU", "CUDA", "Meta", "Autograd", "CompositeImplicitAutograd",
                    "CompositeExplicitAutograd"):
            if torch._C._dispatch_has_kernel_for_dispatch_key(name, key):
                keys.append(key)
        out[name[len("raekern::"):]] = keys
    return out


def emulation_library():
    """Load raekern._emu (SIMT CUDA kernels run on the host) if it was built; None otherwise."""
    try:
        importlib.import_module("raekern._emu")
    except ImportError:
        return None
    return torch.ops.raekern_emu


def forbid_double_backward(backward_op: str, public: str) -> None:
    """Give a ``raekern::*_backward`` op an autograd kernel that refuses to be differentiated.

    Without one, autograd only warns and treats the backward's outputs as constants, so a gradient
    of a gradient (a gradient penalty, a Hessian-vector product) would silently come back as zeros.
    """
    def _refuse(ctx, *grads):
        raise RuntimeError(
            f"raekern.{public}: double backward (a gradient of a gradient, e.g. a gradient penalty) is not "
            f"supported by the raekern kernels; compute that term with raekern.ops.{public}_reference")

    torch.library.register_autograd(f"raekern::{backward_op}", _refuse,
                                    setup_context=lambda ctx, inputs, output: None)
