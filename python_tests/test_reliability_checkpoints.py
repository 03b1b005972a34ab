"""Checkpoint safety (issue #11.3): safetensors first; pickles only through
torch.load(weights_only=True), so a pickle that would run code is refused before it runs; mismatches
are reported by key; nothing outside the given paths is read or written."""
from __future__ import annotations

import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo  # noqa: F401  its import creates torch's own cache folder: not the loaders' doing
from safetensors.torch import save_file

import raekern.models as M
from raekern.models.checkpoints import CheckpointMismatchError, load_state_dict_into, read_checkpoint
from raekern.models.fusion import LatentStats
from raekern.sampling.pipelines import load_latent_stats


class _RunsShell:
    """Unpickling this calls os.system(cmd): what a hostile checkpoint would do."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


def _hostile_files(tmp_path: Path) -> tuple[Path, list[Path]]:
    marker = tmp_path / "PWNED"
    cmd = f"touch {marker}"
    payload = {"model": {"w": torch.zeros(2)}, "trap": _RunsShell(cmd)}
    files = []
    for name in ("hostile.pt", "pytorch_model.bin", "hostile.pth"):
        torch.save(payload, tmp_path / name)  # zip container, as torch.save writes it
        files.append(tmp_path / name)
    legacy = tmp_path / "legacy.pt"  # a bare pickle stream (the pre-1.6 format torch.load also reads)
    legacy.write_bytes(pickle.dumps(payload, protocol=2))
    files.append(legacy)
    stats = tmp_path / "stat.pt"
    torch.save({"mean": torch.zeros(2, 1, 1), "var": torch.ones(2, 1, 1), "x": _RunsShell(cmd)}, stats)
    files.append(stats)
    return marker, files


def test_the_hostile_pickle_really_runs_code_when_trusted(tmp_path):
    """Guards the test below: the payload does execute under weights_only=False."""
    marker, files = _hostile_files(tmp_path)
    torch.load(files[0], weights_only=False)
    assert marker.exists()


def test_pickle_that_runs_code_is_refused_by_every_loader(tmp_path):
    marker, files = _hostile_files(tmp_path)
    for f in files[:-1]:
        with pytest.raises(ValueError, match="weights_only=True") as e:
            read_checkpoint(str(f))
        assert str(f) in str(e.value)  # names the file
        with pytest.raises(ValueError):
            M.load("ditdh-tiny", str(f))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2}')
    os.replace(files[1], hf / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only"):
        M.Dinov2Encoder.from_pretrained(str(hf))
    stats = files[-1]
    rae = M.RAE(M.build("dinov2-tiny-reg"), lambda hs: hs[-1][:, 5:], M.build("decoder-tiny"))
    for loader in (LatentStats.load, load_latent_stats, rae.load_stats):
        with pytest.raises(ValueError, match="weights_only=True") as e:
            loader(str(stats))
        assert str(stats) in str(e.value)  # names the file
    assert not marker.exists(), "unpickling ran the payload"


def test_safetensors_preferred_in_a_folder(tmp_path):
    """A Hugging Face folder with both files: the safetensors one is read, the pickle never opened."""
    marker, files = _hostile_files(tmp_path)
    folder = tmp_path / "both"
    folder.mkdir()
    os.replace(files[1], folder / "pytorch_model.bin")
    save_file({"w": torch.ones(3)}, str(folder / "model.safetensors"))
    sd = read_checkpoint(str(folder))
    assert list(sd) == ["w"] and torch.equal(sd["w"], torch.ones(3))
    assert not marker.exists()


def test_damaged_files_raise_naming_the_path(tmp_path):
    src = M.build("ditdh-tiny").state_dict()
    save_file({k: v.contiguous() for k, v in src.items()}, str(tmp_path / "m.safetensors"))
    torch.save(src, tmp_path / "m.pt")
    for name in ("m.safetensors", "m.pt"):
        data = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut_{name}"
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=f"cut_{name}"):
            read_checkpoint(str(cut))
    (tmp_path / "notatensor.pt").write_bytes(b"hello")
    with pytest.raises(ValueError, match="notatensor.pt"):
        read_checkpoint(str(tmp_path / "notatensor.pt"))
    torch.save({"ema": {"a": 1}, "step": 3}, tmp_path / "nodict.pt")
    with pytest.raises(ValueError, match="no state dict"):
        read_checkpoint(str(tmp_path / "nodict.pt"))
    # the latent-statistics loaders: truncated and foreign files name the path too
    torch.save({"mean": torch.zeros(2, 1, 1), "var": torch.ones(2, 1, 1)}, tmp_path / "stat.pt")
    data = (tmp_path / "stat.pt").read_bytes()
    (tmp_path / "cut_stat.pt").write_bytes(data[: len(data) // 2])
    torch.save({"avg": torch.zeros(2)}, tmp_path / "foreign_stat.pt")
    for name in ("cut_stat.pt", "foreign_stat.pt"):
        for loader in (LatentStats.load, load_latent_stats):
            with pytest.raises(ValueError, match=name):
                loader(str(tmp_path / name))


# ------------------------------------------------------------------------------------------ mismatches

def _mangled(model):
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    keys = list(sd)
    missing, shaped = keys[1], keys[-1]
    sd.pop(missing)
    sd["head.not_in_model.weight"] = torch.zeros(2)
    sd[shaped] = torch.zeros(*[s + 1 for s in sd[shaped].shape])
    return sd, missing, "head.not_in_model.weight", shaped


@pytest.mark.parametrize("name", ["ditdh-tiny", "ditdh-tiny-v2", "decoder-tiny", "dinov2-tiny-reg"])
@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_mismatch_reports_missing_unexpected_and_shapes_by_name(tmp_path, name, fmt):
    sd, missing, unexpected, shaped = _mangled(M.build(name))
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({"ema": sd}, path)
    with pytest.raises(CheckpointMismatchError) as e:
        M.load(name, str(path))
    msg = str(e.value)
    assert "missing keys (1)" in msg and missing in msg
    assert "unexpected keys (1)" in msg and unexpected in msg
    assert "shape mismatches (1)" in msg and shaped in msg
    assert str(path) in msg
    assert isinstance(e.value, ValueError)


def test_mismatch_is_reported_through_the_autoencoder_loader(tmp_path):
    dec = M.build("decoder-tiny")
    sd, missing, unexpected, shaped = _mangled(dec)
    torch.save(sd, tmp_path / "decoder.pt")
    rae = M.RAE(M.build("dinov2-tiny-reg"), lambda hs: hs[-1][:, 5:], dec)
    before = {k: v.clone() for k, v in dec.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e:
        rae.load_decoder(str(tmp_path / "decoder.pt"))
    assert all(k in str(e.value) for k in (missing, unexpected, shaped))
    # a refused checkpoint leaves the model untouched (no partial load)
    assert all(torch.equal(v, before[k]) for k, v in dec.state_dict().items())


def test_prefix_normalisation_does_not_hide_mismatches():
    model = M.build("ditdh-tiny")
    sd, missing, unexpected, shaped = _mangled(model)
    wrapped = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    with pytest.raises(CheckpointMismatchError) as e:
        load_state_dict_into(model, wrapped)
    assert all(k in str(e.value) for k in (missing, unexpected, shaped))


# ------------------------------------------------------------------------------------------ file access

class _FileAudit:
    """Records every file and directory the interpreter opens or lists while active (sys.addaudithook
    cannot be removed, so the hook is installed once and switched on and off)."""

    def __init__(self):
        self.active = False
        self.events: list[tuple[str, str, str]] = []
        sys.addaudithook(self._hook)

    def _hook(self, event, args):
        if not self.active:
            return
        if event == "open":
            path, mode, flags = args
            if isinstance(path, (str, bytes, os.PathLike)):
                write = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                self.events.append((event, os.fsdecode(path), "w" if write else "r"))
        elif event in ("os.listdir", "os.scandir", "os.remove", "os.rename", "os.mkdir", "os.rmdir",
                       "shutil.rmtree", "os.truncate"):
            if args and isinstance(args[0], (str, bytes, os.PathLike)):
                self.events.append((event, os.fsdecode(args[0]), "w" if event not in ("os.listdir", "os.scandir")
                                    else "r"))


_AUDIT = None


def _audit() -> _FileAudit:
    global _AUDIT
    if _AUDIT is None:
        _AUDIT = _FileAudit()
    return _AUDIT


def _code_path(p: str) -> bool:
    """Imports (modules, shared libraries, metadata) are not data reads."""
    roots = {os.path.realpath(r) for r in (sys.prefix, sys.base_prefix, os.path.dirname(os.__file__),
                                              str(Path(M.__file__).parents[2]))}
    rp = os.path.realpath(p)
    return rp.endswith((".py", ".pyc", ".so")) or any(rp.startswith(r + os.sep) for r in roots
                                                        if not rp.startswith(os.path.realpath("/tmp")))


def test_loaders_touch_only_the_given_paths(tmp_path, monkeypatch):
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(work))
    src = M.build("ditdh-tiny")
    given = tmp_path / "given"
    given.mkdir()
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(given / "m.safetensors"))
    torch.save({"ema": src.state_dict()}, given / "m.pt")
    torch.save({"mean": torch.zeros(16, 4, 4), "var": torch.ones(16, 4, 4)}, given / "stat.pt")
    hf = given / "hf"
    hf.mkdir()
    enc = M.build("dinov2-tiny-reg")
    (hf / "config.json").write_text('{"hidden_size": 16, "num_hidden_layers": 3, "num_attention_heads": 2, '
                                    '"patch_size": 14, "image_size": 70, "num_register_tokens": 4}')
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(hf / "model.safetensors"))
    decoy = tmp_path / "decoy"  # neighbours of the given files that must stay untouched
    decoy.mkdir()
    torch.save({"w": torch.zeros(1)}, decoy / "pytorch_model.bin")
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}

    audit = _audit()
    audit.events.clear()
    audit.active = True
    try:
        M.load("ditdh-tiny", str(given / "m.safetensors"))
        M.load("ditdh-tiny", str(given / "m.pt"))
        LatentStats.load(str(given / "stat.pt"))
        load_latent_stats(given / "stat.pt")
        try:
            M.Dinov2Encoder.from_pretrained(str(hf))
        except (ValueError, TypeError):
            pass  # config layout details are the models suite's business; only the file access matters
    finally:
        audit.active = False
    data = [(e, p, m) for e, p, m in audit.events if not _code_path(p)]
    assert any(p.endswith("m.pt") for _, p, _ in data) and any(p.endswith("stat.pt") for _, p, _ in data)
    allowed = [str(given)]
    outside = [ev for ev in data if not any(os.path.realpath(ev[1]).startswith(os.path.realpath(a))
                                            for a in allowed)]
    assert not outside, outside
    assert not [ev for ev in data if ev[2] == "w"], "a loader wrote a file"
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    assert after == before  # nothing created, nothing modified
    assert not list(work.iterdir())
