"""Benchmark cases of the attention family (DESIGN §6: GFLOP/s against torch SDPA in the same run).

Shapes (B, H, N, Dh) are the DiT ones from the issue: (4,16,256,72) RAE v1 body, (4,16,256,128) the
DDT head, (1,16,1024,64) a long-sequence case; plus RAEv2's fused variant (QK-norm + 2-D RoPE, N=268)
where the baseline is SDPA preceded by the same norm and RoPE as separate PyTorch ops.
Forward flops 4·B·H·N²·Dh; backward counted as 2.5× forward (FlashAttention's convention). On CUDA
the plain forward is also timed against each SDPA backend pinned on its own (flash, efficient, cuDNN),
since the Dh = 72 target is stated against SDPA's best backend, and against the measured one-m-tile
kernel (RAEKERN_ATTENTION_FWD=rows16, column "rows16_kernel"). With --full a GPU also runs the
FlashAttention-2 anchor shapes (B·N = 16k tokens, H·Dh = 2048: the setup of FA2's published H100
figures, kernel-anchors.md §A.1), whose TFLOP/s the hd64/hd128 target compares with those figures.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raekern.bench.registry import Case, compiled, register, with_env, with_switch
from raekern.ops.attention import _CUDA_ATTENTION
from raekern.ops.attention import _FORCE_CUDA_BACKWARD as _FORCE

SHAPES = ((4, 16, 256, 72), (4, 16, 256, 128), (1, 16, 1024, 64))
FUSED_SHAPES = ((4, 16, 268, 72),)
# FlashAttention-2's published H100 TFLOP/s (fp16, non-causal; kernel-anchors.md §A.1) at these shapes:
# (forward, backward).
# Two of its sequence lengths only: the one GPU check's bench budget is shared by every family.
FA2_ANCHORS = {(16, 32, 1024, 64): (306, 238), (16, 16, 1024, 128): (350, 260)}


def _inputs(B, H, N, D, dtype, device, grad):
    g = torch.Generator(device="cpu").manual_seed(0)
    mk = lambda: torch.randn(B, N, H, D, generator=g).to(device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return mk(), mk(), mk()


def _anchor_note(B, H, N, D, which):
    fig = FA2_ANCHORS.get((B, H, N, D))
    return f"FlashAttention-2 published (H100, fp16): {fig[which]} TFLOP/s" if fig else ""


def _fwd_cases(B, H, N, D, dtype, device, fused):
    from raekern.ops import attention
    from raekern.ops.attention import _rope_tables, qk_rms_norm_reference

    q, k, v = _inputs(B, H, N, D, dtype, device, False)
    kw = {}
    if fused:
        kw = dict(q_norm_weight=torch.ones(D, device=device, dtype=dtype),
                  k_norm_weight=torch.ones(D, device=device, dtype=dtype), rope_grid=(16, 16))
        cos, sin = _rope_tables(N, (16, 16), D, 10000.0, device, dtype)  # cached, as a model's buffers

    def rope(x):
        pairs = x.unflatten(-1, (D // 2, 2))
        return x * cos + torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2) * sin

    def sdpa_math(q, k, v):  # the unfused baseline a DiT runs today (bnhd in, bnhd out)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if fused:
            q = rope(qk_rms_norm_reference(q, kw["q_norm_weight"]))
            k = rope(qk_rms_norm_reference(k, kw["k_norm_weight"]))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    comp = compiled(sdpa_math)
    impls = {
        # Our kernel even where the dispatch would pick SDPA (plain calls on CUDA): the case times it.
        "raekern": lambda: with_env(_CUDA_ATTENTION, "1", lambda: attention(q, k, v, **kw)),
        "sdpa": lambda: sdpa_math(q, k, v),
        "compile": lambda: comp(q, k, v),
    }
    if device == "cuda" and not fused:
        # SDPA's backends one by one: the GPU target is stated against the best of them (a backend
        # that cannot take the shape is reported as an error in its column).
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def pinned(backend):
            def run():
                with sdpa_kernel(backend):
                    return sdpa_math(q, k, v)
            return run
        for label, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION),
                               ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                               ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
            impls[label] = pinned(backend)
    with_switch(impls, device, "rows16_kernel", "RAEKERN_ATTENTION_FWD", "rows16")
    name = "attention+qknorm+rope fwd" if fused else "attention fwd"
    return Case("attention", name, f"B={B} H={H} N={N} Dh={D}", dtype, impls, flops=4 * B * H * N * N * D,
                baseline_of_interest=("sdpa", "compile"), notes=_anchor_note(B, H, N, D, 0))


def _bwd_case(B, H, N, D, dtype, device):
    from raekern.ops import attention

    q, k, v = _inputs(B, H, N, D, dtype, device, True)
    # Training calls on CUDA go to SDPA unless the raekern backward is forced: force it, so this case
    # times our CUDA backward against SDPA's (the path is picked in the forward, recorded by autograd).
    out_r = with_env(_FORCE, "1", lambda: attention(q, k, v))
    out_s = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    go = torch.randn_like(out_r)

    def bwd(out):
        return lambda: torch.autograd.grad(out, (q, k, v), go, retain_graph=True)

    return Case("attention", "attention bwd", f"B={B} H={H} N={N} Dh={D}", dtype,
                {"raekern": bwd(out_r), "sdpa": bwd(out_s)}, flops=int(2.5 * 4 * B * H * N * N * D),
                baseline_of_interest=("sdpa",),
                notes="; ".join(filter(None, ("backward only (graph retained)", _anchor_note(B, H, N, D, 1)))))


@register("attention")
def attention_cases(device: str, quick: bool) -> list[Case]:
    dtypes = (torch.float32, torch.bfloat16) if device == "cpu" else (torch.bfloat16, torch.float16)
    shapes = SHAPES[:1] if quick else SHAPES
    cases = []
    for dtype in dtypes:
        for s in shapes:
            cases.append(_fwd_cases(*s, dtype, device, fused=False))
        for s in FUSED_SHAPES:
            cases.append(_fwd_cases(*s, dtype, device, fused=True))
        for s in shapes:
            cases.append(_bwd_case(*s, dtype, device))
    if device.startswith("cuda") and not quick:
        for dtype in dtypes:
            for s in FA2_ANCHORS:
                cases.append(_fwd_cases(*s, dtype, device, fused=False))
                cases.append(_bwd_case(*s, dtype, device))
    return cases
