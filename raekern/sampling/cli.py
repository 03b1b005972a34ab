"""`raekern sample`: labels → latents → images from local checkpoints, single process or torchrun.

The lead's ``raekern/cli.py`` calls :func:`add_sample_parser` and dispatches to :func:`run_sample`;
``python -m raekern.sampling.cli ...`` runs the same command on its own.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from raekern.sampling.policy_spec import GUIDANCE_HELP, build_policy, describe
from raekern.sampling.presets import DEFAULT_PRESET, PRESETS, get_preset

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp64": torch.float64, "float64": torch.float64}

DESCRIPTION = """\
Sample images from a class-conditional RAE diffusion model with raekern's fused guidance sampler.

  raekern sample --preset rae-v1-256 --ckpt DiTDH-XL/stage2_model.pt --weak-ckpt DiTDH-S/stage2_model.pt \\
      --decoder-ckpt ViTXL_n08/model.pt --stats stat.pt --guidance ag:1.42 --num 64 --out out/
  torchrun --nproc-per-node 8 -m raekern.sampling.cli --preset raev2-256 ... --num-samples 50000 --out fid50k/

Outputs in --out: grid.png (the first --grid-images samples), samples.npz (arr_0 = uint8 images
[N,H,W,3] in sample order, labels; latents with --keep-latents), images/NNNNNN.png (with --png),
shards/ (per-shard .npz; a restarted run skips finished shards), manifest.json. Sample i's noise and
label depend only on (--seed, i), so the output does not depend on the number of processes.
--config FILE.json|.yaml sets any option by its long name (e.g. {"preset": "raev2-256", "num-samples": 64,
"png": true}), checked like the flag; flags on the command line win.
"""


def _defaults() -> dict:
    p = argparse.ArgumentParser(add_help=False)
    _add_option_arguments(p)
    return {a.dest: a.default for a in p._actions if a.dest != "help"}


_EXPLICIT = "_explicit_options"  # namespace attribute: the dests the command line set


def _tracked(action_cls):
    class Tracked(action_cls):
        def __call__(self, parser, namespace, values, option_string=None):
            super().__call__(parser, namespace, values, option_string)
            explicit = getattr(namespace, _EXPLICIT, None)
            if explicit is None:
                explicit = set()
                setattr(namespace, _EXPLICIT, explicit)
            explicit.add(self.dest)

    Tracked.__name__ = f"Tracked{action_cls.__name__}"
    return Tracked


def _add_arguments(p: argparse.ArgumentParser) -> None:
    _add_option_arguments(p)
    # Every option records that the command line gave it, so --config can tell "not given" from
    # "given with the default value" (command-line flags win even when they equal the default).
    for a in p._actions:
        if a.dest != "help":
            a.__class__ = _tracked(type(a))


def _add_option_arguments(p: argparse.ArgumentParser) -> None:
    presets = ", ".join(f"{n}" for n in sorted(PRESETS))
    p.add_argument("--config", help="JSON or YAML file whose keys are option names (weak_ckpt or "
                   "weak-ckpt, num or num-samples); values are checked like the flags' (png: true/false)")
    p.add_argument("--preset", default=DEFAULT_PRESET, help=f"model configuration ({presets}); default "
                   f"{DEFAULT_PRESET!r}")
    p.add_argument("--ckpt", help="main diffusion model checkpoint (local path)")
    p.add_argument("--weak-ckpt", help="AutoGuidance weak model checkpoint")
    p.add_argument("--decoder-ckpt", help="pixel decoder checkpoint (without it: latents only, and a "
                   "preview of 3 latent channels as images)")
    p.add_argument("--stats", help="latent statistics file (stat.pt / stats.pt with mean and var)")
    p.add_argument("--dit-model", help="raekern.models registry name of the diffusion model (default: "
                   "the preset's, e.g. ditdh-xl)")
    p.add_argument("--weak-model", help="registry name of the AutoGuidance weak model (default: the preset's)")
    p.add_argument("--decoder-model", help="registry name of the decoder (default: the preset's)")
    p.add_argument("--classifier-ckpt", help="GFCG classifier checkpoint")
    p.add_argument("--classifier-model", help="registry name of the GFCG classifier (raekern.models)")
    p.add_argument("--classifier-space", choices=("latent", "pixel"), default="latent",
                   help="GFCG classifier input: x0 latents, or images decoded from them")
    p.add_argument("--guidance", action="append", metavar="SPEC",
                   help="guidance method, repeatable (see the list below); default: the preset's")
    p.add_argument("--steps", type=int, help="grid size: points for grid 'rae' (50 → 49 steps), steps "
                   "otherwise; default: the preset's")
    p.add_argument("--grid", choices=("rae", "raev2", "uniform"), help="time grid (default: the preset's)")
    p.add_argument("--solver", choices=("euler", "heun"), default="euler")
    p.add_argument("--num", "--num-samples", dest="num", type=int, default=16,
                   help="number of samples (under torchrun, write `-- --num N` or --num-samples: torchrun "
                   "reads --num as an abbreviation of its own --numa-binding)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per network batch (and per shard)")
    p.add_argument("--labels", default="equal", help="'equal' (i mod classes), 'random', or a comma list "
                   "of class ids used in turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="samples", help="output folder")
    p.add_argument("--png", action=argparse.BooleanOptionalAction, default=False,
                   help="also write one PNG per sample")
    p.add_argument("--keep-latents", action="store_true", help="store the final latents in the .npz files")
    p.add_argument("--grid-images", type=int, default=64, help="samples in grid.png (0: none)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="sampler state dtype")
    p.add_argument("--model-dtype", choices=sorted(DTYPES), help="network dtype (e.g. bf16)")
    p.add_argument("--cuda-graph", action="store_true", help="capture each step in a CUDA graph")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    """Register `sample` on an argparse subparsers object; returns the new parser."""
    p = subparsers.add_parser("sample", help="sample images with the fused guidance sampler",
                              description=DESCRIPTION, epilog=GUIDANCE_HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=_run_reporting_errors, fn=_run_reporting_errors)
    return p


def _run_reporting_errors(args: argparse.Namespace) -> int:
    """run_sample for `raekern sample`: a bad argument is one error line, not a traceback."""
    try:
        return run_sample(args)
    except (ValueError, OSError) as e:  # OSError: a checkpoint, config or output path that is not there
        print(f"raekern sample: error: {e}", file=sys.stderr)
        return 2


def _config_fail(msg: str):
    raise ValueError(f"raekern sample: argument '--config' {msg}")


def _read_config(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        _config_fail(f"cannot be read: {e}")
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            cfg = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            _config_fail(f"is not valid YAML: {' '.join(str(e).split())}")
    else:
        try:
            cfg = json.loads(text)
        except ValueError as e:
            _config_fail(f"is not valid JSON: {e}")
    if not isinstance(cfg, dict):
        _config_fail(f"must hold a mapping of option names to values, got {type(cfg).__name__}")
    return cfg


def _config_actions() -> dict[str, argparse.Action]:
    """Every name --config accepts for an option → its action: the dest (weak_ckpt) and each flag
    spelling without dashes (weak-ckpt, num-samples), in either - or _ form."""
    p = argparse.ArgumentParser(add_help=False)
    _add_option_arguments(p)
    names = {}
    for a in p._actions:
        if a.dest in ("help", "config"):
            continue
        # --no-png would need its value inverted: the config says "png": false instead.
        flags = [o.lstrip("-") for o in a.option_strings
                 if not (isinstance(a, argparse.BooleanOptionalAction) and o.startswith("--no-"))]
        for n in (a.dest, *flags):
            names[n] = names[n.replace("-", "_")] = a
    return names


def _config_value(key: str, a: argparse.Action, value):
    """A config value checked and converted as the flag's own parser would (type, choices); null means
    the flag's default, for every key."""
    if value is None:
        return a.default
    if a.nargs == 0:  # store_true / --png/--no-png: a JSON or YAML boolean, not a string
        if not isinstance(value, bool):
            _config_fail(f"key {key!r} must be true or false, got {value!r}")
        return value
    if isinstance(a, argparse._AppendAction):  # --guidance: one spec or a list of specs
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            _config_fail(f"key {key!r} must be a string or a list of strings, got {value!r}")
        return value
    if isinstance(value, str) and a.type is not None:  # as the command line would give it
        try:
            value = a.type(value)
        except ValueError:
            _config_fail(f"key {key!r} must be {_type_name(a.type)}, got {value!r}")
    want = a.type or str
    if isinstance(value, bool) or not isinstance(value, want):
        _config_fail(f"key {key!r} must be {_type_name(want)}, got {value!r}")
    if a.choices is not None and value not in a.choices:
        _config_fail(f"key {key!r} must be one of {list(a.choices)}, got {value!r}")
    return value


