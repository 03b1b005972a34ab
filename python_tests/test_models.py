"""raekern.models: released key layouts, backends against each other, encoders against transformers,
checkpoint loading, the autoencoder, and training (CPU, random weights, tiny configurations)."""
import math

import pytest
import torch
import torch.nn.functional as F

import raekern.models as M
from raekern.models import training as T
from raekern.models.layers import raekern_backend_available, rope_2d_tables, sincos_2d

needs_ops = pytest.mark.skipif(not raekern_backend_available(),
                               reason="raekern.ops norm/attention ops not in this build")


@pytest.fixture(autouse=True)
def _one_thread():
    # tiny models: OpenMP fan-out only adds contention on a shared 2-core machine
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def randomize_(model, std=0.2, seed=0):
    """Non-trivial weights everywhere (the released init zeroes the adaLN and output layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".W") or "pos_embed" in name:
                continue
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype)
            is_norm = name.endswith("weight") and p.dim() == 1
            p.copy_(1 + 0.1 * noise if is_norm else std * noise)
    return model


def tiny(name, backend, **kw):
    """Randomised tiny model in eval mode (no label dropout, so backends see the same labels)."""
    return randomize_(M.build(name, backend=backend, **kw)).eval()


def dit_inputs(model, B=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, model.in_channels, model.input_size, model.input_size, generator=g)
    t = torch.rand(B, generator=g)
    y = torch.randint(0, 1001, (B,), generator=g)
    y[0] = 1000
    return x, t, y


# ------------------------------------------------------------------ released key layouts (meta device)

def _expected_v1(Ds, Dx, ds, dx, Hs, Hx, C=768):
    hs, hx = int(2 / 3 * 4 * Ds), int(2 / 3 * 4 * Dx)
    e = {
        "x_embedder.proj.weight": (Dx, C, 1, 1), "x_embedder.proj.bias": (Dx,),
        "s_embedder.proj.weight": (Ds, C, 1, 1), "s_embedder.proj.bias": (Ds,),
        "s_projector.weight": (Dx, Ds), "s_projector.bias": (Dx,),
        "t_embedder.W": (256,), "t_embedder.mlp.0.weight": (Ds, 512), "t_embedder.mlp.0.bias": (Ds,),
        "t_embedder.mlp.2.weight": (Ds, Ds), "t_embedder.mlp.2.bias": (Ds,),
        "y_embedder.embedding_table.weight": (1001, Ds), "pos_embed": (1, 256, Ds),
        "enc_feat_rope.freqs_cos": (256, Ds // Hs), "enc_feat_rope.freqs_sin": (256, Ds // Hs),
        "dec_feat_rope.freqs_cos": (256, Dx // Hx), "dec_feat_rope.freqs_sin": (256, Dx // Hx),
        "final_layer.norm_final.weight": (Dx,), "final_layer.linear.weight": (C, Dx), "final_layer.linear.bias": (C,),
        "final_layer.adaLN_modulation.1.weight": (2 * Dx, Dx), "final_layer.adaLN_modulation.1.bias": (2 * Dx,),
    }
    for i in range(ds + dx):
        D, h = (Ds, hs) if i < ds else (Dx, hx)
        b = f"blocks.{i}."
        e.update({b + "norm1.weight": (D,), b + "norm2.weight": (D,), b + "attn.qkv.weight": (3 * D, D),
                  b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                  b + "mlp.w12.weight": (2 * h, D), b + "mlp.w12.bias": (2 * h,), b + "mlp.w3.weight": (D, h),
                  b + "mlp.w3.bias": (D,), b + "adaLN_modulation.1.weight": (6 * D, D),
                  b + "adaLN_modulation.1.bias": (6 * D,)})
    return e


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_ditdh_xl_keys_match_release():
    m = M.build("ditdh-xl", device="meta")
    assert all(t.is_meta for t in m.state_dict().values())
    got = _shapes(m)
    exp = _expected_v1(1152, 2048, 28, 2, 16, 16)
    assert got == exp
    # spot checks quoted in reference/rae-family.md §1.4
    assert got["blocks.28.attn.qkv.weight"] == (6144, 2048) and got["blocks.29.mlp.w12.weight"] == (10922, 2048)
    assert got["blocks.0.mlp.w3.weight"] == (1152, 3072) and got["blocks.0.adaLN_modulation.1.weight"] == (6912, 1152)
    assert got["blocks.28.adaLN_modulation.1.weight"] == (12288, 2048)
    assert got["final_layer.adaLN_modulation.1.weight"] == (4096, 2048)
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 838.7) < 0.1


def test_ditdh_s_keys_match_release():
    m = M.build("ditdh-s", device="meta")
    assert _shapes(m) == _expected_v1(384, 2048, 12, 2, 6, 16)
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 196.5) < 0.1


def test_ditdh_xl_v2_keys():
    m = M.build("ditdh-xl-v2", device="meta")
    s = _shapes(m)
    assert s["enc_rope.freqs_cos"] == (268, 72) and s["dec_rope.freqs_sin"] == (256, 128)
    assert s["t_embedder.learnable_tokens"] == (4, 1440) and s["ctx_embedder.learnable_tokens"] == (8, 1440)
    assert s["ctx_embedder.embedding_table.weight"] == (1001, 1440)
    for k in ("q", "k", "v", "proj"):
        assert s[f"blocks.0.attn.{k}.weight"] == (1440, 1440)
    assert s["blocks.0.attn.q_norm.weight"] == (72,) and s["blocks.0.attn.k_norm.weight"] == (72,)
    assert s["blocks.0.mlp.w1.weight"] == (3840, 1440) and s["blocks.0.mlp.w3.weight"] == (1440, 3840)
    assert "blocks.0.adaln_modulation.1.weight" not in s
    assert s["blocks.28.adaln_modulation.1.weight"] == (12288, 2048)
    assert s["final_layer.norm.weight"] == (2048,) and s["final_layer.linear.weight"] == (1024, 2048)
    assert s["base_final_layer.adaln_modulation.1.weight"] == (2880, 1440)
    assert s["base_final_layer.linear.weight"] == (1024, 1440)
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 875.2) < 0.1


def test_decoder_vit_xl_keys_match_release():
    s = _shapes(M.build("decoder-vit-xl", device="meta"))
    assert s["decoder_embed.weight"] == (1152, 768) and s["decoder_pos_embed"] == (1, 257, 1152)
    assert s["trainable_cls_token"] == (1, 1, 1152)
    for k in ("query", "key", "value"):
        assert s[f"decoder_layers.27.attention.attention.{k}.weight"] == (1152, 1152)
    assert s["decoder_layers.0.attention.output.dense.weight"] == (1152, 1152)
    assert s["decoder_layers.0.intermediate.dense.weight"] == (4096, 1152)
    assert s["decoder_layers.0.output.dense.weight"] == (1152, 4096)
    assert s["decoder_layers.0.layernorm_before.bias"] == (1152,)
    assert s["decoder_layers.0.layernorm_after.weight"] == (1152,)
    assert s["decoder_norm.weight"] == (1152,) and s["decoder_pred.weight"] == (768, 1152)
    assert s["decoder_pred.bias"] == (768,)
    assert "decoder_layers.28.layernorm_before.weight" not in s
    assert len(s) == 4 + 2 + 2 + 28 * 16


def test_encoder_keys():
    s = _shapes(M.build("dinov2-b-reg", device="meta"))
    assert s["embeddings.position_embeddings"] == (1, 1370, 768) and s["embeddings.register_tokens"] == (1, 4, 768)
    assert s["encoder.layer.11.attention.attention.query.weight"] == (768, 768)
    assert s["encoder.layer.0.layer_scale1.lambda1"] == (768,)
    s3 = _shapes(M.build("dinov3-l16", device="meta"))
    assert s3["storage_tokens"] == (1, 4, 1024) and s3["rope_embed.periods"] == (16,)
    assert s3["blocks.23.attn.qkv.bias_mask"] == (3072,) and s3["blocks.0.ls1.gamma"] == (1024,)


# ------------------------------------------------------------------ fixed tables

def test_rope_tables_match_eva_layout():
    Dh, g = 8, 3
    cos, sin = rope_2d_tables(Dh, g, extra_tokens=2)
    f = [1.0, 1.0 / 10000 ** 0.5]  # theta^(-4k/Dh), k = 0, 1
    for n in range(g * g):
        r, c = divmod(n, g)
        ang = [r * f[0], r * f[0], r * f[1], r * f[1], c * f[0], c * f[0], c * f[1], c * f[1]]
        assert torch.allclose(cos[n], torch.tensor(ang).cos(), atol=1e-6)
        assert torch.allclose(sin[n], torch.tensor(ang).sin(), atol=1e-6)
    assert torch.equal(cos[g * g:], torch.ones(2, Dh)) and torch.equal(sin[g * g:], torch.zeros(2, Dh))


def test_sincos_table_is_mae_layout():
    D, g = 8, 3
    t = sincos_2d(D, g, cls_token=True)
    assert torch.equal(t[0], torch.zeros(D))
    om = [1.0, 1.0 / 100.0]  # 1/10000^(i/(D/4)), i = 0, 1
    r, c = 1, 2
    row = t[1 + r * g + c]
    exp = [math.sin(c * om[0]), math.sin(c * om[1]), math.cos(c * om[0]), math.cos(c * om[1]),
           math.sin(r * om[0]), math.sin(r * om[1]), math.cos(r * om[0]), math.cos(r * om[1])]
    assert torch.allclose(row, torch.tensor(exp), atol=1e-6)


def test_decoder_unpatchify_order():
    d = M.build("decoder-tiny", backend="torch")
    B, g, p = 1, d.grid, d.patch_size
    logits = torch.arange(B * g * g * p * p * 3, dtype=torch.float32).view(B, g * g, p * p * 3)
    img = d.unpatchify(logits)
    i, j, pi, qj, c = 1, 2, 3, 0, 2
    assert img[0, c, i * p + pi, j * p + qj] == logits[0, i * g + j, (pi * p + qj) * 3 + c]


# ------------------------------------------------------------------ raekern backend vs torch backend

def _as_tuple(o):
    return o if isinstance(o, (tuple, list)) else (o,)


def _backends_agree(model, fn, dtype):
    """fp32: raekern backend ≈ torch backend tightly. bf16: each backend's error against the fp64 torch
    backend; raekern's may be at most 2× torch's plus a small floor (DESIGN's accuracy rule)."""
    with torch.no_grad():
        if dtype == torch.float32:
            m = model.float()
            ref = _as_tuple(fn(M.set_backend(m, "torch"), torch.float32))
            out = _as_tuple(fn(M.set_backend(m, "raekern"), torch.float32))
            for a, b in zip(out, ref):
                torch.testing.assert_close(a, b, atol=5e-4, rtol=5e-4)  # fused vs unfused rounding order over depth
            return
        exact = _as_tuple(fn(M.set_backend(model.double(), "torch"), torch.float64))
        m = model.to(dtype)
        ref = _as_tuple(fn(M.set_backend(m, "torch"), dtype))
        out = _as_tuple(fn(M.set_backend(m, "raekern"), dtype))
        for a, b, e in zip(out, ref, exact):
            err_r = (a.double() - e).norm() / e.norm()
            err_t = (b.double() - e).norm() / e.norm()
            assert err_r <= 2 * err_t + 1e-3, (err_r.item(), err_t.item())


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["ditdh-tiny", "ditdh-tiny-v2"])
def test_dit_backends_match(name, dtype):
    m = tiny(name, "torch")
    x, t, y = dit_inputs(m)
    _backends_agree(m, lambda mm, dt: mm(x.to(dt), t.to(dt), y), dtype)


