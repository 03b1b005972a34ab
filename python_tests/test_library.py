import torch

from raekern._utils.library import build_info, registered_ops


def test_build_info_reports_isa_and_archs():
    info = build_info()
    assert {"cpu_arch", "cpu_isa", "cuda_archs", "openmp"} <= info.keys()
    assert info["openmp"], "CPU kernels must be built with OpenMP or at::parallel_for is serial"


def test_every_op_has_a_cpu_kernel():
    for name, keys in registered_ops().items():
        if name in ("build_info", "attention_cpu_backends", "attention_cuda_fwd_smem", "release_cpu_output_cache",
                    "cpu_output_cache_bytes", "empty_cpu_output"):
            continue
        assert "CPU" in keys or "CompositeImplicitAutograd" in keys, (name, keys)
        if torch.version.cuda is not None and build_info()["cuda_archs"]:
            assert "CUDA" in keys or "CompositeImplicitAutograd" in keys, (name, keys)


def test_every_op_has_its_reference_in_raekern_ops():
    """The op contract: each public op has a plain-PyTorch ``<name>_reference`` beside it."""
    import raekern.ops as R
    helpers = ("build_info", "attention_cpu_backends", "attention_cuda_fwd_smem", "guidance_combine",
               "release_cpu_output_cache", "cpu_output_cache_bytes", "empty_cpu_output")
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


def test_cpu_stream_threshold_changes_stores_not_results(monkeypatch):
    """RAEKERN_CPU_STREAM_BYTES=0 streams every aligned output past the caches, 2^50 none: the CPU
    kernels' results are bit-identical either way (norm forward and backward, latent_normalize,
    guidance_step, swiglu, the layer gradients of layer_stack_fuse and depth_route in fp32 and bf16)."""
    import raekern.ops as R
    from raekern.ops.guidance import guidance_step

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 32, 64, generator=g, requires_grad=True)
    w = torch.randn(64, generator=g, requires_grad=True)
    sh, sc = torch.randn(2, 1, 64, generator=g), torch.randn(2, 1, 64, generator=g)
    z = torch.randn(2, 64, 32, generator=g)
    mean, var = torch.randn(32, 8, 8, generator=g), torch.rand(32, 8, 8, generator=g) + 0.5
    P = [torch.randn(2, 64, 16, generator=g) for _ in range(3)]
    a, b = torch.randn(64, 96, generator=g), torch.randn(64, 96, generator=g)

    fusion_in = {dt: ([torch.randn(2, 9, 64, generator=g).to(dt).requires_grad_() for _ in range(3)],
                      [torch.randn(2, 8, 64, generator=g).to(dt).requires_grad_() for _ in range(4)],
                      torch.randn(2, 8, 3, generator=g)) for dt in (torch.float32, torch.bfloat16)}

    def fusion_grads(dt):
        layers, (*experts, base), logits = fusion_in[dt]
        y = R.layer_stack_fuse(layers, skip_tokens=1, add_last_token_mean=True)
        r = R.depth_route(experts, logits, base, gamma=torch.full((64,), 0.5, dtype=dt))
        return (*torch.autograd.grad(y, layers, torch.ones_like(y)),
                *torch.autograd.grad(r, (*experts, base), torch.ones_like(r)))

    def run():
        y = R.norm_modulate(x, sh, sc, kind="rms", weight=w)
        gx, gw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
        return (y, gx, gw, R.latent_normalize(z, mean, var),
                guidance_step(P[0], P[1:], 0.5, terms=[(0, 1)], weights=[2.0], base=0).out, R.swiglu(a, b),
                *fusion_grads(torch.float32), *fusion_grads(torch.bfloat16))

    monkeypatch.setenv("RAEKERN_CPU_STREAM_BYTES", "0")
    streamed = run()
    monkeypatch.setenv("RAEKERN_CPU_STREAM_BYTES", str(1 << 50))
    cached = run()
    for s, c in zip(streamed, cached):
        assert torch.equal(s, c)


def _large_guidance_step():
    from raekern.ops import guidance_step
    g = torch.Generator().manual_seed(0)
    x, c, u = (torch.randn(32, 1024, 16, 16, generator=g) for _ in range(3))  # 32 MiB each
    t = torch.full((32,), 0.5)
    return lambda: guidance_step(x, [c, u], t, terms=[(0, 1)], weights=[3.0], base=0, solver="euler",
                                 t_next=t * 0.9).out


def test_large_cpu_outputs_reuse_freed_blocks():
    """Outputs of 32 MiB and more come from raekern's block cache: a freed one is handed to the next
    output of its size (no fresh mapping for the kernel to zero), and stays an ordinary tensor."""
    import raekern
    step = _large_guidance_step()
    raekern.release_cpu_output_cache()
    first = step()
    expect, ptr = first.clone(), first.data_ptr()
    del first
    assert raekern.cpu_output_cache_bytes() >= 32 << 20
    again = step()
    assert again.data_ptr() == ptr and raekern.cpu_output_cache_bytes() == 0
    assert torch.equal(again, expect)
    again.resize_(64, 1024, 16, 16)  # a storage of the cache's allocator grows like any other
    again[32:] = 1.0
    assert torch.equal(again[:32], expect) and bool((again[32:] == 1).all())
    del again
    assert raekern.release_cpu_output_cache() >= 32 << 20 and raekern.cpu_output_cache_bytes() == 0


