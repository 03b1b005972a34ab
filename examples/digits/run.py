"""RAE + DiT-DH end to end on scikit-learn's handwritten digits, on raekern ops, on two CPU cores.

    python examples/digits/run.py            # the full run (fixed seeds; ≤ 30 min on 2 cores)
    python examples/digits/run.py --quick    # smoke test of every stage (tiny step counts; ~1 min)

Stages (each stage's result is checkpointed in --work, so a rerun resumes where it stopped):
 1. an independent evaluation CNN (class accuracy and the Fréchet / diversity feature space);
 2. the encoder: a small ViT trained by supervised classification, then frozen;
 3. decoders on (a) the last layer (RAE v1), (b) the RAEv2 layer mean, (c) DRoRAE depth routing
    (phase 1 = decoder (a), phase 2 = routing only through the frozen decoder, phase 3 = both);
 4. latent statistics, the top-64 principal axes of latent (b) (the DiT's latent), GFCG's latent probe,
    and decoder (b) fine-tuned on latents cut to those axes (the decoder that ships with the DiT);
 5. DiT-DH v2 (x-prediction, depth-8 base head) and a weak DiT by flow matching on the principal
    coordinates of latent (b);
 6. sampling with seven guidance settings; accuracy, Fréchet distance, diversity;
 7. results.md, image grids, and (full run) the embedded model raekern/assets/digits/digits.safetensors.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import raekern  # noqa: F401
except ImportError:  # run from a source checkout built in place
    sys.path.insert(0, str(HERE.parents[1]))

import data as D  # noqa: E402
import metrics as M  # noqa: E402
import nets  # noqa: E402

from raekern.models.digits import ASSET, LatentProbe, PrincipalLatent, save_digits_model  # noqa: E402
from raekern.models.rae import noise_augment  # noqa: E402
from raekern.models.training import xpred_loss  # noqa: E402

FULL = dict(eval_steps=400, enc_steps=600, dec_steps=500, dro_p2=200, dro_p3=300, probe_steps=300,
            gen_dec_steps=250, dit_steps=1600, weak_steps=300, batch=64, per_class=20, sample_steps=20)
QUICK = dict(eval_steps=10, enc_steps=10, dec_steps=10, dro_p2=5, dro_p3=5, probe_steps=10, gen_dec_steps=5,
             dit_steps=10, weak_steps=5, batch=32, per_class=2, sample_steps=4)
# Time shift for training and sampling. RAE's rule α = sqrt(C·H·W / 4096) gives 0.5 for this [64, 4, 4]
# latent, which trains mostly near the data; a first run with it learned little above t = 0.5 (the noise
# levels where the class is decided) and sampled unrecognisable digits, so the noise side gets the weight.
SHIFT_ALPHA = 2.0
NOISE_TAU = 0.3  # RAE's decoder noise augmentation, scaled to these unit-variance LN features
# noise augmentation of the decoder that ships with the DiT, in the DiT's (unit-variance) coordinates
GEN_NOISE_TAU = 0.3
DIT_LR = 2e-3  # probes at 8e-4 and 2e-3: the larger rate reached the same loss in ~2.5x fewer steps

GFCG = "w_max=2,kappa=10"
METHODS = [  # (row name, --guidance spec of `raekern sample`)
    ("no guidance", "none"),
    ("CFG 1.5", "cfg:1.5"),
    ("AutoGuidance 1.5", "ag:1.5"),
    ("internal guidance 1.5", "internal:1.5"),
    ("GFCG", f"gfcg:{GFCG}"),
    ("GFCG + CFG 1.5", f"gfcg:{GFCG},mode=cfg3,cfg=1.5"),
    ("GFCG + AutoGuidance 1.5", f"gfcg:{GFCG},mode=autoguidance,ag=1.5"),
]
DEFAULT_GUIDANCE = f"gfcg:{GFCG},mode=autoguidance,ag=1.5"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def batches(n: int, batch: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


def lr_at(step: int, steps: int, base: float, warmup: int = 50) -> float:
    """Linear warm-up then cosine decay to 10 %."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, steps - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * p)))