_onednn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                   and hasattr(torch.ops.mkldnn, "_linear_pointwise")), reason="no oneDNN linear")


@_onednn
def test_dense_onednn_matches_linear(monkeypatch):
    from raekern.models import layers as Lr
    monkeypatch.setattr(Lr, "_ONEDNN_FP32", True)
    for bias in (True, False):
        lin = torch.nn.Linear(40, 24, bias=bias)
        for x in (torch.randn(7, 40), torch.randn(2, 5, 40), torch.randn(2, 80, 5)[:, ::2].transpose(1, 2)):
            with torch.no_grad():
                out = Lr.dense(x, lin)
                torch.testing.assert_close(out, lin(x), atol=1e-5, rtol=1e-5)
            # With gradients: oneDNN's products forward and backward, against nn.Linear's.
            xr = x.detach().clone().requires_grad_()
            gy = torch.randn(lin(x).shape)
            Lr.dense(xr, lin).backward(gy)
            got = [xr.grad, lin.weight.grad] + ([lin.bias.grad] if bias else [])
            xr.grad = None
            lin.zero_grad()
            lin(xr).backward(gy)
            want = [xr.grad, lin.weight.grad] + ([lin.bias.grad] if bias else [])
            for a, b in zip(got, want):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            lin.zero_grad()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps nn.Linear's bf16 GEMM
        assert Lr.dense(torch.randn(3, 40), lin).dtype == torch.bfloat16
    with torch.no_grad():  # other dtypes and non-Linear modules pass through unchanged
        xb = torch.randn(3, 40, dtype=torch.bfloat16)
        assert torch.equal(Lr.dense(xb, lin.to(torch.bfloat16)), lin(xb))
        assert torch.equal(Lr.dense(xb, torch.nn.Identity()), xb)


