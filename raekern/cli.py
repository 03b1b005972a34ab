"""The `raekern` command: info, bench, sample."""
from __future__ import annotations

import argparse
import math
import os
import sys


def _info(args) -> int:
    import torch

    import raekern
    from raekern._utils.library import build_info, registered_ops

    info = build_info()
    print(f"raekern {raekern.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
          f"device available: {torch.cuda.is_available()})")
    print(f"CPU kernels: -march={info['cpu_arch']}, ISA {info['cpu_isa']}, OpenMP {info['openmp'] or 'off'}, "
          f"{torch.get_num_threads()} threads")
    print(f"CUDA archs compiled: {info['cuda_archs'] or 'none (CPU-only build)'}")
    import importlib

    # raekern.ops.attention is also the op's name, so reach the module through importlib.
    attn_mod = importlib.import_module("raekern.ops.attention")
    if hasattr(attn_mod, "attention_info"):
        print("attention:", attn_mod.attention_info())
    from raekern._utils.switches import SWITCHES

    print("run-time switches (environment; unset = the library's choice):")
    for name, what in SWITCHES.items():
        value = f"={os.environ[name]}" if name in os.environ else "unset"
        print(f"  {name:32s} {value:8s} {what}")
    print("ops (devices with kernels):")
    for name, keys in registered_ops().items():
        devs = [k for k in keys if k in ("CPU", "CUDA")] or keys
        print(f"  {name:40s} {', '.join(devs)}")
    return 0


def _bench(args) -> int:
    from raekern.bench.runner import run

    from raekern.bench import registry
    from raekern.bench.runner import DTYPES

    # Every argument is checked before the copy-bandwidth measurement starts.
    device = args.device or ("cuda" if _cuda() else "cpu")
    if device == "cuda" and not _cuda():
        args.parser.error("argument --device: 'cuda' needs a CUDA build of torch and a visible GPU")
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    offered = [d for d in DTYPES if d != "fp64"]  # no family has fp64 cases
    bad = [d for d in dtypes if d not in offered]
    if bad or not dtypes:
        args.parser.error(f"argument --dtype: {bad or args.dtype!r} not in {offered}")
    fams = args.family or None
    unknown = [f for f in fams or () if f not in registry.families()]
    if unknown:
        args.parser.error(f"argument --family: unknown {unknown}; known: {registry.families()}")
    if not 0 < args.min_time < math.inf:  # NaN and inf too
        args.parser.error(f"argument --min-time: must be a finite number > 0, got {args.min_time}")
    if args.time_budget is not None and not 0 < args.time_budget < math.inf:
        args.parser.error(f"argument --time-budget: must be a finite number of seconds > 0, got {args.time_budget}")
    res = run(fams, device, dtypes, quick=not args.full, min_time=args.min_time,
              json_path=args.json, plot_path=args.plot, quiet=args.quiet, time_budget=args.time_budget,
              skip=tuple(k.strip() for k in (args.skip or "").split(",") if k.strip()))
    if "interrupted" in res:
        print(f"interrupted {res['interrupted']}; the JSON and plot hold what was measured", file=sys.stderr)
        return 130
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="raekern", description="raekern: kernels for RAE latent diffusion")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("info", help="version, build, CPU ISA, CUDA archs and every registered op")
    p.set_defaults(fn=_info)

    p = sub.add_parser("bench", help="benchmark raekern against eager PyTorch, torch.compile and SDPA")
    p.add_argument("--family", action="append", help="op family (repeatable); default: all")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32,bf16,fp16 (default fp32,bf16)")
    p.add_argument("--full", action="store_true", help="every shape, not only the default subset")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per measurement")
    p.add_argument("--json", help="write results as JSON here")
    p.add_argument("--plot", help="write a bar chart (PNG) here")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--skip", help="comma list: implementations whose name contains one of these are not "
                   "timed (e.g. compile: no torch.compile baselines, for a quick bandwidth run)")
    p.add_argument("--time-budget", type=float, help="seconds after which no further case starts "
                   "(tables, JSON and plot cover what was measured)")
    p.set_defaults(fn=_bench, parser=p)

    try:
        from raekern.sampling.cli import add_sample_parser
    except ImportError:
        add_sample_parser = None
    if add_sample_parser is not None:
        add_sample_parser(sub)

    args = ap.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