def train_loop(params, steps: int, lr: float, step_fn, name: str, every: int = 200, wd: float = 0.0):
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=wd)
    t0, run = time.time(), []
    for s in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(s, steps, lr)
        loss = step_fn(s)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        run.append(float(loss.detach()))
        if (s + 1) % every == 0 or s + 1 == steps:
            log(f"{name}: step {s + 1}/{steps} loss {np.mean(run[-every:]):.4f} ({time.time() - t0:.0f}s)")
    return opt


class Stage:
    """A checkpoint file per stage: ``done`` returns the stored state when it exists."""

    def __init__(self, work: Path):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)

    def path(self, name):
        return self.work / f"{name}.pt"

    def done(self, name):
        p = self.path(name)
        return torch.load(p, weights_only=False) if p.exists() else None

    def save(self, name, obj):
        tmp = self.path(name).with_suffix(".tmp")
        torch.save(obj, tmp)
        tmp.replace(self.path(name))


@torch.no_grad()
def evaluate_images(evalnet, images_gray, labels=None, bs=500):
    feats, preds = [], []
    for i in range(0, len(images_gray), bs):
        f = evalnet.features(images_gray[i:i + bs])
        feats.append(f)
        preds.append(evalnet.fc(f).argmax(1))
    feats, preds = torch.cat(feats).numpy(), torch.cat(preds)
    acc = float((preds == labels).float().mean()) if labels is not None else None
    return feats, acc


# -- stages ------------------------------------------------------------------------------------------
def train_evalnet(ds, cfg, st: Stage):
    torch.manual_seed(1)  # before construction: the initial weights come from the global generator
    net = nets.EvalNet()
    saved = st.done("evalnet_v2")
    if saved is not None:
        net.load_state_dict(saved)
        return net.eval()
    gen = torch.Generator().manual_seed(1)
    it = batches(len(ds.train_y), cfg["batch"], gen)

    def step(s):
        idx = next(it)
        return F.cross_entropy(net(D.augment(ds.train_x[idx], gen)), ds.train_y[idx])

    train_loop(net.parameters(), cfg["eval_steps"], 3e-3, step, "eval CNN", every=100)
    net.eval()
    st.save("evalnet_v2", net.state_dict())
    return net


def train_encoder(ds, cfg, st: Stage):
    torch.manual_seed(2)
    model = nets.EncoderClassifier()
    saved = st.done("encoder")
    if saved is None:
        gen = torch.Generator().manual_seed(2)
        it = batches(len(ds.train_y), cfg["batch"], gen)

        def step(s):
            idx = next(it)
            return F.cross_entropy(model(D.to_rgb(D.augment(ds.train_x[idx], gen))), ds.train_y[idx])

        train_loop(model.parameters(), cfg["enc_steps"], 1e-3, step, "encoder ViT", wd=0.05)
        st.save("encoder", model.state_dict())
    else:
        model.load_state_dict(saved)
    model.requires_grad_(False).eval()
    with torch.no_grad():
        acc = float((model(D.to_rgb(ds.test_x)).argmax(1) == ds.test_y).float().mean())
    return model, acc


@torch.no_grad()
def hidden_states(vit, x):
    out = [[] for _ in range(nets.DEPTH)]
    for i in range(0, len(x), 256):
        for l, h in enumerate(vit(D.to_rgb(x[i:i + 256]), list(range(nets.DEPTH)))):
            out[l].append(h)
    return [torch.cat(o) for o in out]


def recon_loss(px, target_gray):
    t = D.to_rgb(target_gray)
    return F.mse_loss(px, t) + F.l1_loss(px, t)