@needs_ops
@_onednn
@pytest.mark.parametrize("name", ["ditdh-tiny", "ditdh-tiny-v2"])
def test_dit_onednn_linears_train_step(name, monkeypatch):
    # A training step's gradients with oneDNN's GEMMs, held to the fp64 torch backend like the forward.
    from raekern.models import layers as Lr
    from raekern.models.training import velocity_loss, xpred_loss
    m = tiny(name, "raekern").eval()
    x, t, y = dit_inputs(m)
    loss_fn = velocity_loss if m.version == 1 else xpred_loss
    noise = torch.randn_like(x)

    def grads(model, dt, onednn):
        monkeypatch.setattr(Lr, "_ONEDNN_FP32", onednn)
        model.zero_grad(set_to_none=True)
        loss_fn(model, x.to(dt), y, t=t.to(dt), noise=noise.to(dt))["loss"].backward()
        return [p.grad.double().clone() for p in model.parameters() if p.grad is not None]

    ref = grads(m, torch.float32, False)
    out = grads(m, torch.float32, True)
    exact = grads(M.set_backend(m.double(), "torch"), torch.float64, False)
    assert len(out) == len(ref) == len(exact)
    # Over the whole gradient vector: single parameters with near-zero gradients are ill-conditioned
    # in fp32 whichever GEMM runs.
    a, b, e = (torch.cat([v.flatten() for v in g]) for g in (out, ref, exact))
    err_o, err_r = (a - e).norm() / e.norm(), (b - e).norm() / e.norm()
    assert err_o <= 3 * err_r + 1e-5, (err_o.item(), err_r.item())


def test_cpu_linear_switch(monkeypatch):
    from raekern.models import layers as Lr
    monkeypatch.setenv("RAEKERN_CPU_LINEAR", "torch")
    assert Lr._onednn_fp32_default() is False
    monkeypatch.setenv("RAEKERN_CPU_LINEAR", "mkl")
    with pytest.raises(ValueError, match="RAEKERN_CPU_LINEAR"):
        Lr._onednn_fp32_default()


@needs_ops
@_onednn
@pytest.mark.parametrize("name", ["ditdh-tiny", "ditdh-tiny-v2"])
def test_dit_onednn_linears_match(name, monkeypatch):
    # Sampling-time calls (no gradient) of the raekern backend with and without oneDNN's GEMM.
    from raekern.models import layers as Lr
    # Their GEMMs round differently (~1e-7 relative), which the tiny random model amplifies over depth:
    # both are held to the fp64 result of the torch backend, as _backends_agree does.
    m = tiny(name, "raekern").eval()  # eval: no label dropout between the calls
    x, t, y = dit_inputs(m)
    with torch.no_grad():
        monkeypatch.setattr(Lr, "_ONEDNN_FP32", False)
        ref = _as_tuple(m(x, t, y))
        monkeypatch.setattr(Lr, "_ONEDNN_FP32", True)
        out = _as_tuple(m(x, t, y))
        exact = _as_tuple(M.set_backend(m.double(), "torch")(x.double(), t.double(), y))
    for a, b, e in zip(out, ref, exact):
        err_o = (a.double() - e).norm() / e.norm()
        err_r = (b.double() - e).norm() / e.norm()
        assert err_o <= 2 * err_r + 1e-6, (err_o.item(), err_r.item())


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["decoder-tiny", "dinov2-tiny-reg", "dinov3-tiny"])
def test_vit_backends_match(name, dtype):
    m = tiny(name, "torch")
    if name == "decoder-tiny":
        inp = torch.randn(2, 16, 16)
        fn = lambda mm, dt: mm(inp.to(dt))  # noqa: E731
    else:
        inp = torch.rand(2, 3, 50, 60)
        fn = lambda mm, dt: mm(inp.to(dt), [0, -1])  # noqa: E731
    _backends_agree(m, fn, dtype)


@needs_ops
@pytest.mark.parametrize("name, depth", [("ditdh-tiny", (0, 2)), ("ditdh-tiny", (2, 0)), ("ditdh-tiny-v2", (0, 2))])
def test_dit_zero_depth_stack_backends_match(name, depth):
    """An empty body or head (ablations) runs on both backends: the raekern runner only applies `final`."""
    kw = dict(depth=depth, base_model_depth=None) if name.endswith("v2") else dict(depth=depth)
    m = tiny(name, "torch", **kw)
    x, t, y = dit_inputs(m)
    _backends_agree(m, lambda mm, dt: mm(x.to(dt), t.to(dt), y), torch.float32)


