"""Where the tests run the raw CUDA kernels of a family: on the host emulation (torch.ops.raekern_emu,
every machine that built it) and on a real GPU (torch.ops.raekern with CUDA tensors; skipped without
one, run by benchmarks/gpu_check.sh). One test body checks both: it calls the ops through a namespace
whose calls move tensor arguments to the kernel's device and the results back to the host, so the
comparisons against the fp64 references are the same code for both.

Use in a test module:

    kern = kernel_fixture(emu)            # emu = emulation_library()
    def test_x(kern): out = kern.rms_norm(x, w, eps)
"""
from __future__ import annotations

import pytest
import torch

from conftest import cuda_available

# "gpu" is also how benchmarks/gpu_check.sh finds these cases (a skipped one fails the device run).
KERNELS = ("emu", "gpu")


def to_device(value, device):
    """Tensors (also inside lists and tuples) copied to `device` with their layout (strides, storage
    offset, stride-0 broadcasts, chunk views); everything else as is. Tensor.to would make the
    non-dense ones contiguous, and the GPU would not see the layouts the emulation is tested on."""
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        storage = storage.cuda() if torch.device(device).type == "cuda" else storage.cpu().clone()
        return torch.empty(0, dtype=value.dtype, device=device).set_(
            storage, value.storage_offset(), value.size(), value.stride())
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


class OnDevice:
    """An op namespace whose calls take host tensors, run on `device` and return host tensors."""

    def __init__(self, namespace, device: str):
        self._ns, self.device = namespace, device

    def __getattr__(self, name):
        op = getattr(self._ns, name)

        def call(*args, **kwargs):
            out = op(*to_device(args, self.device), **{k: to_device(v, self.device) for k, v in kwargs.items()})
            return to_device(out, "cpu")

        return call


def kernel_namespace(which: str, emu, op: str | None = None):
    if which == "emu":
        if emu is None or (op is not None and not hasattr(emu, op)):
            pytest.skip("raekern._emu (host emulation of the CUDA kernels) not built")
        return emu
    if not cuda_available():
        pytest.skip("needs a CUDA GPU")
    import raekern  # noqa: F401  (registers torch.ops.raekern)

    return OnDevice(torch.ops.raekern, "cuda")


def kernel_fixture(emu, op: str | None = None):
    """A module-level fixture `kern` parametrized over KERNELS (the emulation's skipped when it lacks `op`)."""

    @pytest.fixture(params=KERNELS)
    def kern(request):
        return kernel_namespace(request.param, emu, op)

    return kern
