import torch

from raekern._utils.library import build_info, registered_ops


def test_build_info_reports_isa_and_archs():
    info = build_info()
    assert {"cpu_arch", "cpu_isa", "cuda_archs", "openmp"} <= info.keys()
    assert info["openmp"], "CPU kernels must be built with OpenMP or at::parallel_for is serial"


def test_every_op_has_a_cpu_kernel():
    for name, keys in registered_ops().items():
        if name in ("build_info", "attention_cpu_backends", "attention_cuda_fwd_smem"):
            continue
        assert "CPU" in keys or "CompositeImplicitAutograd" in keys, (name, keys)
        if torch.version.cuda is not None and build_info()["cuda_archs"]:
            assert "CUDA" in keys or "CompositeImplicitAutograd" in keys, (name, keys)


def test_every_op_has_its_reference_in_raekern_ops():
    """The op contract: each public op has a plain-PyTorch ``<name>_reference`` beside it."""
    import raekern.ops as R
    helpers = ("build_info", "attention_cpu_backends", "attention_cuda_fwd_smem", "guidance_combine")
    public = [n for n in registered_ops() if not n.endswith("_backward") and n not in helpers]
    missing = [n for n in public if not callable(getattr(R, f"{n}_reference", None))]
    assert not missing, missing


def test_bench_arguments_are_checked_before_measuring(capsys):
    import pytest

    from raekern import cli
    for args, what in ((["--dtype", "fp8"], "--dtype"), (["--family", "nope"], "--family"),
                       (["--min-time", "0"], "--min-time")):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--device", "cpu", *args])
        err = capsys.readouterr()
        assert what in err.err and "copy bandwidth" not in err.out
