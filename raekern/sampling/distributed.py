"""Sharded, resumable, multi-process sampling with torch.distributed (torchrun).

Layout of an output folder::

    out/manifest.json            what was asked (number, shard size, seed, settings); checked on resume
    out/shards/shard_000003.npz  images [n,H,W,3] uint8, labels [n], indices [n] (+ latents if asked)
    out/images/000123.png        one PNG per sample (optional)
    out/samples.npz              the merge: arr_0 = images [N,H,W,3] uint8 in index order, labels [N]

Samples are numbered 0..N−1 and cut into shards of ``shard_size`` consecutive indices; shard s
belongs to rank ``s % world_size``. Every sample's noise and label depend only on (seed, index), so
the result does not depend on the number of ranks. Every file is written to a temporary name and
renamed into place, and a shard's .npz is written last, after its PNGs: a shard whose .npz exists is
complete, and a restarted run skips it. Rank 0 merges once every rank has passed the final barrier.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from raekern.sampling.seeding import label_hash

SHARD_DIR = "shards"
IMAGE_DIR = "images"
MERGED = "samples.npz"
MANIFEST = "manifest.json"


def _fail(arg: str, msg: str, exc: type[Exception] = ValueError):
    raise exc(f"raekern.sampling.distributed: argument '{arg}' {msg}")


@dataclass(frozen=True)
class ShardPlan:
    num_samples: int
    shard_size: int

    def __post_init__(self):
        if self.num_samples < 1:
            _fail("num_samples", f"must be >= 1, got {self.num_samples}")
        if self.shard_size < 1:
            _fail("shard_size", f"must be >= 1, got {self.shard_size}")

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def indices(self, shard: int) -> list[int]:
        lo = shard * self.shard_size
        return list(range(lo, min(self.num_samples, lo + self.shard_size)))

    def shards_of(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, self.num_shards, world_size))


# -- atomic files ------------------------------------------------------------------------------------
def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _remove_stale_tmp(path: Path) -> None:
    """Delete temporaries a killed process left for ``path`` (its pid is gone, the name is ours)."""
    if path.parent.is_dir():
        for tmp in path.parent.glob(f".{path.name}.tmp*"):
            tmp.unlink(missing_ok=True)


def save_npz_atomic(path: str | os.PathLike, **arrays) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def save_png_atomic(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write an ``[H,W,3]`` (or ``[H,W]``) uint8 image as PNG via a temporary file."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    img = image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_json_atomic(path: str | os.PathLike, obj) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)
    return path


def shard_path(out_dir: str | os.PathLike, shard: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"shard_{shard:06d}.npz"


def shard_complete(path: Path, expected: Sequence[int]) -> bool:
    """True when the shard file exists, every array in it reads back intact (zip CRCs checked), and it
    holds exactly the expected indices."""
    if not path.exists():
        return False
    try:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}  # reading each member checks its CRC
        return (list(arrays["indices"].tolist()) == list(expected) and arrays["images"].shape[0] == len(expected)
                and arrays["labels"].shape[0] == len(expected))
    except Exception:  # a foreign or damaged file: regenerate it
        return False


# -- process group -----------------------------------------------------------------------------------
def init_distributed(device: str | torch.device | None = None) -> tuple[int, int]:
    """Join the torchrun process group if the environment describes one; returns (rank, world_size).

    ``RAEKERN_DIST_TIMEOUT_S`` bounds how long a rank waits for a dead peer (default 1800 s).

    gloo for CPU tensors, nccl for CUDA (each rank uses cuda:LOCAL_RANK). A single process without
    torchrun's environment runs alone (rank 0 of 1) without a process group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    dev = torch.device(device) if device is not None else torch.device("cpu")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    import datetime

    timeout = datetime.timedelta(seconds=float(os.environ.get("RAEKERN_DIST_TIMEOUT_S", "1800")))
    dist.init_process_group(backend=backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# -- the job -----------------------------------------------------------------------------------------
GenerateFn = Callable[[list[int]], dict]


def _check_manifest(out_dir: Path, manifest: dict) -> None:
    """Write the manifest, or check it against the one a run left. A folder that holds no shard
    yet (its run failed before finishing one) is reset for the new settings instead of refused."""
    path = out_dir / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        if old == manifest:
            return
        if _has_shards(out_dir):
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            _fail("out_dir", f"{out_dir} holds a run with different settings ({', '.join(diff)}); "
                  "use a new output folder or the same settings to resume")
        _remove_orphan_pngs(out_dir)
    save_json_atomic(path, manifest)


def _has_shards(out_dir: Path) -> bool:
    # Shards appear by rename only, so any shard file is the completed work of the manifest's run.
    return any((out_dir / SHARD_DIR).glob("shard_*.npz"))


def _remove_orphan_pngs(out_dir: Path) -> None:
    """PNGs of a shard whose .npz was never written (the run died in between): made with the old
    settings, they must not sit beside the new run's images."""
    for png in (out_dir / IMAGE_DIR).glob("[0-9]*.png"):
        if png.stem.isdigit():
            png.unlink(missing_ok=True)


def run_shards(generate: GenerateFn, plan: ShardPlan, out_dir: str | os.PathLike, *, rank: int = 0,
               world_size: int = 1, png: bool = True, keep_latents: bool = False,
               progress: bool = True, log: Callable[[str], None] | None = None) -> list[int]:
    """Generate this rank's missing shards; returns the shard numbers it generated.

    ``generate(indices)`` returns ``{"images": uint8 [n,H,W,3], "labels": [n], "latents": [n,...]}``.
    """
    out_dir = Path(out_dir)
    done = []
    mine = plan.shards_of(rank, world_size)
    bar = None
    if progress and rank == 0:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(mine), desc=f"shards (rank 0 of {world_size})", dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
    for s in mine:
        idx = plan.indices(s)
        path = shard_path(out_dir, s)
        if shard_complete(path, idx):
            if log:
                log(f"rank {rank}: shard {s} already complete, skipped")
        else:
            _remove_stale_tmp(path)
            if png:
                for i in idx:
                    _remove_stale_tmp(out_dir / IMAGE_DIR / f"{i:06d}.png")
            res = generate(idx)
            images = np.ascontiguousarray(res["images"])
            if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(idx):
                _fail("generate", f"must return images as uint8 [n,H,W,C] with n={len(idx)}, got "
                      f"{images.dtype} {images.shape}")
            if png:
                for i, img in zip(idx, images):
                    save_png_atomic(out_dir / IMAGE_DIR / f"{i:06d}.png", img)
            arrays = {"images": images, "labels": np.asarray(res.get("labels", np.zeros(len(idx))), dtype=np.int64),
                      "indices": np.asarray(idx, dtype=np.int64)}
            if keep_latents and res.get("latents") is not None:
                arrays["latents"] = np.asarray(res["latents"])
            save_npz_atomic(path, **arrays)
            done.append(s)
            if log:
                log(f"rank {rank}: shard {s} written ({len(idx)} samples)")
            _maybe_fault(rank, len(done))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return done


def _maybe_fault(rank: int, written: int) -> None:
    """Fault injection for the resumption tests: RAEKERN_FAULT_EXIT_AFTER_SHARDS=n (and optionally
    RAEKERN_FAULT_RANK=r) makes the rank die abruptly, like a killed process, after n new shards."""
    n = os.environ.get("RAEKERN_FAULT_EXIT_AFTER_SHARDS")
    r = os.environ.get("RAEKERN_FAULT_RANK")
    if n is not None and written >= int(n) and (r is None or int(r) == rank):
        os._exit(17)


def merge_shards(plan: ShardPlan, out_dir: str | os.PathLike, name: str = MERGED) -> Path:
    """Concatenate every shard in index order into ``out_dir/name`` (arr_0 = images, labels;
    latents when every shard has them), the layout ADM-style FID evaluators read."""
    out_dir = Path(out_dir)
    images, labels, latents = [], [], []
    for s in range(plan.num_shards):
        path = shard_path(out_dir, s)
        if not shard_complete(path, plan.indices(s)):
            _fail("out_dir", f"is missing shard {s} ({path}); run the sampling again to complete it")
        with np.load(path) as z:
            images.append(z["images"])
            labels.append(z["labels"])
            latents.append(z["latents"] if "latents" in z.files else None)
    arrays = {"arr_0": np.concatenate(images), "labels": np.concatenate(labels)}
    if all(l is not None for l in latents):
        arrays["latents"] = np.concatenate(latents)
    return save_npz_atomic(out_dir / name, **arrays)


def distributed_sample(generate: GenerateFn, num_samples: int, out_dir: str | os.PathLike, *,
                       shard_size: int, manifest: dict | None = None, png: bool = True,
                       keep_latents: bool = False, merge: bool = True, device=None, progress: bool = True,
                       log: Callable[[str], None] | None = None) -> Path | None:
    """Run a sharded sampling job on every rank (torchrun) or alone; rank 0 merges at the end.

    Returns the merged file's path on rank 0 (None on other ranks or when ``merge`` is False).
    """
    plan = ShardPlan(int(num_samples), int(shard_size))
    rank, world = init_distributed(device)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # png / keep_latents are part of the settings: a resumed run must not leave earlier shards
    # without the PNGs or latents the restart asks for.
    man = {"num_samples": plan.num_samples, "shard_size": plan.shard_size, "png": bool(png),
           "keep_latents": bool(keep_latents), **(manifest or {})}
    if rank == 0:
        _check_manifest(out_dir, man)
    barrier()
    if rank != 0:
        _check_manifest(out_dir, man)
    run_shards(generate, plan, out_dir, rank=rank, world_size=world, png=png, keep_latents=keep_latents,
               progress=progress, log=log)
    barrier()
    merged = None
    if merge and rank == 0:
        merged = merge_shards(plan, out_dir)
        if log:
            log(f"merged {plan.num_samples} samples into {merged}")
    barrier()
    return merged


def class_labels(indices: Sequence[int], num_classes: int, seed: int = 0, mode: str = "equal") -> torch.Tensor:
    """Labels for global sample indices: 'equal' cycles through the classes (i mod C, RAE's
    ``--label-sampling equal``: N/C per class), 'random' hashes (seed, i) in a domain of its own
    (``seeding.label_hash``; no torch generator, so never a draw of some sample's noise generator)."""
    if mode == "equal":
        return torch.tensor([int(i) % num_classes for i in indices], dtype=torch.int64)
    if mode == "random":
        return torch.tensor([label_hash(seed, i) % num_classes for i in indices], dtype=torch.int64)
    _fail("mode", f"must be 'equal' or 'random', got {mode!r}")