def _type_name(t) -> str:
    return {int: "an int", float: "a number", str: "a string"}.get(t, getattr(t, "__name__", str(t)))


def _apply_config(args: argparse.Namespace) -> argparse.Namespace:
    if not args.config:
        return args
    cfg = _read_config(Path(args.config))
    actions = _config_actions()
    defaults = _defaults()
    explicit = getattr(args, _EXPLICIT, None)
    seen: dict[str, str] = {}
    for key, value in cfg.items():
        a = actions.get(str(key))
        if a is None:
            why = " (a config cannot name another config)" if str(key) == "config" else ""
            _config_fail(f"has an unknown option {key!r}{why}")
        dest = a.dest
        if dest in seen:
            _config_fail(f"sets {dest} twice ({seen[dest]!r} and {key!r})")
        seen[dest] = key
        value = _config_value(key, a, value)
        # A namespace from our parser knows which flags were given; one built by hand (a caller of
        # run_sample) counts values equal to the default as not given.
        given = dest in explicit if explicit is not None else getattr(args, dest) != defaults[dest]
        if not given:
            setattr(args, dest, value)
    return args


def _labels_fn(spec: str, num_classes: int, seed: int):
    from raekern.sampling.distributed import class_labels

    if spec in ("equal", "random"):
        return lambda idx: class_labels(idx, num_classes, seed, spec)
    try:
        ids = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"raekern sample: argument '--labels' must be 'equal', 'random' or a comma list "
                         f"of integers, got {spec!r}") from None
    if not ids or any(not 0 <= i < num_classes for i in ids):
        raise ValueError(f"raekern sample: argument '--labels' must name classes in [0, {num_classes}), got {spec!r}")
    return lambda idx: torch.tensor([ids[i % len(ids)] for i in idx], dtype=torch.int64)


