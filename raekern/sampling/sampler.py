"""The sampling loop: any callable model, any guidance policy, Euler or Heun on a time grid.

    x = sample(model, (B, C, H, W), labels, policy=CFG(1.5), grid=rae_v1_grid(), seed=0)

What it does per step (rectified flow, ``x_t = (1 − t)·x0 + t·ε``, t = 1 noise):
1. Every branch the policy declares (``policy.branches``: which model, which label, which output)
   is evaluated with **one batched call per model**: the distinct labels a model needs are stacked
   along the batch (``[x; x]`` with ``[y; null]`` for CFG) and each branch is a zero-copy row slice
   of the result. A multi-output model (RAEv2's DiT returns ``(x_full, x_base)``) is called once for
   all its outputs.
2. ``policy.step`` runs the fused guidance step (``raekern.ops.guidance_step``) with the solver
   update fused in: for Euler the step returns ``x + (t_next − t)·u_guided`` directly.
   Heun: stage 1 asks for the guided velocity u₁, predicts ``x̃ = x + Δt·u₁``, evaluates the branches
   at (x̃, t_next) and the fused ``heun2`` stage returns ``x + Δt·(u₁ + u₂)/2``. A step that ends at
   t = 0 (or, for x0-predicting models, below ``x0_t_eps``) is taken with Euler, as EDM does.
3. GFCG-style policies (``policy.needs_reference``) get their reference labels from the classifier
   before the batched call: from the previous step's guided x0 (default; all branches stay in one
   call; at step 0 there is none yet and the policy falls back to its host rule), or from this
   step's conditional x0 (the conditional branch is then evaluated first, the others after it).

Models: ``model_fn(x [n,*S], t [n] float32, y [n] int64, **model_kwargs)`` returning a tensor or a
tuple of tensors, each ``[n,*S]``. ``param`` declares what they return: "velocity" (u = ε − x0),
"x0" or "eps" (one string, or a dict by model name: {"main": "x0", "weak": "velocity"}). For x0
models, RAEv2 converts with ``u = (x − x̂)/max(t, 0.05)``; pass ``x0_t_eps=0.05`` for that (the
clamp only matters when a grid evaluates t < 0.05, which the released grids never do).

Determinism: the noise comes from a CPU ``torch.Generator`` seeded from ``seed`` (the same noise on
every device; ``raekern.sampling.seeding`` folds the seed into the 32 bits that generator keeps); the
loop itself draws no random numbers.

CUDA graphs (``cuda_graph=True``, CUDA tensors, fixed shapes): the first call for a given shape runs
one eager pass as warm-up, then captures every step into its own graph (one shared memory pool,
replayed in capture order; step k reads fixed buffer k and copies its result into buffer k+1);
later calls copy noise and labels into the static inputs and replay. The models and the policy must
not synchronise with the host inside a step. The buffer chaining is tested on the CPU with a
stand-in that re-runs each step, and the CUDA capture ran on an H200 (2026-11-30: the 49-step
AutoGuidance case of `raekern bench --family sampling`).
"""
from __future__ import annotations

import inspect
from typing import Callable, Mapping, Sequence

import torch

from raekern.sampling.grids import TimeGrid, make_grid
from raekern.sampling.guidance import in_interval
from raekern.sampling.seeding import fold_seed, noise_generator

PARAMS = ("velocity", "x0", "eps")
SOLVERS = ("euler", "heun")
NULL_LABEL = 1000

ModelFn = Callable[..., "torch.Tensor | tuple[torch.Tensor, ...]"]


def _fail(arg: str, msg: str, exc: type[Exception] = ValueError):
    raise exc(f"raekern.sampling.sample: argument '{arg}' {msg}")


def _policy_or_default(policy):
    if policy is None:
        from raekern.sampling.guidance import NoGuidance

        return NoGuidance()
    return policy


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def to_x0(x: torch.Tensor, pred: torch.Tensor, t: float, param: str) -> torch.Tensor:
    """Convert one model output to the x0 estimate under ``x_t = (1 − t)·x0 + t·ε``."""
    if param == "x0":
        return pred
    if param == "velocity":
        return x - t * pred
    return (x - t * pred) / (1.0 - t)