def test_model_backend_large_linears_write_into_cached_outputs(monkeypatch):
    """The raekern model backend's no-grad CPU Linears with outputs of 32 MiB and more run the same GEMM
    into an output from the cache (a DiT-DH head's adaLN projection); gradients and small outputs take
    nn.Linear itself."""
    import raekern
    import raekern.models.layers as layers
    from raekern.models.layers import dense
    monkeypatch.setattr(layers, "_ONEDNN_FP32", False)  # AMD CPUs' fp32 default: oneDNN's own linear
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        lin = torch.nn.Linear(64, 8192 // (dtype.itemsize // 2)).to(dtype)  # 2048 x 8192 (bf16) / 4096: 32 MiB
        x = torch.randn(8, 256, 64, dtype=dtype)
        raekern.release_cpu_output_cache()
        with torch.no_grad():
            ref, got = lin(x), dense(x, lin)
            torch.testing.assert_close(got, ref, rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
            ptr = got.data_ptr()
            del got
            assert dense(x, lin).data_ptr() == ptr  # the freed output came back from the cache
            lin_nb = torch.nn.Linear(64, lin.out_features, bias=False).to(dtype)
            torch.testing.assert_close(dense(x, lin_nb), lin_nb(x), rtol=1e-6 if dtype == torch.float32 else 1e-2,
                                       atol=1e-6)
        y = dense(x.requires_grad_(), lin)  # recorded for autograd: nn.Linear's own path
        assert y.grad_fn is not None and not type(y.grad_fn).__name__.startswith("_")
    xb, wb, bb = torch.randn(2, 2048, 64), torch.randn(2, 64, 2048), torch.randn(2, 1, 2048)  # 32 MiB out
    with torch.no_grad():
        torch.testing.assert_close(layers.baddbmm_dense(bb, xb, wb), torch.baddbmm(bb, xb, wb), rtol=1e-6, atol=1e-5)
    raekern.release_cpu_output_cache()


def test_large_cpu_output_cache_can_be_turned_off():
    import subprocess
    import sys
    code = ("import torch, raekern; from raekern.ops import guidance_step; x = torch.randn(32, 1024, 16, 16); "
            "t = torch.full((32,), 0.5); o = guidance_step(x, [x, x], t, terms=[(0, 1)], weights=[3.0], base=0).out; "
            "del o; print(raekern.cpu_output_cache_bytes())")
    env = {**__import__("os").environ, "RAEKERN_CPU_OUTPUT_CACHE_MB": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"


def test_every_runtime_switch_is_listed():
    """raekern._utils.switches lists exactly the RAEKERN_* variables the sources read at run time
    (getenv / env_equals in csrc, os.environ in raekern), so `raekern info` and the bench's machine
    facts name every kernel choice a user can change."""
    import re
    from pathlib import Path

    from raekern._utils.switches import SWITCHES
    root = Path(__file__).resolve().parents[1]
    read = set()
    for f in (root / "csrc").rglob("*"):
        if f.suffix in (".h", ".cpp", ".cu", ".cuh"):
            read |= set(re.findall(r'(?:getenv|env_equals)\("(RAEKERN_[A-Z0-9_]+)"', f.read_text()))
    for f in (root / "raekern").rglob("*.py"):
        text = f.read_text()
        read |= set(re.findall(r'os\.environ(?:\.get)?[\(\[]"(RAEKERN_[A-Z0-9_]+)"', text))
        # module constants holding a switch's name (attention's _CUDA_ATTENTION = "RAEKERN_...")
        read |= {n for n in re.findall(r'^_[A-Z_]+ = "(RAEKERN_[A-Z0-9_]+)"', text, re.M)}
    test_only = {"RAEKERN_EMU_STACK_KB", "RAEKERN_BENCH_DEVICE", "RAEKERN_BENCH_QUICK",
                 "RAEKERN_FAULT_RANK", "RAEKERN_FAULT_EXIT_AFTER_SHARDS"}
    assert read - test_only - set(SWITCHES) == set(), "read but not listed"
    assert set(SWITCHES) - read == set(), "listed but never read"


def test_info_prints_the_switches(capsys, monkeypatch):
    import re

    from raekern import cli
    monkeypatch.setenv("RAEKERN_NORM_FORWARD", "block")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "run-time switches" in out
    assert re.search(r"RAEKERN_NORM_FORWARD +=block ", out) and re.search(r"RAEKERN_CPU_STREAM_BYTES +unset ", out)