def build_from_args(args: argparse.Namespace):
    """(pipeline with its policy, policy specs) from parsed arguments."""
    preset = get_preset(args.preset)
    opts = {k: v for k, v in vars(args).items() if k != "func"}
    opts["dtype"] = DTYPES[args.dtype]
    opts["model_dtype"] = DTYPES[args.model_dtype] if args.model_dtype else None
    opts["progress"] = False  # per-step bars inside a shard bar are noise
    pipe = preset.build(opts)
    specs = list(args.guidance or preset.guidance)
    has_weak = "weak" in pipe.models and pipe.models["weak"] is not None
    if not args.guidance and describe(specs)["method"] == "ag" and not has_weak:
        specs = ["none"]
    classifier = None
    if describe(specs)["method"] == "gfcg" and preset.classifier is not None:
        classifier = preset.classifier(opts, pipe)
    policy = build_policy(specs, classifier=classifier, has_weak=has_weak, num_classes=preset.num_classes)
    return pipe.with_policy(policy), specs


def run_sample(args: argparse.Namespace) -> int:
    from raekern.sampling.distributed import MERGED, distributed_sample, init_distributed
    from raekern.sampling.pipelines import image_grid
    from raekern.sampling.distributed import save_png_atomic

    args = _apply_config(args)
    if args.num < 1:
        raise ValueError(f"raekern sample: argument '--num' must be >= 1, got {args.num}")
    if args.batch_size < 1:
        raise ValueError(f"raekern sample: argument '--batch-size' must be >= 1, got {args.batch_size}")
    if args.steps is not None and args.steps < 1:  # None: the preset's default; 0 is not "default"
        raise ValueError(f"raekern sample: argument '--steps' must be >= 1, got {args.steps}")
    rank, world = init_distributed(args.device)
    if args.device.startswith("cuda") and world > 1:
        args.device = f"cuda:{torch.cuda.current_device()}"
    pipe, specs = build_from_args(args)
    labels_of = _labels_fn(args.labels, pipe.num_classes, args.seed)

    def generate(indices):
        return pipe.generate(indices, seed=args.seed, labels=labels_of(indices))

    manifest = {"preset": args.preset, "ckpt": args.ckpt, "weak_ckpt": args.weak_ckpt,
                "decoder_ckpt": args.decoder_ckpt, "stats": args.stats, "guidance": specs,
                "dit_model": args.dit_model, "weak_model": args.weak_model, "decoder_model": args.decoder_model,
                "steps": pipe.grid.num_steps, "grid": pipe.grid.name, "solver": args.solver,
                "seed": args.seed, "labels": args.labels, "dtype": args.dtype, "model_dtype": args.model_dtype,
                "classifier_ckpt": args.classifier_ckpt, "classifier_model": args.classifier_model,
                "classifier_space": args.classifier_space}
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731  one line per shard
    merged = distributed_sample(generate, args.num, args.out, shard_size=args.batch_size, manifest=manifest,
                                png=args.png, keep_latents=args.keep_latents, device=args.device,
                                progress=not args.no_progress, log=log)
    if rank == 0 and merged is not None and args.grid_images > 0:
        with np.load(merged) as z:
            imgs = z["arr_0"][: args.grid_images]
        save_png_atomic(Path(args.out) / "grid.png", image_grid(imgs))
        print(f"wrote {Path(args.out) / MERGED} ({args.num} samples) and {Path(args.out) / 'grid.png'}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="raekern sample", description=DESCRIPTION, epilog=GUIDANCE_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_sample(args)
    except ValueError as e:
        parser.error(str(e))
        return 2


if __name__ == "__main__":
    sys.exit(main())