class Sampler:
    """A reusable sampler (holds CUDA graphs across calls); see the module docstring.

    Args:
        model_fn: the main model (velocity, x0 or eps output, see ``param``).
        policy: a ``raekern.sampling.guidance`` policy (default: no guidance).
        grid: a :class:`TimeGrid` or a name understood by :func:`make_grid` ("rae", "raev2",
            "uniform"; default "rae"). A name is resolved for each call's latent shape [C, H, W], so
            its shift uses α = sqrt(C·H·W / 4096); ``self.grid`` is the grid of the last call.
        param: output parameterization, a string or a dict by model name.
        models: further named models a policy refers to, e.g. ``{"weak": small_dit}`` (AutoGuidance).
        solver: "euler" or "heun".
        null_label: label of the unconditional branch (default: ``policy.null_label`` or 1000).
        x0_t_eps: RAEv2's clamp ``u = (x − x̂)/max(t, x0_t_eps)`` when every branch predicts x0
            (0 = none).
        model_kwargs: extra keyword arguments for every model call.
        model_dtype: cast the network input to this dtype (outputs are cast back to the state dtype).
        cuda_graph: capture each step into a CUDA graph (CUDA only; fixed shapes).
        progress: show a progress bar (tqdm) over the steps.
        skip_inactive: outside the policy's guidance interval the policy returns the conditional
            prediction C, so only C's network call runs (CFG: B rows instead of 2B; AutoGuidance:
            no weak-model call); the other branches are passed as C, which their zero weights ignore.
    """

    def __init__(self, model_fn: ModelFn, policy=None, grid: TimeGrid | str | None = None, *,
                 param: str | Mapping[str, str] = "velocity", models: Mapping[str, ModelFn] | None = None,
                 solver: str = "euler", null_label: int | None = None, x0_t_eps: float = 0.0,
                 model_kwargs: Mapping | None = None, model_dtype: torch.dtype | None = None,
                 cuda_graph: bool = False, progress: bool = True, skip_inactive: bool = True):
        if not callable(model_fn):
            _fail("model_fn", f"must be callable, got {type(model_fn).__name__}", TypeError)
        self.models: dict[str, ModelFn] = {"main": model_fn}
        for name, fn in (models or {}).items():
            if not callable(fn):
                _fail("models", f"entry {name!r} must be callable, got {type(fn).__name__}", TypeError)
            self.models[name] = fn
        self.policy = _policy_or_default(policy)
        # A grid given by name takes α from the latent it integrates (resolved again at each call).
        self._grid_name = "rae" if grid is None else grid if isinstance(grid, str) else None
        if self._grid_name is not None:
            grid = make_grid(self._grid_name)
        if not isinstance(grid, TimeGrid):
            _fail("grid", f"must be a TimeGrid or a grid name, got {type(grid).__name__}", TypeError)
        self.grid = grid
        if solver not in SOLVERS:
            _fail("solver", f"must be one of {list(SOLVERS)}, got {solver!r}")
        self.solver = solver
        if isinstance(param, str):
            param = {name: param for name in self.models}
        self.param = dict(param)
        for name, p in self.param.items():
            if p not in PARAMS:
                _fail("param", f"must be one of {list(PARAMS)} (for model {name!r}), got {p!r}")
        self.null_label = null_label if null_label is not None else getattr(self.policy, "null_label", NULL_LABEL)
        if x0_t_eps < 0:
            _fail("x0_t_eps", f"must be >= 0, got {x0_t_eps}")
        self.x0_t_eps = float(x0_t_eps)
        self.model_kwargs = dict(model_kwargs or {})
        self.model_dtype = model_dtype
        self.cuda_graph = cuda_graph
        self.progress = progress
        self.skip_inactive = bool(skip_inactive)
        self._plan()
        self._step_accepts_return_x0 = "return_x0" in inspect.signature(self.policy.step).parameters
        self._graphs: dict = {}
        self._graph_api = None  # tests substitute _RerunGraphs to run the graph path on the CPU

    # -- branch plan -----------------------------------------------------------------------------
    def _plan(self) -> None:
        """Which (model, label) evaluations a step needs, in call order, and where each branch is."""
        branches = tuple(self.policy.branches)
        if not branches:
            _fail("policy", "declares no branches")
        self.branches = branches
        self.calls: dict[str, list[str]] = {}  # model -> distinct label kinds, stacked in this order
        for b in branches:
            if b.model not in self.models:
                _fail("models", f"has no model {b.model!r}, which the policy's branch {b} needs "
                      f"(pass models={{{b.model!r}: fn}})")
            if b.model not in self.param:
                _fail("param", f"has no entry for model {b.model!r}")
            if b.label not in ("cond", "null", "ref"):
                _fail("policy", f"branch {b} has an unknown label kind {b.label!r}")
            labels = self.calls.setdefault(b.model, [])
            if b.label not in labels:
                labels.append(b.label)
        self.branch_param = [self.param[b.model] for b in branches]
        uniform = len(set(self.branch_param)) == 1
        self.step_param = self.branch_param[0] if uniform else list(self.branch_param)
        # One [K*B] tensor when the branches are exactly the rows of one output of one call.
        self.single_output = (
            len(self.calls) == 1 and len({b.output for b in branches}) == 1
            and [b.label for b in branches] == self.calls[branches[0].model]
        )
        self.needs_reference = bool(getattr(self.policy, "needs_reference", False))
        # Policies return exactly branch 0 (C) outside their interval. Not skippable: internal
        # guidance combined with CFG (its interval gates only the internal part) and APG momentum
        # (the buffer would see the skipped branches).
        from raekern.sampling.guidance import APG, InternalGuidance

        inner = getattr(self.policy, "inner", self.policy)
        interval = getattr(self.policy, "interval", None)
        unsafe = ((isinstance(inner, InternalGuidance) and inner.cfg_scale is not None)
                  or (isinstance(inner, APG) and inner.beta != 0.0))
        self.skippable_interval = interval if (self.skip_inactive and interval is not None and not unsafe) else None
        self.cond_branch = next((b for b in branches if b.label == "cond" and b.model == "main"), None)
        if self.needs_reference and self.cond_branch is None:
            _fail("policy", "needs a reference class but has no conditional branch of the main model")

    # -- one network evaluation of every branch --------------------------------------------------
    def _call(self, name: str, x: torch.Tensor, t: float, ys: list[torch.Tensor | None]):
        n = len(ys)
        xin = x if n == 1 else torch.cat([x] * n)
        if self.model_dtype is not None and xin.dtype != self.model_dtype:
            xin = xin.to(self.model_dtype)
        tin = torch.full((xin.shape[0],), t, dtype=torch.float32, device=x.device)
        if ys[0] is None:
            out = self.models[name](xin, tin, **self.model_kwargs)
        else:
            yin = ys[0] if n == 1 else torch.cat(ys)
            out = self.models[name](xin, tin, yin, **self.model_kwargs)
        outs = tuple(out) if isinstance(out, (tuple, list)) else (out,)
        if outs[0].dtype != x.dtype:
            outs = tuple(o.to(x.dtype) for o in outs)
        return outs

    def _inactive(self, t: float) -> bool:
        # Decided exactly as the policy's mask decides it (float32), or skipping would change results.
        iv = self.skippable_interval
        return iv is not None and not in_interval(t, iv)

    def _evaluate(self, x, t, labels: dict[str, torch.Tensor | None], cache: dict):
        """Fill ``cache[(model, label)] = (outputs tuple, row slot)``; one call per model."""
        B = x.shape[0]
        if self._inactive(t):
            b0 = self.branches[0]
            if (b0.model, b0.label) not in cache:
                self._evaluate_only(x, t, labels, cache, b0.model, b0.label)
            c = cache[(b0.model, b0.label)][0][b0.output]
            return [c] * len(self.branches)
        for name, kinds in self.calls.items():
            todo = [k for k in kinds if (name, k) not in cache]
            if not todo:
                continue
            outs = self._call(name, x, t, [labels[k] for k in todo])
            for slot, k in enumerate(todo):
                cache[(name, k)] = (outs, slot, len(todo))
        if self.single_output:
            b0 = self.branches[0]
            outs, slot, n = cache[(b0.model, b0.label)]
            if n == len(self.branches):
                return outs[b0.output]
        res = []
        for b in self.branches:
            outs, slot, n = cache[(b.model, b.label)]
            if b.output >= len(outs):
                _fail("model_fn", f"model {b.model!r} returned {len(outs)} output(s) but the policy "
                      f"uses output {b.output}")
            o = outs[b.output]
            res.append(o if n == 1 else o[slot * B:(slot + 1) * B])
        return res

    # -- policy step -----------------------------------------------------------------------------
    def _policy_step(self, x, outputs, t, k, state, **kw):
        if self._step_accepts_return_x0 and self.needs_reference:
            kw["return_x0"] = True
        return self.policy.step(x, outputs, t, param=self.step_param, step_index=k,
                                num_steps=self.grid.num_steps, state=state, **kw)

    def _x0_clamped(self, t: float) -> bool:
        # Only exact when every branch is an x0 prediction (then the clamp scales the guided u).
        return self.x0_t_eps > 0 and t < self.x0_t_eps and all(p == "x0" for p in self.branch_param)

    def _step(self, k: int, x: torch.Tensor, labels: torch.Tensor | None, x0_prev, state: dict):
        """One solver step k: returns (x_next, guided x0 estimate or None)."""
        ts = self.grid.times()
        t, tn = ts[k], ts[k + 1]
        lab = {"cond": labels, "null": None, "ref": None}
        if labels is not None:
            lab["null"] = torch.full_like(labels, self.null_label)
        cache: dict = {}
        heun = self.solver == "heun" and tn > 0 and not self._x0_clamped(tn)
        if self.needs_reference:
            if not self.policy.reference_from_previous_step:
                cb = self.cond_branch
                self._evaluate_only(x, t, lab, cache, cb.model, cb.label)
                outs, slot, _ = cache[(cb.model, cb.label)]
                x0_prev = to_x0(x, outs[cb.output], t, self.param[cb.model])
            # Step 0 of the previous-step variant has no x0 yet: select_reference(None, …) gives
            # r = y with weight 0, i.e. the plain host rule for that step.
            # The reference chosen here serves both Heun stages, so it is chosen whenever either
            # stage is inside the interval. A step wholly outside runs no classifier:
            # select_reference(None, …) gives r = y and zero weights for this batch, so no weight of
            # an earlier step, call or batch size can leak into it.
            outside = self._inactive(t) and (not heun or self._inactive(tn))
            lab["ref"], _ = self.policy.select_reference(None if outside else x0_prev, labels)
        outputs = self._evaluate(x, t, lab, cache)

        if not heun:
            # RAEv2's x0 clamp u = (x − x̂)/max(t, eps) equals an Euler step with a shortened dt.
            tn_eff = tn if not self._x0_clamped(t) else t + (tn - t) * t / self.x0_t_eps
            res = self._policy_step(x, outputs, t, k, state, solver="euler", t_next=tn_eff)
            x0 = res.x0
            if x0 is None and self.needs_reference:
                x0 = x - t * (res.out - x) / (tn_eff - t)
            return res.out, x0
        r1 = self._policy_step(x, outputs, t, k, state, solver="none")
        u1 = r1.out
        if self._x0_clamped(t):
            u1 = u1 * (t / self.x0_t_eps)
        x_pred = x + (tn - t) * u1
        # The reference chosen at the start of the step serves both Heun stages.
        outputs2 = self._evaluate(x_pred, tn, lab, {})
        r2 = self._policy_step(x_pred, outputs2, tn, k, state, solver="heun2", t_next=t,
                               x_prev=x, u_prev=u1)
        x0 = r1.x0 if r1.x0 is not None else (x - t * u1 if self.needs_reference else None)
        return r2.out, x0

    def _evaluate_only(self, x, t, lab, cache, model, kind):
        outs = self._call(model, x, t, [lab[kind]])
        cache[(model, kind)] = (outs, 0, 1)

    # -- public ----------------------------------------------------------------------------------
    def __call__(self, noise: torch.Tensor, labels: torch.Tensor | None = None, *,
                 callback: Callable | None = None) -> torch.Tensor:
        """Integrate from ``noise`` (the state at t = 1) along the grid; returns the final state."""
        labels = self._check_inputs(noise, labels, "noise")
        if noise.shape[0] == 0:  # nothing to integrate (stacked branches cannot be split at B = 0)
            return noise.clone()
        self._resolve_grid(noise)
        if self.cuda_graph and (noise.is_cuda or self._graph_api is not None):
            return self._run_graphed(noise, labels, callback)
        return self._run_eager(noise, labels, callback)

    def _check_inputs(self, x, labels, name: str):
        """The state and labels of a call (``__call__`` and ``step`` alike); returns int64 labels on
        the state's device."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            _fail(name, f"must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}", TypeError)
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int64, torch.int32):
                _fail("labels", "must be an int64 tensor [B]", TypeError)
            if labels.shape != (x.shape[0],):
                _fail("labels", f"must have shape [{x.shape[0]}] (one per sample), got {tuple(labels.shape)}")
            if labels.device != x.device:
                labels = labels.to(x.device)
            labels = labels.long()
        if labels is None and any(b.label != "cond" for b in self.branches):
            _fail("labels", "are required by a policy with null or reference branches")
        return labels

    @torch.no_grad()
    def step(self, x: torch.Tensor, labels: torch.Tensor | None, k: int, state: dict | None = None,
             x0_prev: torch.Tensor | None = None, *, return_x0: bool = False):
        """Solver step ``k`` alone (grid points k → k+1) from state ``x``; for benchmarks and for
        callers that drive the loop themselves. ``state`` carries APG momentum between steps.

        GFCG takes its reference class from the previous step's guided x0: call with
        ``return_x0=True`` to get ``(x_next, x0)`` and pass that x0 as ``x0_prev`` to step k+1
        (step 0 has none), exactly as :meth:`__call__` does."""
        labels = self._check_inputs(x, labels, "x")
        self._resolve_grid(x)
        x_next, x0 = self._step(k, x, labels, x0_prev, {} if state is None else state)
        return (x_next, x0) if return_x0 else x_next

    def _resolve_grid(self, x: torch.Tensor) -> None:
        if self._grid_name is not None:
            self.grid = make_grid(self._grid_name, latent_shape=tuple(x.shape[1:]) or (1,))

    @torch.no_grad()
    def _run_eager(self, x, labels, callback):
        x = x.clone()
        state: dict = {}
        x0 = None
        K = self.grid.num_steps
        bar = _progress(K, self.progress, "sampling")
        try:
            for k in range(K):
                x, x0 = self._step(k, x, labels, x0, state)
                if callback is not None:
                    callback(k, self.grid.times()[k + 1], x, x0)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return x

    @torch.no_grad()
    def _run_graphed(self, x, labels, callback):
        key = (tuple(x.shape), x.dtype, x.device, labels is None)
        g = self._graphs.get(key)
        if g is None:
            g = self._capture(x, labels)
            self._graphs[key] = g
        g["x"].copy_(x)
        if labels is not None:
            g["labels"].copy_(labels)
        bar = _progress(len(g["replays"]), self.progress, "sampling (graphs)")
        for k, replay in enumerate(g["replays"]):
            replay()
            if callback is not None:
                callback(k, self.grid.times()[k + 1], g["bufs"][k + 1],
                         g["x0bufs"][k] if g["x0bufs"] is not None else None)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return g["bufs"][-1].clone()

    def _capture(self, x, labels):
        """One graph per step. Step k reads ``bufs[k]`` (and the previous x0 buffer for GFCG) and
        copies its results into ``bufs[k+1]``: every graph's inputs and outputs are fixed buffers, so
        replays chain without Python in between (and the same structure runs on the CPU, see
        ``_RerunGraphs``)."""
        api = self._graph_api if self._graph_api is not None else _CudaGraphs()
        static_x = x.clone()
        static_labels = labels.clone() if labels is not None else None
        api.warmup(lambda: self._run_eager(static_x, static_labels, None))
        K = self.grid.num_steps
        bufs = [static_x] + [torch.empty_like(x) for _ in range(K)]
        x0bufs = [torch.empty_like(x) for _ in range(K)] if self.needs_reference else None
        state: dict = {}

        def make(k):
            def fn():
                x0_prev = x0bufs[k - 1] if (x0bufs is not None and k > 0) else None
                xn, x0 = self._step(k, bufs[k], static_labels, x0_prev, state)
                bufs[k + 1].copy_(xn)
                if x0bufs is not None and x0 is not None:
                    x0bufs[k].copy_(x0)
            return fn

        replays = [api.capture(make(k)) for k in range(K)]
        return {"x": static_x, "labels": static_labels, "replays": replays, "bufs": bufs, "x0bufs": x0bufs}


class _CudaGraphs:
    """Capture with torch.cuda graphs sharing one memory pool (replayed in capture order)."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()

    def warmup(self, fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # allocator, cuBLAS handles, lazy initialisation
            fn()
        torch.cuda.current_stream().wait_stream(side)

    def capture(self, fn):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph.replay


class _RerunGraphs:
    """CPU stand-in with the semantics the graph path relies on: a "replay" re-runs the captured
    step against the same fixed buffers. Lets the tests check the buffer chaining without a GPU."""

    def warmup(self, fn):
        fn()

    def capture(self, fn):
        fn()
        return fn


def make_noise(shape: Sequence[int], seed: int = 0, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise from a CPU generator (identical on every device), then moved.

    Seeds in [0, 2^32) seed the generator as given; a larger one is folded into the 32 bits torch's
    generator keeps (``seeding.fold_seed``), so it does not repeat the noise of ``seed mod 2^32``."""
    g = torch.Generator().manual_seed(fold_seed(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def indexed_noise(indices: Sequence[int], sample_shape: Sequence[int], seed: int = 0, *, device=None,
                  dtype=torch.float32) -> torch.Tensor:
    """Noise for global sample indices (each in [0, 2^32)): sample i's noise depends only on
    (seed, i), so any split of the indices over batches or ranks gives the same samples, and no two
    indices of one seed share their noise (``seeding.noise_seed``)."""
    rows = [torch.randn(tuple(sample_shape), generator=noise_generator(seed, i), dtype=torch.float32)
            for i in indices]
    if not rows:
        return torch.empty((0, *sample_shape), device=device, dtype=dtype)
    return torch.stack(rows).to(device=device, dtype=dtype)


def sample(model_fn: ModelFn, shape_or_noise: Sequence[int] | torch.Tensor, labels: torch.Tensor | None = None,
           policy=None, grid: TimeGrid | str | None = None, *, seed: int = 0, device=None,
           dtype: torch.dtype = torch.float32, **sampler_kwargs) -> torch.Tensor:
    """Sample with ``model_fn``; see :class:`Sampler` for the keyword arguments.

    ``shape_or_noise``: the full state shape ``(B, *S)`` (noise drawn from ``seed``) or the noise
    tensor itself. ``labels``: ``[B]`` int64 class labels (None for unconditional models). Returns the
    final state ``[B, *S]`` (for RAE latents: normalised latents, ready for the decoder).
    """
    if isinstance(shape_or_noise, torch.Tensor):
        noise = shape_or_noise
    else:
        try:
            shape = tuple(int(s) for s in shape_or_noise)
        except TypeError:
            _fail("shape_or_noise", f"must be a shape or a tensor, got {type(shape_or_noise).__name__}", TypeError)
        if device is None and isinstance(labels, torch.Tensor):
            device = labels.device
        noise = make_noise(shape, seed, device=device, dtype=dtype)
    return Sampler(model_fn, policy, grid, **sampler_kwargs)(noise, labels)
