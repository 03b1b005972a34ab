"""Benchmark cases of the models family: whole-model forward and training step, raekern backend against
the same weights on the torch backend (eager and torch.compile).

Target (issue #7, CPU): DiT-DH-S-sized model (body 384×12, head 2048×2), B=8: forward ≥ 1.3× the torch
backend, ≥ 1.0× the torch backend under torch.compile; training step ≥ 1.2× the torch backend.
Quick mode shrinks the model and batch so that a smoke run takes seconds.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from raekern.bench.registry import Case, compiled, register


def dit_flops(model, batch: int) -> int:
    """Useful forward flops of a DiT-DH: every per-token GEMM, the per-sample adaLN GEMMs, and attention
    (4·B·H·N²·Dh per block)."""
    N = model.input_size ** 2
    ds = model.depth[0]
    n_body = N
    if model.version == 2:  # in-context time and class tokens join the body sequence
        n_body = N + model.t_embedder.learnable_tokens.shape[0] + model.ctx_embedder.learnable_tokens.shape[0]
    flops = 0
    for i, b in enumerate(model.blocks):
        n = n_body if i < ds else N
        for m in b.modules():
            if isinstance(m, nn.Linear):
                per_token = not (b.adaln and m is getattr(b, b.mod_name)[1] and i < ds)
                flops += 2 * m.in_features * m.out_features * (batch * n if per_token else batch)
        H, Dh = b.attn.num_heads, b.attn.head_dim
        flops += 4 * batch * H * n * n * Dh
    for lin in [model.s_projector, model.final_layer.linear, getattr(model.final_layer, model.final_layer.mod_name)[1]]:
        if isinstance(lin, nn.Linear):
            flops += 2 * batch * N * lin.in_features * lin.out_features
    C = model.in_channels
    flops += 2 * batch * N * C * (model.hidden_size[0] + model.hidden_size[1])
    return int(flops)


def _dit_cases(name: str, label: str, device: str, batch: int, train: bool, dtype: torch.dtype = torch.float32,
               **overrides) -> list[Case]:
    import raekern.models as M
    from raekern.models.layers import raekern_backend_available
    torch.manual_seed(0)
    model = M.build(name, device=device, backend="torch", **overrides)
    with torch.no_grad():  # non-zero adaLN/output weights so every path does real work
        for n, p in model.named_parameters():
            if p.requires_grad and p.dim() >= 2:
                p.normal_(0, 0.02)
    model = model.to(dtype)
    other = M.build(name, device=device, backend="raekern", **overrides).to(dtype)
    other.load_state_dict(model.state_dict())
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, device=device, dtype=dtype)
    t = torch.rand(batch, device=device, dtype=dtype)
    y = torch.randint(0, 1000, (batch,), device=device)
    shape = f"{label} B={batch}"
    flops = dit_flops(model, batch)
    cases = []

    def fwd(m):
        def run():
            with torch.no_grad():
                return m(x, t, y)
        return run

    impls = {"eager": fwd(model), "compile": fwd(compiled(model))}
    if raekern_backend_available():
        impls["raekern"] = fwd(other)
        impls["raekern+compile"] = fwd(compiled(other))
    cases.append(Case("models", f"{name} forward", shape, dtype, impls, flops=flops, cuda_graph=False,
                      notes="raekern = backend='raekern'; eager/compile = backend='torch' with the same weights"))
    if train:
        from raekern.models.training import velocity_loss, xpred_loss
        loss_fn = velocity_loss if model.version == 1 else xpred_loss
        noise = torch.randn_like(x)
        tt = torch.rand(batch, device=device)

        def step(m):
            def run():
                m.zero_grad(set_to_none=True)
                out = loss_fn(m, x, y, t=tt, noise=noise)
                out["loss"].backward()
                return out["loss"]
            return run

        timpls = {"eager": step(model)}
        if raekern_backend_available():
            timpls["raekern"] = step(other)
        cases.append(Case("models", f"{name} train step", shape, dtype, timpls, flops=3 * flops, cuda_graph=False,
                          baseline_of_interest=("eager",), notes="forward + backward of the flow-matching loss"))
    return cases


@register("models")
def models_cases(device: str, quick: bool) -> list[Case]:
    if quick:
        return _dit_cases("ditdh-s", "DiT-DH-S-shaped, shrunk", device, 2, True,
                          hidden_size=(64, 128), depth=(2, 1), num_heads=(2, 2), in_channels=32, input_size=8)
    # bf16 forward as well: what sampling on an AMX CPU runs (both backends' GEMMs go through oneDNN).
    return (_dit_cases("ditdh-s", "DiT-DH-S (384x12 body, 2048x2 head)", device, 8, True)
            + _dit_cases("ditdh-s", "DiT-DH-S (384x12 body, 2048x2 head)", device, 8, False, torch.bfloat16)
            + _dit_cases("ditdh-tiny-v2", "RAEv2-shaped small", device, 8, False,
                         hidden_size=(384, 1024), depth=(8, 2), num_heads=(6, 8), in_channels=256,
                         input_size=16, base_model_depth=4))