def train_decoder(name, fusion, hs_train, ds, cfg, st: Stage, steps, seed, decoder=None, train_fusion=False,
                  train_decoder=True, tau=None):
    torch.manual_seed(seed)  # before construction, so that a resumed run initialises as a cold one
    dec = decoder if decoder is not None else nets.decoder()
    saved = st.done(name)
    if saved is not None:
        dec.load_state_dict(saved["decoder"])
        fusion.load_state_dict(saved["fusion"])
        return dec.eval(), fusion.eval()
    gen = torch.Generator().manual_seed(seed)
    it = batches(len(ds.train_y), cfg["batch"], gen)
    dec.requires_grad_(train_decoder)
    fusion.requires_grad_(train_fusion)
    dec.train(), fusion.train()

    def step(s):
        idx = next(it)
        z = fusion([h[idx] for h in hs_train])
        z = noise_augment(z, NOISE_TAU if tau is None else tau, generator=gen)
        return recon_loss(dec(z), ds.train_x[idx])

    params = (list(dec.parameters()) if train_decoder else []) + (list(fusion.parameters()) if train_fusion else [])
    train_loop(params, steps, 1e-3 if train_decoder else 2e-3, step, f"decoder {name}")
    dec.eval().requires_grad_(False)
    fusion.eval().requires_grad_(False)
    st.save(name, {"decoder": dec.state_dict(), "fusion": fusion.state_dict()})
    return dec, fusion


@torch.no_grad()
def eval_recon(dec, fusion, hs_test, ds, evalnet, real_feats):
    px = dec(fusion(hs_test)).clamp(0, 1)
    gray = D.to_gray(px)
    feats, acc = evaluate_images(evalnet, gray, ds.test_y)
    return dict(psnr=M.psnr(gray, ds.test_x), fd=M.frechet(feats, real_feats), acc=acc), gray


def train_dit(name, model, z, y, cfg, st: Stage, steps, seed, lr=DIT_LR):
    saved = st.done(name)
    ema = copy.deepcopy(model).requires_grad_(False)
    if saved is not None:
        ema.load_state_dict(saved)
        return ema.eval()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    it = batches(len(y), cfg["batch"], gen)
    alpha = SHIFT_ALPHA
    decay = min(0.999, 1 - 10 / steps)  # the EMA forgets the random initialisation by the end
    model.train()

    def step(s):
        idx = next(it)
        out = xpred_loss(model, z[idx], y[idx], alpha=alpha, generator=gen)
        if s > 0:
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
        return out["loss"]

    train_loop(model.parameters(), steps, lr, step, f"DiT {name}", every=250)
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)
    st.save(name, ema.state_dict())
    return ema.eval()


def grid_image(images_gray: torch.Tensor, nrow: int) -> np.ndarray:
    from raekern.sampling.pipelines import image_grid, to_uint8

    return image_grid(to_uint8(D.to_rgb(images_gray)), nrow=nrow)