@needs_ops
@pytest.mark.parametrize("name", ["ditdh-tiny", "ditdh-tiny-v2"])
def test_dit_backends_match_gradients(name):
    m = tiny(name, "torch").double()
    x, t, y = dit_inputs(m, B=2)
    x = x.double()
    grads = []
    for be in ("torch", "raekern"):
        M.set_backend(m, be)
        m.zero_grad()
        out = m(x, t.double(), y)
        sum(o.pow(2).sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        # the torch backend's RoPE tables are fp32 (as the released buffers), so fp64 agrees to ~1e-7
        err = (grads[1][n] - grads[0][n]).norm() / grads[0][n].norm().clamp_min(1e-12)
        assert err < 1e-4, (n, err.item())


@needs_ops
@pytest.mark.parametrize("name", ["ditdh-tiny", "ditdh-tiny-v2", "decoder-tiny", "dinov2-tiny-reg", "dinov3-tiny"])
def test_backends_agree_under_autocast(name):
    """bf16 autocast (RAEv2 trains with it): Linear outputs come out bf16 beside the fp32 residual
    stream; the raekern backend promotes those mixed operands as the torch backend's math does.

    The randomised tiny DiT amplifies bf16 rounding to 5-20 % of its output, so one draw's error
    ratio swings by 2.5x either way (seen on an AVX512-BF16 CPU without AMX); the errors are summed
    over four random models and inputs, which both backends see alike."""
    errs_r, errs_t = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        m = tiny(name, "torch")
        if name.startswith("ditdh"):
            x, t, y = dit_inputs(m, seed=seed + 1)
            fn = lambda mm: mm(x, t, y)  # noqa: E731
        elif name == "decoder-tiny":
            inp = torch.randn(2, 16, 16)
            fn = lambda mm: mm(inp)  # noqa: E731
        else:
            inp = torch.rand(2, 3, 50, 60)
            fn = lambda mm: mm(inp, [0, -1])  # noqa: E731
        with torch.no_grad():
            exact = _as_tuple(fn(M.set_backend(m, "torch")))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                ref = _as_tuple(fn(M.set_backend(m, "torch")))
                out = _as_tuple(fn(M.set_backend(m, "raekern")))
        for a, b, e in zip(out, ref, exact):
            assert a.shape == b.shape
            errs_r.append(((a.double() - e.double()).norm() / e.double().norm()).item())
            errs_t.append(((b.double() - e.double()).norm() / e.double().norm()).item())
    assert sum(errs_r) <= 1.5 * sum(errs_t) + 1e-3 * len(errs_t), (errs_r, errs_t)


@needs_ops
@pytest.mark.parametrize("name", ["rae-tiny", "drorae-tiny"])
def test_rae_backends_agree_under_autocast(name):
    """DRoRAE's experts come out of a batched GEMM in bf16 under autocast while its base (a LayerNorm)
    stays fp32: depth_route promotes them as the torch backend's math does."""
    torch.manual_seed(0)
    ref = randomize_(M.build_rae(name, backend="torch")).eval()
    fast = M.build_rae(name, backend="raekern").eval()
    fast.load_state_dict(ref.state_dict())
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        exact = ref.encode(img)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want, got = ref.encode(img), fast.encode(img)
    err_r = (got.double() - exact.double()).norm() / exact.double().norm()
    err_t = (want.double() - exact.double()).norm() / exact.double().norm()
    assert got.shape == want.shape and err_r <= 2 * err_t + 1e-3, (err_r.item(), err_t.item())


@needs_ops
def test_dit_compile_fullgraph():
    m = tiny("ditdh-tiny-v2", "raekern")
    x, t, y = dit_inputs(m, B=2)
    with torch.no_grad():
        ref = m(x, t, y)
        out = torch.compile(m, fullgraph=True)(x, t, y)
    for a, b in zip(out, ref):  # inductor reorders the torch-side elementwise math: fp32 rounding only
        assert (a - b).norm() / b.norm() < 1e-5


# ------------------------------------------------------------------ encoders against their sources

def test_dinov2_matches_transformers(tmp_path):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                       image_size=70, patch_size=14, layerscale_value=0.5)
    hf = tr.Dinov2WithRegistersModel(cfg).eval()
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    backends = ["torch"] + (["raekern"] if raekern_backend_available() else [])
    px = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True)
        for be in backends:
            enc = M.Dinov2Encoder.from_pretrained(str(tmp_path), input_size=56, backend=be)
            assert not any(p.requires_grad for p in enc.parameters())
            hs = enc.forward_features(px, [0, 1, 2])
            for a, b in zip(hs, ref.hidden_states[1:]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(enc.last_hidden_state(px), ref.last_hidden_state, atol=1e-5, rtol=1e-5)


def test_plain_dinov2_without_registers_loads(tmp_path):
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56, patch_size=14)
    hf = tr.Dinov2Model(cfg).eval()
    randomize_(hf)
    hf.save_pretrained(tmp_path)
    px = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=px, output_hidden_states=True)
        for be in ["torch"] + (["raekern"] if raekern_backend_available() else []):
            enc = M.Dinov2Encoder.from_pretrained(str(tmp_path), input_size=56, backend=be)
            assert enc.num_prefix_tokens == 1 and not hasattr(enc.embeddings, "register_tokens")
            for a, b in zip(enc.forward_features(px, [0, 1]), ref.hidden_states[1:]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _plain_dinov2_folder(path, hidden=16):
    """A fake plain DINOv2 ("model_type": "dinov2", CLS only) Hugging Face folder, rae-tiny sized."""
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.Dinov2Config(hidden_size=hidden, num_hidden_layers=3, num_attention_heads=2, image_size=70,
                          patch_size=14)
    randomize_(tr.Dinov2Model(cfg).eval()).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("backend", ["torch", pytest.param("raekern", marks=needs_ops)])
def test_build_rae_with_plain_dinov2_keeps_every_patch_token(tmp_path, backend):
    """A plain DINOv2 has 1 prefix token, not DINOv2-reg's 5: the fusion must drop exactly that one."""
    rae = M.build_rae("rae-tiny", encoder_path=_plain_dinov2_folder(tmp_path), backend=backend).eval()
    assert rae.encoder.num_prefix_tokens == 1 and rae.fusion.skip_tokens == 1
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        tok = rae.tokens(img)
        assert tok.shape == (2, 16, 16)  # 4x4 patches, none dropped
        ref = _last_layer_fusion(1, 1e-6)(rae.encoder(img, [2]))
        torch.testing.assert_close(tok, ref, atol=1e-5, rtol=1e-5)
        assert rae.decode(rae.encode(img)).shape == (2, 3, 16, 16)
    dro = M.build_rae("drorae-tiny", encoder_path=str(tmp_path), backend=backend)
    assert dro.fusion.skip_tokens == 1


def test_rae_refuses_a_fusion_that_drops_the_wrong_number_of_tokens(tmp_path):
    enc = M.Dinov2Encoder.from_pretrained(_plain_dinov2_folder(tmp_path), input_size=56, backend="torch")
    dec = M.build("decoder-tiny", backend="torch")
    with pytest.raises(ValueError, match="'fusion'.*skip_tokens=5.*num_prefix_tokens=1"):
        M.RAE(enc, M.LayerMeanFusion(None, skip_tokens=5, eps=1e-6, add_last_token_mean=False), dec)
    for fusion in (M.LayerMeanFusion(None, skip_tokens=1, eps=1e-6, add_last_token_mean=False),
                   M.DepthRoutedFusion(16, 1, 32, skip_tokens=1)):
        M.RAE(enc, fusion, dec)  # matching counts are accepted
    with pytest.raises(ValueError, match="'fusion'"):
        M.RAE(M.build("dinov2-tiny-reg"), M.DepthRoutedFusion(16, 1, 32, skip_tokens=1), dec)


def _dinov3_reference(enc, px):
    """DINOv3's forward written from its published description (axial RoPE, base 100, separate-normalised
    coordinates, half-split rotation, prefix unrotated), block by block in plain torch."""
    x = enc.patch_embed.proj(px)
    B, D, h, w = x.shape
    x = torch.cat([enc.cls_token.expand(B, -1, -1), enc.storage_tokens.expand(B, -1, -1),
                   x.flatten(2).transpose(1, 2)], 1)
    H = enc.num_heads
    Dh = D // H
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h * 2 - 1, (torch.arange(w) + 0.5) / w * 2 - 1, indexing="ij")
    per = 100.0 ** (2 * torch.arange(Dh // 4) / (Dh // 2))
    ang = torch.cat([ys.reshape(-1, 1) * 2 * math.pi / per, xs.reshape(-1, 1) * 2 * math.pi / per], 1)
    ang = torch.cat([ang, ang], 1)
    outs = []
    for blk in enc.blocks:
        hN = F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        bias = blk.attn.qkv.bias.clone()
        bias[D:2 * D] = 0
        q, k, v = F.linear(hN, blk.attn.qkv.weight, bias).view(B, -1, 3, H, Dh).permute(2, 0, 3, 1, 4)
        P = enc.num_prefix_tokens

        def rot(t):
            tp, tr_ = t[:, :, :P], t[:, :, P:]
            t1, t2 = tr_.chunk(2, -1)
            return torch.cat([tp, tr_ * ang.cos() + torch.cat([-t2, t1], -1) * ang.sin()], 2)
        o = F.scaled_dot_product_attention(rot(q), rot(k), v).transpose(1, 2).reshape(B, -1, D)
        x = x + blk.ls1.gamma * blk.attn.proj(o)
        x = x + blk.ls2.gamma * blk.mlp(F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps))
        outs.append(x)
    return outs


def test_dinov3_matches_reference():
    enc = tiny("dinov3-tiny", "torch")
    px = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        ref = _dinov3_reference(enc, px)
        got = enc.forward_features(px, [0, 1, 2])
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_encoder_preprocess_and_layers():
    enc = M.build("dinov2-tiny-reg", backend="torch")
    img = torch.rand(1, 3, 64, 64)
    px = enc.preprocess(img)
    assert px.shape == (1, 3, 56, 56)
    ref = F.interpolate(img, size=(56, 56), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(px, (ref - mean) / std)
    hs = enc(img, [-1])
    assert hs[0].shape == (1, 5 + 16, 16) and enc.num_prefix_tokens == 5
    with pytest.raises(ValueError, match="'layers'"):
        enc(img, [7])
    with pytest.raises(ValueError, match="'images'"):
        enc(torch.rand(1, 1, 64, 64))


def test_encoder_bf16():
    enc = tiny("dinov3-tiny", "torch").to(torch.bfloat16)
    out = enc(torch.rand(1, 3, 64, 64), [-1])[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


# ------------------------------------------------------------------ checkpoints

def test_load_plain_ema_and_safetensors(tmp_path):
    src = tiny("ditdh-tiny", "torch")
    x, t, y = dit_inputs(src)
    ref = src(x, t, y)
    torch.save({"ema": src.state_dict(), "opt": {"step": torch.tensor(3)}}, tmp_path / "ema.pt")
    torch.save(src.state_dict(), tmp_path / "plain.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "m.safetensors"))
    for f in ("ema.pt", "plain.pt", "m.safetensors"):
        m = M.load("ditdh-tiny", str(tmp_path / f), backend="torch").eval()  # train mode drops labels at random
        assert not m.pos_embed.requires_grad and not m.t_embedder.W.requires_grad
        torch.testing.assert_close(m(x, t, y), ref, atol=0, rtol=0)


def test_load_gives_the_model_dtype_whatever_the_checkpoint_holds(tmp_path):
    """A bf16 (or mixed) checkpoint loads into an fp32 model by default, as load_state_dict would
    cast; dtype= converts once, straight to the requested dtype."""
    src = tiny("ditdh-tiny", "torch")
    sd = {k: (v.bfloat16() if k.startswith("blocks") else v) for k, v in src.state_dict().items()}
    torch.save(sd, tmp_path / "mixed.pt")
    m = M.load("ditdh-tiny", str(tmp_path / "mixed.pt"), backend="torch")
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    x, t, y = dit_inputs(src)
    assert m(x, t, y).dtype == torch.float32
    m = M.load("ditdh-tiny", str(tmp_path / "mixed.pt"), dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}


def test_load_hf_folder_refuses_overrides_it_cannot_apply(tmp_path):
    """The folder's config.json fixes the architecture; an override of it is an error, not dropped unseen."""
    folder = _plain_dinov2_folder(tmp_path)
    for bad in (dict(depth=2), dict(hidden_size=32, num_register_tokens=4)):
        with pytest.raises(ValueError, match="|".join(bad)) as e:
            M.load("dinov2-tiny-reg", folder, **bad)
        assert folder in str(e.value)
    enc = M.load("dinov2-tiny-reg", folder, input_size=28, backend="torch", dtype=torch.float64)
    assert enc.input_size == 28 and enc.backend == "torch" and enc.depth == 3
    assert enc.embeddings.cls_token.dtype == torch.float64


def test_load_mismatch_names_keys(tmp_path):
    sd = M.build("ditdh-tiny").state_dict()
    sd.pop("blocks.1.attn.qkv.bias")
    sd["blocks.9.extra.weight"] = torch.zeros(1)
    sd["s_projector.weight"] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(M.CheckpointMismatchError) as e:
        M.load("ditdh-tiny", str(tmp_path / "bad.pt"))
    msg = str(e.value)
    assert "blocks.1.attn.qkv.bias" in msg and "blocks.9.extra.weight" in msg and "s_projector.weight" in msg


def test_missing_files_name_the_path(tmp_path):
    p = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        M.load("ditdh-tiny", p)
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.Dinov2Encoder.from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}')
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        M.Dinov2Encoder.from_pretrained(str(tmp_path))


def test_dinov3_loads_released_layout(tmp_path):
    src = tiny("dinov3-tiny", "torch")
    sd = src.state_dict()
    torch.save(sd, tmp_path / "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth")
    m = M.load("dinov3-tiny", str(tmp_path / "dinov3_vitl16_pretrain_lvd1689m-8aa4cbdd.pth"), backend="torch")
    img = torch.rand(1, 3, 64, 64)
    torch.testing.assert_close(m(img)[0], src(img)[0])
    sd = {k: v for k, v in sd.items() if not k.endswith("bias_mask")}
    torch.save(sd, tmp_path / "nomask.pth")
    m = M.load("dinov3-tiny", str(tmp_path / "nomask.pth"), backend="torch")
    torch.testing.assert_close(m(img)[0], src(img)[0])


# ------------------------------------------------------------------ autoencoder

def _last_layer_fusion(prefix, eps):
    return lambda hs: F.layer_norm(hs[-1][:, prefix:], (hs[-1].shape[-1],), eps=eps)


def test_rae_state_dict_with_stats_loads_into_a_fresh_model():
    """Stats set after construction are state_dict entries; a freshly built RAE (no stats yet) takes them."""
    torch.manual_seed(0)
    for name in ("rae-tiny", "drorae-tiny"):
        rae = M.build_rae(name).eval()
        rae.set_stats((torch.randn(16, 4, 4), torch.rand(16, 4, 4) + 0.5))
        fresh = M.build_rae(name).eval()
        fresh.load_state_dict(rae.state_dict())
        img = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            torch.testing.assert_close(fresh.encode(img), rae.encode(img), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["decoder-tiny", "dinov2-tiny-reg", "rae-tiny", "drorae-tiny"])
def test_meta_build_to_empty_then_load_state_dict(name):
    """The usual large-model recipe: build on meta, to_empty, load the weights. The ImageNet mean/std
    buffers are in no checkpoint; loading writes them again instead of leaving uninitialised memory."""
    torch.manual_seed(0)
    rae = name.endswith("rae-tiny")
    make = (lambda **kw: M.build_rae(name, **kw)) if rae else (lambda **kw: M.build(name, **kw))  # noqa: E731
    ref = randomize_(make()).eval()
    m = make(device="meta").to_empty(device="cpu").eval()
    m.load_state_dict(ref.state_dict())
    img = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        if rae:
            torch.testing.assert_close(m.decode(m.encode(img)), ref.decode(ref.encode(img)), rtol=0, atol=0)
        elif name == "decoder-tiny":
            z = torch.randn(1, 16, 16)
            torch.testing.assert_close(m.to_unit(m(z)), ref.to_unit(ref(z)), rtol=0, atol=0)
        else:
            torch.testing.assert_close(m.preprocess(img), ref.preprocess(img), rtol=0, atol=0)


def test_rae_encode_decode_inverse(tmp_path):
    enc = tiny("dinov2-tiny-reg", "torch")
    dec = tiny("decoder-tiny", "torch")
    C, H = 16, 4
    stats = {"mean": torch.randn(C, H, H), "var": torch.rand(C, H, H) + 0.5}
    torch.save(stats, tmp_path / "stat.pt")
    rae = M.RAE(enc, _last_layer_fusion(5, 1e-6), dec, backend="torch")
    rae.load_stats(str(tmp_path / "stat.pt"))
    img = torch.rand(2, 3, 64, 64)
    z = rae.encode(img)
    assert z.shape == (2, C, H, H)
    tok = rae.tokens(img)
    torch.testing.assert_close(rae.denormalize(z), tok, atol=1e-5, rtol=1e-5)
    ref = (tok.transpose(1, 2).reshape(2, C, H, H) - stats["mean"]) / torch.sqrt(stats["var"] + 1e-5)
    torch.testing.assert_close(z, ref)
    out = rae.decode(z)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out, dec.to_unit(dec(tok)), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="'z'"):
        rae.decode(tok)


@pytest.mark.parametrize("backend", ["torch", pytest.param("raekern", marks=needs_ops)])
def test_rae_stats_must_have_the_latent_shape(tmp_path, backend):
    """Mis-shaped statistics would broadcast (torch backend) to a silently wrong latent: refused up front."""
    rae = M.build_rae("rae-tiny", backend=backend).eval()
    assert rae.latent_shape() == (16, 4, 4)
    for shape in ((16, 4, 1), (1, 4, 4), (8, 3, 4), (16, 16)):
        with pytest.raises(ValueError, match=r"'stats'.*\[16, 4, 4\]"):
            rae.set_stats((torch.zeros(shape), torch.ones(shape)))
        with pytest.raises(ValueError, match="'stats'"):
            rae.set_stats({"mean": torch.zeros(shape), "var": torch.ones(shape)})
    assert rae.latent_mean is None  # a refused pair leaves the model as it was
    path = tmp_path / "stat_8x3x4.pt"
    torch.save({"mean": torch.zeros(8, 3, 4), "var": torch.ones(8, 3, 4)}, path)
    with pytest.raises(ValueError, match="stat_8x3x4.pt"):
        rae.load_stats(str(path))
    with pytest.raises(ValueError, match="stat_8x3x4.pt"):
        M.build_rae("rae-tiny", backend=backend, stats_path=str(path))
    fresh = M.build_rae("rae-tiny", backend=backend)  # nor through a state dict carrying them
    sd = {**rae.state_dict(), "latent_mean": torch.zeros(16, 4, 1), "latent_var": torch.ones(16, 4, 1)}
    with pytest.raises(ValueError, match="latent_mean"):
        fresh.load_state_dict(sd)
    rae.set_stats((torch.zeros(16, 4, 4), torch.ones(16, 4, 4)))
    assert rae.encode(torch.rand(1, 3, 64, 64)).shape == (1, 16, 4, 4)


def test_rae_noise_augmentation_flag():
    z = torch.zeros(4000, 16, 16)
    g = torch.Generator().manual_seed(0)
    for dist, mean_sigma in (("uniform", 0.4), ("half_normal", 0.8 * math.sqrt(2 / math.pi))):
        n = M.noise_augment(z, 0.8, dist, generator=g)
        sigma = n.flatten(1).std(1)
        assert abs(sigma.mean().item() - mean_sigma) < 0.03
        if dist == "uniform":  # σ = τ·U(0, 1) never exceeds τ
            assert sigma.max() < 0.8 * 1.25
        else:  # half-normal has a tail past τ
            assert (sigma > 0.8 * 1.25).float().mean() > 0.1
    with pytest.raises(ValueError, match="'dist'"):
        M.noise_augment(z, 0.8, "gauss")
    enc, dec = M.build("dinov2-tiny-reg", backend="torch"), M.build("decoder-tiny", backend="torch")
    rae = M.RAE(enc, _last_layer_fusion(5, 1e-6), dec, noise_tau=0.8, backend="torch")
    img = torch.rand(2, 3, 64, 64)
    assert torch.equal(rae.eval().encode(img), rae.encode(img))
    rae.train()
    assert not enc.training  # frozen encoder stays in eval mode
    assert not torch.equal(rae.encode(img), rae.eval().encode(img))


# ------------------------------------------------------------------ training

def test_shift_and_time_sampling():
    assert abs(T.shift_alpha(256, 768) - 6.928) < 1e-3 and T.shift_alpha(256, 1024) == 8.0
    assert abs(T.shift_alpha(1024, 768) - 13.856) < 1e-3
    t = torch.tensor([0.0, 0.5, 1.0])
    torch.testing.assert_close(T.shift_time(t, 8.0), torch.tensor([0.0, 8 / 9, 1.0]))
    s = T.sample_time(10000, alpha=1.0, generator=torch.Generator().manual_seed(0))
    assert s.max() <= 0.999 and abs(s.median().item() - 0.5) < 0.02


def _train(name, loss_fn, backend, steps=12):
    torch.manual_seed(0)
    m = randomize_(M.build(name, backend=backend), std=0.05)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, m.in_channels, m.input_size, m.input_size, generator=g)
    y = torch.randint(0, 1000, (4,), generator=g)
    t = torch.rand(4, generator=g) * 0.8 + 0.1
    noise = torch.randn(x.shape, generator=g)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for i in range(steps):
        out = loss_fn(m, x, y, t=t, noise=noise)
        opt.zero_grad()
        out["loss"].backward()
        if i == 0:
            missing = [n for n, p in m.named_parameters() if p.requires_grad and p.grad is None]
            assert not missing, missing
        opt.step()
        losses.append(out["loss"].item())
    return losses


@pytest.mark.parametrize("backend", ["torch", pytest.param("raekern", marks=needs_ops)])
def test_training_reduces_loss(backend):
    l1 = _train("ditdh-tiny", T.velocity_loss, backend)
    assert l1[-1] < 0.7 * l1[0]
    l2 = _train("ditdh-tiny-v2", T.xpred_loss, backend)
    assert l2[-1] < 0.7 * l2[0]


def test_xpred_loss_drops_labels_like_raev2_transport():
    """RAEv2 drops labels in the loss (cfg_dropout_prob 0.1, null = num_classes), not in the model; a
    model that drops them itself in training mode is not dropped twice."""
    seen = []

    class Spy(torch.nn.Module):
        num_classes = 10

        def __init__(self, own=0.0):
            super().__init__()
            self.ctx_embedder = torch.nn.Module()
            self.ctx_embedder.dropout_prob = own

        def forward(self, xt, tt, y):
            seen.append(y)
            return xt

    x, y = torch.randn(4000, 1, 1, 1), torch.zeros(4000, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    T.xpred_loss(Spy().train(), x, y, generator=g)
    frac = (seen[-1] == 10).float().mean().item()
    assert 0.08 < frac < 0.12 and set(seen[-1].tolist()) <= {0, 10}
    T.xpred_loss(Spy(own=0.1).train(), x, y, generator=g)
    assert not (seen[-1] == 10).any()  # the model drops them itself
    T.xpred_loss(Spy().train(), x, y, cfg_dropout_prob=0.0, generator=g)
    assert not (seen[-1] == 10).any()


def test_xpred_loss_formula():
    x = torch.randn(2, 3, 2, 2)
    t = torch.tensor([0.01, 0.5])
    noise = torch.randn_like(x)
    full = torch.randn_like(x)
    base = torch.randn_like(x)
    out = T.xpred_loss(lambda xt, tt, y: (full, base), x, None, t=t, noise=noise)
    w = 1 / torch.tensor([0.05, 0.5]) ** 2
    lf = (((full - x) ** 2).flatten(1).mean(1) * w).mean()
    lb = (((base - x) ** 2).flatten(1).mean(1) * w).mean()
    torch.testing.assert_close(out["loss"], lf + lb)
    v = T.velocity_loss(lambda xt, tt, y: full, x, None, t=t, noise=noise)
    torch.testing.assert_close(v["loss"], ((full - (noise - x)) ** 2).mean())


# ------------------------------------------------------------------ argument errors

def test_bad_arguments_name_the_argument():
    m = M.build("ditdh-tiny", backend="torch")
    x, t, y = dit_inputs(m, B=2)
    with pytest.raises(ValueError, match="'x'"):
        m(x[:, :3], t, y)
    with pytest.raises(ValueError, match="'t'"):
        m(x, t[:1], y)
    with pytest.raises(ValueError, match="'y'"):
        m(x, t, y.float())
    with pytest.raises(ValueError, match="'name'"):
        M.build("ditdh-xxl")
    with pytest.raises(ValueError, match="'backend'"):
        M.build("ditdh-tiny", backend="cuda")
    with pytest.raises(ValueError, match="'tokens'"):
        M.build("decoder-tiny")(torch.randn(1, 15, 16))
    with pytest.raises(ValueError, match="'base_model_depth'"):
        M.build("ditdh-tiny-v2", base_model_depth=9)


# ------------------------------------------------------------------ autoencoder on raekern's fusion

@pytest.mark.parametrize("backend", ["torch", pytest.param("raekern", marks=needs_ops)])
def test_raev2_style_fusion_in_rae(backend):
    enc = tiny("dinov3-tiny", backend)
    dec = tiny("decoder-tiny", backend, latent_dim=32)
    fusion = M.LayerMeanFusion(None, skip_tokens=5, eps=1e-5, add_last_token_mean=True)
    rae = M.set_backend(M.RAE(enc, fusion, dec, layers=(0, 2)), backend).eval()
    img = torch.rand(2, 3, 64, 64)
    hs = enc(img, [0, 2])
    ln = [F.layer_norm(h[:, 5:], (32,), eps=1e-5) for h in hs]
    ref = (ln[0] + ln[1]) / 2 + ln[1].mean(1, keepdim=True)
    torch.testing.assert_close(rae.tokens(img), ref, atol=1e-5, rtol=1e-5)
    assert rae.decode(rae.encode(img)).shape == (2, 3, 16, 16)


@needs_ops
def test_rae_backends_match(tmp_path):
    ref = M.build_rae("rae-tiny", backend="torch").eval()
    randomize_(ref.encoder)
    randomize_(ref.decoder)
    C, H = 16, 4
    g = torch.Generator().manual_seed(3)
    torch.save({"mean": torch.randn(C, H, H, generator=g), "var": torch.rand(C, H, H, generator=g) + 0.5},
               tmp_path / "stat.pt")
    ref.load_stats(str(tmp_path / "stat.pt"))
    fast = M.build_rae("rae-tiny", backend="raekern", stats_path=str(tmp_path / "stat.pt")).eval()
    fast.encoder.load_state_dict(ref.encoder.state_dict())
    fast.decoder.load_state_dict(ref.decoder.state_dict())
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        z_ref, z = ref.encode(img), fast.encode(img)
        torch.testing.assert_close(z, z_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.decode(z_ref), ref.decode(z_ref), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fast.denormalize(z), fast.tokens(img), atol=1e-5, rtol=1e-5)


def test_released_guidance_entry_points():
    m = tiny("ditdh-tiny", "torch")
    x, t, y = dit_inputs(m, B=2)
    t = torch.tensor([0.3, 0.3])
    yy = torch.tensor([5, 1000])
    with torch.no_grad():
        xx = torch.cat([x[:1], x[:1]])
        vc, vu = m(xx, t, yy).chunk(2)
        out = m.forward_with_cfg(xx, t, yy, 1.5)
        torch.testing.assert_close(out[:1], vu + 1.5 * (vc - vu))
        off = m.forward_with_cfg(xx, t, yy, 1.5, cfg_interval=(0.5, 1.0))
        torch.testing.assert_close(off[:1], vc)
        weak = tiny("ditdh-tiny", "torch")
        ag = m.forward_with_autoguidance(x, t, y, 1.42, weak)
        torch.testing.assert_close(ag, weak(x, t, y) + 1.42 * (m(x, t, y) - weak(x, t, y)))
        m2 = tiny("ditdh-tiny-v2", "torch")
        f, b = m2(x, torch.tensor([0.05, 0.5]), y)
        ig = m2.forward_with_internal_guidance(x, torch.tensor([0.05, 0.5]), y)
        torch.testing.assert_close(ig[0], f[0])
        torch.testing.assert_close(ig[1], b[1] + 1.78 * (f[1] - b[1]))


def test_drorae_starts_at_rae_latent():
    dro = M.build_rae("drorae-tiny", backend="torch").eval()
    rae = M.build_rae("rae-tiny", backend="torch").eval()
    randomize_(rae.encoder)
    dro.encoder.load_state_dict(rae.encoder.state_dict())
    img = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # γ is zero-initialised: DRoRAE's latent is RAE's until trained
        torch.testing.assert_close(dro.tokens(img), rae.tokens(img), atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in dro.parameters() if p.requires_grad) > 0
    assert not any(p.requires_grad for p in dro.encoder.parameters())


@pytest.mark.parametrize("use_raekern", [False, pytest.param(True, marks=needs_ops)])
def test_drorae_zero_start_holds_only_for_the_tanh_bound(use_raekern):
    """As documented: γ (bound="tanh") starts at zero; "norm_cap" and "none" have no γ and start off the
    RAE latent ("norm_cap" by at most cap·‖base‖ per token)."""
    torch.manual_seed(0)
    hs = [torch.randn(2, 5 + 16, 24) for _ in range(3)]
    base = F.layer_norm(hs[-1][:, 5:], (24,), eps=1e-6)
    with torch.no_grad():
        for bound, cap in (("tanh", None), ("norm_cap", 0.5), ("none", None)):
            f = M.DepthRoutedFusion(24, 3, 32, bound=bound, cap=cap, use_raekern=use_raekern)
            delta = f(hs) - base
            if bound == "tanh":
                assert f.gamma is not None
                torch.testing.assert_close(delta, torch.zeros_like(delta), atol=1e-6, rtol=0)
                continue
            assert f.gamma is None and delta.abs().max() > 1e-3
            if bound == "norm_cap":
                assert (delta.norm(dim=-1) <= cap * base.norm(dim=-1) * (1 + 1e-5)).all()


def test_ditdh_v1_label_table_init_as_released():
    """RAE v1's DiTwDDTHead.initialize_weights draws the label table from N(0, 0.02), as v2 does."""
    torch.manual_seed(0)
    for name, table in (("ditdh-tiny", "y_embedder"), ("ditdh-tiny-v2", "ctx_embedder")):
        w = getattr(M.build(name), table).embedding_table.weight
        assert abs(w.std().item() - 0.02) < 0.002, (name, w.std().item())
