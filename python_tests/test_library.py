import torch

from raekern._utils.library import build_info, registered_ops


def test_build_info_reports_isa_and_archs():
    info = build_info()
    assert {"cpu_arch", "cpu_isa", "cuda_archs", "openmp"} <= info.keys()
    assert info["openmp"], "CPU kernels must be built with OpenMP or at::parallel_for is serial"


def test_every_op_has_a_cpu_kernel():
    for name, keys in registered_ops().items():
        if name in ("build_info", "attention_cpu_backends"):
            continue
        assert "CPU" in keys or "CompositeImplicitAutograd" in keys, (name, keys)
        if torch.version.cuda is not None and build_info()["cuda_archs"]:
            assert "CUDA" in keys or "CompositeImplicitAutograd" in keys, (name, keys)