def save_png(path: Path, arr: np.ndarray) -> None:
    import matplotlib.image

    path.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(str(path), arr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny step counts: checks every stage in ~1 min")
    ap.add_argument("--work", type=Path, help="checkpoint folder (default examples/digits/work[/quick])")
    ap.add_argument("--out", type=Path, help="results folder (default examples/digits/results[/quick])")
    ap.add_argument("--no-asset", action="store_true", help="do not write raekern/assets/digits/")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every training step count")
    # one thread: on a machine shared with other jobs, OpenMP's spinning makes two threads slower than one
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for k in ("eval_steps", "enc_steps", "dec_steps", "dro_p2", "dro_p3", "probe_steps", "gen_dec_steps",
              "dit_steps", "weak_steps"):
        cfg[k] = max(1, int(cfg[k] * args.scale))
    work = args.work or HERE / ("work/quick" if args.quick else "work")
    out = args.out or HERE / ("results/quick" if args.quick else "results")
    write_asset = not (args.quick or args.no_asset)
    torch.set_num_threads(args.threads)
    st = Stage(work)
    t_start = time.time()
    timings = {}

    # a stage resumed from its checkpoint keeps the time it took when it was trained
    timing_file = work / "timings.json"
    stored = json.loads(timing_file.read_text()) if timing_file.exists() else {}

    def resumed(*names):
        return all(st.path(n).exists() for n in names)

    def lap(name, t0, was_resumed=False):
        took = time.time() - t0
        timings[name] = stored.get(name, took) if was_resumed else took
        timing_file.write_text(json.dumps({**stored, **timings}))
        log(f"{name} done in {took:.0f}s")

    ds = D.load(nets.IMAGE)
    log(f"digits: {len(ds.train_y)} train / {len(ds.test_y)} held-out, {nets.IMAGE}x{nets.IMAGE}; {cfg}")

    # 1. independent judge
    t0 = time.time()
    res = resumed("evalnet_v2")
    evalnet = train_evalnet(ds, cfg, st)
    real_feats, judge_acc = evaluate_images(evalnet, ds.test_x, ds.test_y)
    log(f"eval CNN held-out accuracy {judge_acc:.3f}")
    lap("evaluation CNN", t0, res)

    # 2. encoder
    t0 = time.time()
    res = resumed("encoder")
    enc_model, enc_acc = train_encoder(ds, cfg, st)
    vit = enc_model.vit
    log(f"encoder held-out accuracy {enc_acc:.3f}")
    hs_train, hs_test = hidden_states(vit, ds.train_x), hidden_states(vit, ds.test_x)
    lap("encoder", t0, res)

    # 3. autoencoders
    t0 = time.time()
    res = resumed("dec_rae", "dec_raev2", "dro_p2", "dro_p3", "dec_rae_long")
    recon, recon_imgs = {}, {}
    dec_a, fus_a = train_decoder("dec_rae", nets.LastLayer(), hs_train, ds, cfg, st, cfg["dec_steps"], 10)
    recon["(a) RAE v1: last layer"], recon_imgs["a"] = eval_recon(dec_a, fus_a, hs_test, ds, evalnet, real_feats)
    dec_b, fus_b = train_decoder("dec_raev2", nets.LayerMean(), hs_train, ds, cfg, st, cfg["dec_steps"], 11)
    recon["(b) RAEv2: layer mean"], recon_imgs["b"] = eval_recon(dec_b, fus_b, hs_test, ds, evalnet, real_feats)
    # DRoRAE phase 1 is decoder (a); phase 2 trains only the routing through that frozen decoder
    torch.manual_seed(12)
    dro = nets.DepthRouted()
    dec_c2, dro = train_decoder("dro_p2", dro, hs_train, ds, cfg, st, cfg["dro_p2"], 12,
                                decoder=copy.deepcopy(dec_a), train_fusion=True, train_decoder=False)
    recon["(c) DRoRAE after phase 2"], _ = eval_recon(dec_c2, dro, hs_test, ds, evalnet, real_feats)
    dec_c, dro = train_decoder("dro_p3", dro, hs_train, ds, cfg, st, cfg["dro_p3"], 13,
                               decoder=copy.deepcopy(dec_c2), train_fusion=True, train_decoder=True)
    recon["(c) DRoRAE after phase 3"], recon_imgs["c"] = eval_recon(dec_c, dro, hs_test, ds, evalnet, real_feats)
    # same total decoder updates as DRoRAE phases 1+3, on the last layer: is (c)'s gain only more training?
    dec_a2, _ = train_decoder("dec_rae_long", nets.LastLayer(), hs_train, ds, cfg, st, cfg["dro_p3"], 14,
                              decoder=copy.deepcopy(dec_a))
    recon["(a') RAE v1, decoder trained as long as (c)"], _ = eval_recon(dec_a2, fus_a, hs_test, ds, evalnet,
                                                                       real_feats)
    lap("autoencoders", t0, res)

    # 4. latents (b), statistics, principal axes, GFCG's probe, the decoder that ships with the DiT
    t0 = time.time()
    res = resumed("probe", "dec_gen_pc")
    with torch.no_grad():
        tok_train, tok_test = fus_b(hs_train), fus_b(hs_test)
    C, G = nets.WIDTH, nets.GRID

    def chw(tok):
        return tok.transpose(1, 2).reshape(len(tok), C, G, G)

    mean, var = chw(tok_train).mean(0), chw(tok_train).var(0, unbiased=False)
    z_train = (chw(tok_train) - mean) / torch.sqrt(var + 1e-5)
    z_test = (chw(tok_test) - mean) / torch.sqrt(var + 1e-5)
    torch.manual_seed(3)
    probe = LatentProbe(C)
    saved = st.done("probe")
    if saved is None:
        gen = torch.Generator().manual_seed(3)
        it = batches(len(ds.train_y), cfg["batch"], gen)

        def step(s):
            idx = next(it)
            return F.cross_entropy(probe(z_train[idx]), ds.train_y[idx])

        train_loop(probe.parameters(), cfg["probe_steps"], 1e-2, step, "latent probe")
        st.save("probe", probe.state_dict())
    else:
        probe.load_state_dict(saved)
    probe.eval().requires_grad_(False)
    with torch.no_grad():
        probe_acc = float((probe(z_test).argmax(1) == ds.test_y).float().mean())
    log(f"GFCG latent probe held-out accuracy {probe_acc:.3f}")

    # The DiT's latent: the top-K principal coordinates of z. A first run on z itself (1,024 numbers
    # per digit, which lie near a ~60-dimensional subspace) sampled latents with the right class along
    # the class axes (the probe agreed 97 %) but with noise left in the directions the data never
    # uses; they decoded to blobs (judge accuracy ≈ 0.2). A 400-step probe on 64 coordinates reached
    # judge accuracy 0.9.
    codec = PrincipalLatent.fit(z_train, nets.PCA_K, G)
    p_train, p_test = codec.encode(z_train), codec.encode(z_test)
    kept = 1 - ((codec.decode(p_test) - z_test) ** 2).sum() / ((z_test - codec.center.view(C, G, G)) ** 2).sum()
    log(f"principal latent {tuple(codec.shape)}: keeps {float(kept):.3f} of the held-out latent variance")
    std = torch.sqrt(var + 1e-5)

    def cut(p):  # DiT coordinates -> RAE tokens [B, N, C] (what the shipped decoder sees)
        return (codec.decode(p) * std + mean).flatten(2).transpose(1, 2)

    # the decoder that ships with the DiT: decoder (b) fine-tuned on latents cut to the principal
    # axes, with RAE's noise augmentation applied in the DiT's coordinates (where its errors are)
    dec_gen = copy.deepcopy(dec_b)
    saved = st.done("dec_gen_pc")
    if saved is None:
        torch.manual_seed(15)
        gen = torch.Generator().manual_seed(15)
        it = batches(len(ds.train_y), cfg["batch"], gen)
        dec_gen.requires_grad_(True).train()

        def step(s):
            idx = next(it)
            return recon_loss(dec_gen(cut(noise_augment(p_train[idx], GEN_NOISE_TAU, generator=gen))),
                              ds.train_x[idx])

        train_loop(dec_gen.parameters(), cfg["gen_dec_steps"], 1e-3, step, "decoder (b) on principal latent")
        st.save("dec_gen_pc", dec_gen.state_dict())
    else:
        dec_gen.load_state_dict(saved)
    dec_gen.eval().requires_grad_(False)
    with torch.no_grad():
        for name, d in ((f"(b) cut to its top {nets.PCA_K} principal coordinates, decoder (b)", dec_b),
                        (f"(b) cut to its top {nets.PCA_K} principal coordinates, decoder fine-tuned on them "
                         "(ships with the DiT)", dec_gen)):
            gray = D.to_gray(d(cut(p_test)).clamp(0, 1))
            feats, acc = evaluate_images(evalnet, gray, ds.test_y)
            recon[name] = dict(psnr=M.psnr(gray, ds.test_x), fd=M.frechet(feats, real_feats), acc=acc)
    for k, v in recon.items():
        log(f"{k}: PSNR {v['psnr']:.2f} dB, FD {v['fd']:.3f}, judge accuracy {v['acc']:.3f}")
    lap("latents, probe, shipped decoder", t0, res)

    # 5. diffusion models
    t0 = time.time()
    torch.manual_seed(20)
    dit = train_dit("dit_pc", nets.dit(), p_train, ds.train_y, cfg, st, cfg["dit_steps"], 20)
    lap("DiT-DH", t0, resumed("dit_pc"))
    t0 = time.time()
    torch.manual_seed(21)
    weak = train_dit("weak_pc", nets.weak_dit(), p_train, ds.train_y, cfg, st, cfg["weak_steps"], 21)
    lap("weak DiT", t0, resumed("weak_pc"))

    model_cfg = dict(dit=nets.DIT, weak=nets.WEAK, decoder=nets.DECODER, grid="raev2", alpha=SHIFT_ALPHA,
                     steps=cfg["sample_steps"], guidance=[DEFAULT_GUIDANCE], image_size=nets.IMAGE,
                     trained_by="examples/digits/run.py" + (" --quick" if args.quick else ""))
    model_path = (ASSET if write_asset else work / "digits.safetensors")
    save_digits_model(model_path, model_cfg, dit, weak, dec_gen, probe, mean, var, codec=codec)
    log(f"wrote {model_path} ({model_path.stat().st_size / 1e6:.1f} MB)")

    # 6. sampling: the same pipeline and policies `raekern sample` builds
    from raekern.models.digits import load_digits_model
    from raekern.sampling.policy_spec import build_policy

    t0 = time.time()
    emb = load_digits_model(model_path)  # what ships, fp16-rounded weights included
    pipe = emb.pipeline(steps=cfg["sample_steps"], progress=False)
    labels = torch.arange(10).repeat(cfg["per_class"])
    rows, grids = [], {}
    real_div = M.class_diversity(real_feats, ds.test_y.numpy())
    for name, spec in METHODS:
        t1 = time.time()
        policy = build_policy([spec], classifier=emb.probe, has_weak=True, num_classes=10)
        imgs = []
        for i in range(0, len(labels), 250):
            imgs.append(pipe.with_policy(policy)(labels[i:i + 250], seed=1000 + i))
        gray = D.to_gray(torch.cat(imgs))
        feats, acc = evaluate_images(evalnet, gray, labels)
        rows.append(dict(method=name, spec=spec, acc=acc, fd=M.frechet(feats, real_feats),
                         div=M.class_diversity(feats, labels.numpy()) / real_div,
                         sec=time.time() - t1))
        grids[name] = gray
        log(f"{name}: accuracy {acc:.3f}, FD {rows[-1]['fd']:.3f}, diversity {rows[-1]['div']:.3f} "
            f"({rows[-1]['sec']:.0f}s)")
    lap("sampling", t0)

    # 7. report
    out.mkdir(parents=True, exist_ok=True)
    n_show = min(8, cfg["per_class"])
    for name, gray in grids.items():
        g = gray.view(cfg["per_class"], 10, 1, nets.IMAGE, nets.IMAGE)[:n_show].transpose(0, 1).reshape(-1, 1, nets.IMAGE, nets.IMAGE)
        slug = name.lower().replace(" + ", "_").replace(" ", "_").replace(".", "")
        save_png(out / f"samples_{slug}.png", grid_image(g, n_show))
    k = min(10, len(ds.test_y))
    rec = torch.cat([ds.test_x[:k], recon_imgs["a"][:k], recon_imgs["b"][:k], recon_imgs["c"][:k]])
    save_png(out / "reconstructions.png", grid_image(rec, k))
    summary = dict(threads=args.threads, n_train=len(ds.train_y), n_test=len(ds.test_y), config=cfg, timings=timings, total_seconds=sum(timings.values()), judge_acc=judge_acc,
                   encoder_acc=enc_acc, probe_acc=probe_acc, recon=recon, sampling=rows, real_diversity=real_div)
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    (out / "results.md").write_text(report(summary))
    log(f"total {time.time() - t_start:.0f}s; wrote {out}")
    return 0


def report(s: dict) -> str:
    c = s["config"]
    L = ["# raekern on handwritten digits — results", "",
         f"Produced by `python examples/digits/run.py{'' if c['dit_steps'] > 100 else ' --quick'}` in "
         f"{s['total_seconds'] / 60:.1f} min of stage time (sum over stages; resumed stages count the run "
         f"that trained them) on this machine's CPU "
         f"({s['threads']} thread(s), shared with other jobs), fixed seeds. Data: "
         f"scikit-learn's 1,797 digits, 8×8 upsampled to 32×32, {s['n_train']} train / {s['n_test']} held-out "
         "(stratified).", "",
         f"- independent judge (small CNN on pixels, trained on the train split): held-out accuracy "
         f"{s['judge_acc']:.3f}; its 64-d penultimate features define FD and diversity below",
         f"- encoder (ViT, width 64, 6 blocks, patch 8 → 4×4 tokens; trained supervised, then frozen): held-out "
         f"accuracy {s['encoder_acc']:.3f}",
         f"- GFCG's classifier (linear probe on the token mean of latent (b)): held-out accuracy "
         f"{s['probe_acc']:.3f}", "",
         "## Autoencoders (held-out reconstructions)", "",
         "| latent | PSNR (dB) ↑ | FD to held-out ↓ | judge accuracy ↑ |", "|---|---|---|---|"]
    for k, v in s["recon"].items():
        L.append(f"| {k} | {v['psnr']:.2f} | {v['fd']:.3f} | {v['acc']:.3f} |")
    L += ["", f"Decoder steps: {c['dec_steps']} for (a) and (b); DRoRAE: phase 1 = decoder (a), phase 2 "
          f"{c['dro_p2']} steps (routing only, decoder frozen), phase 3 {c['dro_p3']} steps (both). (a') "
          f"continues decoder (a) for {c['dro_p3']} steps so that it has had as many decoder updates as (c).", "",
          f"The last two rows cut held-out latents (b) to the {nets.PCA_K} principal coordinates the DiT models "
          f"(fitted on the train split), decoded by decoder (b) and by decoder (b) fine-tuned on such latents "
          f"for {c['gen_dec_steps']} steps with noise τ = {GEN_NOISE_TAU} in those coordinates.", "",
          f"## Generation (DiT-DH v2 on the top {nets.PCA_K} principal coordinates of latent (b))", "",
          f"{10 * c['per_class']} samples per method ({c['per_class']} per class), {c['sample_steps']} Euler "
          "steps on the RAEv2 grid. Accuracy: the independent judge's agreement with the requested class. "
          f"FD: Fréchet distance to the {s['n_test']} held-out digits in the judge's feature space. Diversity: mean "
          "within-class pairwise feature distance relative to the held-out digits' (1.0 = as varied as "
          "real data).", "",
          "| guidance | `--guidance` | class accuracy ↑ | FD ↓ | diversity | seconds |", "|---|---|---|---|---|---|"]
    for r in s["sampling"]:
        L.append(f"| {r['method']} | `{r['spec']}` | {r['acc']:.3f} | {r['fd']:.3f} | {r['div']:.3f} | "
                 f"{r['sec']:.1f} |")
    L += ["", f"Training steps: DiT-DH {c['dit_steps']}, weak DiT {c['weak_steps']} (batch {c['batch']}, learning "
          f"rate {DIT_LR}, time shift α = {SHIFT_ALPHA}, EMA). "
          "Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in s["timings"].items()) + ".", ""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
