"""Distributed sampling (two gloo processes on the CPU), resumption after a killed rank, and the
`raekern sample` command line, all on the tiny-test preset."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from raekern.sampling import cli
from raekern.sampling.distributed import ShardPlan, class_labels, merge_shards, run_shards, shard_path
from raekern.sampling.policy_spec import GUIDANCE_HELP, build_policy, describe

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--preset", "tiny-test", "--num", "12", "--batch-size", "2", "--steps", "6", "--guidance", "cfg:1.5",
        "--keep-latents", "--no-progress", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out: Path, extra_env=None, world=2, args=ARGS):
    """Start `world` ranks the way torchrun would (env://), return their exit codes and stderr."""
    port = _free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1",
                   RAEKERN_DIST_TIMEOUT_S="60", **(extra_env or {}))
        procs.append(subprocess.Popen([sys.executable, "-m", "raekern.sampling.cli", *args, "--out", str(out)],
                                      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        results.append((p.returncode, err))
    return results


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    assert cli.main([*ARGS, "--out", str(out)]) == 0
    with np.load(out / "samples.npz") as z:
        return {k: z[k] for k in z.files}


def _merged(out: Path) -> dict:
    with np.load(out / "samples.npz") as z:
        return {k: z[k] for k in z.files}


def test_single_process_output_layout(single, tmp_path):
    assert single["arr_0"].shape == (12, 16, 16, 3) and single["arr_0"].dtype == np.uint8
    assert single["labels"].tolist() == [i % 10 for i in range(12)]
    assert single["latents"].shape == (12, 8, 4, 4)


def test_two_gloo_ranks_equal_single_process(single, tmp_path):
    res = _launch(tmp_path)
    assert [rc for rc, _ in res] == [0, 0], res
    got = _merged(tmp_path)
    np.testing.assert_array_equal(got["labels"], single["labels"])
    np.testing.assert_array_equal(got["arr_0"], single["arr_0"])
    np.testing.assert_allclose(got["latents"], single["latents"], rtol=0, atol=1e-6)
    assert (tmp_path / "grid.png").exists()


def test_resume_after_a_killed_rank(single, tmp_path):
    # Rank 1 dies right after its first shard (shard 1); rank 0 finishes 0, 2, 4 and then fails at
    # the barrier because its peer is gone.
    res = _launch(tmp_path, {"RAEKERN_FAULT_EXIT_AFTER_SHARDS": "1", "RAEKERN_FAULT_RANK": "1"})
    assert res[1][0] == 17 and res[0][0] != 0
    done = {s for s in range(6) if shard_path(tmp_path, s).exists()}
    assert done == {0, 1, 2, 4}
    assert not (tmp_path / "samples.npz").exists()
    mtimes = {s: shard_path(tmp_path, s).stat().st_mtime_ns for s in done}
    res = _launch(tmp_path)
    assert [rc for rc, _ in res] == [0, 0], res
    assert all(shard_path(tmp_path, s).stat().st_mtime_ns == m for s, m in mtimes.items())
    assert "shard 1 already complete" in res[1][1]
    got = _merged(tmp_path)
    np.testing.assert_array_equal(got["arr_0"], single["arr_0"])
    np.testing.assert_allclose(got["latents"], single["latents"], rtol=0, atol=1e-6)


def test_resume_refuses_other_settings(tmp_path):
    assert cli.main([*ARGS, "--num", "2", "--out", str(tmp_path)]) == 0
    for other in (["--seed", "1"], ["--png"], ["--classifier-space", "pixel"]):
        with pytest.raises(SystemExit):
            cli.main([*ARGS, "--num", "2", *other, "--out", str(tmp_path)])
    no_latents = [a for a in ARGS if a != "--keep-latents"]
    with pytest.raises(SystemExit):
        cli.main([*no_latents, "--num", "2", "--out", str(tmp_path)])


def test_a_shard_with_a_damaged_member_is_regenerated(tmp_path):
    """shard_complete reads every member back (zip CRCs), not only indices and the images' shape."""
    import zipfile
    plan = ShardPlan(4, 2)

    def gen(idx):
        return {"images": np.full((len(idx), 2, 2, 3), idx[0], np.uint8), "labels": np.array(idx) + 100}

    run_shards(gen, plan, tmp_path, png=False, progress=False)
    path = shard_path(tmp_path, 1)
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("labels.npy")
    data = bytearray(path.read_bytes())
    h = info.header_offset  # local header: 30 bytes, then the name and extra field of the lengths at 26, 28
    start = h + 30 + int.from_bytes(data[h + 26:h + 28], "little") + int.from_bytes(data[h + 28:h + 30], "little")
    data[start + info.compress_size - 1] ^= 0xFF  # the member's last data byte
    path.write_bytes(bytes(data))
    assert run_shards(gen, plan, tmp_path, png=False, progress=False) == [1]
    assert np.load(merge_shards(plan, tmp_path))["labels"].tolist() == [100, 101, 102, 103]


def test_shards_and_merge_directly(tmp_path):
    plan = ShardPlan(5, 2)
    assert plan.num_shards == 3 and plan.indices(2) == [4] and plan.shards_of(1, 2) == [1]

    def gen(idx):
        return {"images": np.full((len(idx), 2, 2, 3), idx[0], np.uint8), "labels": np.array(idx)}

    assert run_shards(gen, plan, tmp_path, png=True, progress=False) == [0, 1, 2]
    assert run_shards(gen, plan, tmp_path, png=True, progress=False) == []  # all complete
    assert sorted(p.name for p in (tmp_path / "images").iterdir())[:2] == ["000000.png", "000001.png"]
    merged = np.load(merge_shards(plan, tmp_path))
    assert merged["arr_0"][:, 0, 0, 0].tolist() == [0, 0, 2, 2, 4]
    shard_path(tmp_path, 1).unlink()
    with pytest.raises(ValueError, match="'out_dir'"):
        merge_shards(plan, tmp_path)
    with pytest.raises(ValueError, match="'generate'"):
        run_shards(lambda idx: {"images": np.zeros((1, 2, 2, 3), np.float32)}, plan, tmp_path, progress=False)
    assert class_labels([0, 11], 10).tolist() == [0, 1]
    r = class_labels(range(4), 10, seed=1, mode="random")
    assert torch.equal(r, class_labels(range(4), 10, seed=1, mode="random"))


def test_random_labels_follow_the_seed_not_a_noise_generator(monkeypatch):
    from raekern.sampling import seeding

    idx = list(range(64))
    a = class_labels(idx, 1000, seed=0, mode="random")
    assert torch.equal(a, class_labels(idx, 1000, seed=0, mode="random"))
    assert not torch.equal(a, class_labels(idx, 1000, seed=99, mode="random"))
    assert not torch.equal(a, class_labels(idx, 1000, seed=2**32, mode="random"))
    assert torch.equal(class_labels([5, 63], 1000, seed=0, mode="random"), a[[5, 63]])  # split-invariant
    assert 0 <= int(a.min()) and int(a.max()) < 1000 and len(set(a.tolist())) > 50
    # Labels came from the generator seeded like sample i ^ 0x5A5A's noise; now no torch generator
    # takes part, so a label can never be a draw of some sample's noise generator.
    monkeypatch.setattr(torch, "Generator", None)
    assert torch.equal(class_labels(idx, 1000, seed=0, mode="random"), a)
    monkeypatch.undo()
    old = [int(torch.randint(1000, (1,), generator=seeding.noise_generator(0, i ^ 0x5A5A))) for i in idx]
    assert a.tolist() != old


def test_seed_changes_the_cli_samples(tmp_path):
    base = ["--preset", "tiny-test", "--num", "4", "--batch-size", "4", "--steps", "3", "--labels", "random",
            "--keep-latents", "--no-progress", "--device", "cpu"]
    runs = {}
    for name, seed in (("a", "0"), ("b", "1"), ("c", "0")):
        assert cli.main([*base, "--seed", seed, "--out", str(tmp_path / name)]) == 0
        runs[name] = _merged(tmp_path / name)
    np.testing.assert_array_equal(runs["a"]["latents"], runs["c"]["latents"])
    assert not np.array_equal(runs["a"]["latents"], runs["b"]["latents"])
    assert not np.array_equal(runs["a"]["arr_0"], runs["b"]["arr_0"])
    assert runs["a"]["labels"].tolist() != runs["b"]["labels"].tolist()


def test_a_run_that_wrote_no_shard_does_not_lock_its_folder(tmp_path):
    # internal: needs a two-output model; the tiny preset's fails at the first batch, after the
    # manifest is written and before any shard.
    args = [a for a in ARGS if a not in ("--guidance", "cfg:1.5")]
    with pytest.raises(SystemExit):
        cli.main([*args, "--num", "2", "--guidance", "internal:1.5", "--out", str(tmp_path)])
    assert (tmp_path / "manifest.json").exists() and not list(tmp_path.glob("shards/*.npz"))
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "000001.png").write_bytes(b"left by a run killed between a PNG and its shard")
    assert cli.main([*args, "--num", "2", "--guidance", "cfg:1.5", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "manifest.json").read_text())["guidance"] == ["cfg:1.5"]
    assert not (tmp_path / "images" / "000001.png").exists()  # no stale image beside the new run's
    # once a shard exists, other settings are refused
    with pytest.raises(SystemExit):
        cli.main([*args, "--num", "2", "--guidance", "cfg:2", "--out", str(tmp_path)])


# -- command line ------------------------------------------------------------------------------------------
def test_help_documents_every_method():
    parser = cli.argparse.ArgumentParser()
    sub = parser.add_subparsers()
    p = cli.add_sample_parser(sub)
    text = p.format_help()
    for m in ("cfg:", "ag:", "gfcg:", "internal:", "apg:", "cfgzero:", "rescale:", "interval:", "none"):
        assert m in text
    assert "U + W·(C − U)" in GUIDANCE_HELP and "w_max·exp(−kappa·(p_y − p_r))" in GUIDANCE_HELP
    args = parser.parse_args(["sample", "--preset", "tiny-test", "--num", "2", "--steps", "3",
                              "--guidance", "karras:1"])
    assert args.fn(args) == 2  # `raekern sample` dispatches through args.fn; errors are one line


@pytest.mark.parametrize("guidance", [["ag:1.4"], ["gfcg:w_max=2,kappa=4,mode=cfg_substitute,cfg=1.5"],
                                      ["cfg:1.5", "interval:0.2,0.9"], ["none"]])
def test_cli_guidance_methods_run(tmp_path, guidance):
    g = sum((["--guidance", s] for s in guidance), [])
    assert cli.main(["--preset", "tiny-test", "--num", "3", "--batch-size", "3", "--steps", "4", *g,
                     "--no-progress", "--device", "cpu", "--png", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "grid.png").exists() and (tmp_path / "images" / "000002.png").exists()


def test_cli_config_file_and_labels(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"preset": "tiny-test", "num": 4, "batch-size": 4, "steps": 3,
                               "guidance": "cfg:2", "labels": "3,7"}))
    out = tmp_path / "o"
    assert cli.main(["--config", str(cfg), "--no-progress", "--device", "cpu", "--num", "2", "--out", str(out)]) == 0
    m = _merged(out)
    assert m["arr_0"].shape[0] == 2 and m["labels"].tolist() == [3, 7]  # --num on the command line wins
    assert json.loads((out / "manifest.json").read_text())["guidance"] == ["cfg:2"]


def test_cli_flags_win_over_the_config_even_at_their_defaults(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"preset": "tiny-test", "seed": 5, "num": 3, "solver": "heun", "steps": 2}))
    out = tmp_path / "o"
    assert cli.main(["--config", str(cfg), "--seed", "0", "--num", "2", "--solver", "euler", "--no-progress",
                     "--device", "cpu", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["seed"], m["solver"], m["num_samples"]) == (0, "euler", 2)


@pytest.mark.parametrize("preset", ["tiny-test", "digits"])
@pytest.mark.parametrize("flag", ["--dtype", "--model-dtype"])
def test_cli_bf16(tmp_path, preset, flag):
    from raekern.sampling.presets import PRESETS
    if preset not in PRESETS:
        pytest.skip(f"preset {preset!r} is not part of this build")
    assert cli.main(["--preset", preset, "--num", "2", "--steps", "3", flag, "bf16", "--no-progress",
                     "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert _merged(tmp_path)["arr_0"].shape[0] == 2


@pytest.mark.parametrize("spec", ["apg:3,beta=-0.5", "cfg:1.5,interval=0.2", "gfcg:w_max=2,kapa=3",
                                  "cfgzero:3,steps=2.7", "none:2", "interval:0.1,0.5,lo=1",
                                  "cfgzero:2,steps=inf", "cfgzero:2,steps=nan", "cfgzero:2,steps=-1",
                                  "gfcg:5,0.5", "gfcg:3,w_max=2"])
def test_guidance_spec_typos_are_errors(spec):
    with pytest.raises(ValueError, match="'guidance'"):
        build_policy([spec], classifier=lambda x: x)


@pytest.mark.parametrize("specs", [["cfg:1.5", "interval:0.1,0.2", "interval:0.5,0.9"],
                                   ["cfg:1.5", "rescale:0.3", "rescale:0.9"]])
def test_a_repeated_spec_is_an_error(specs):
    method = specs[1].split(":")[0]
    with pytest.raises(ValueError, match=f"'guidance'.*{method}: twice"):
        build_policy(specs)


@pytest.mark.parametrize("steps", [0, -3])
def test_steps_zero_is_an_error_not_the_default(tmp_path, steps):
    with pytest.raises(SystemExit):
        cli.main([*ARGS, "--num", "2", "--steps", str(steps), "--out", str(tmp_path)])
    from raekern.sampling.presets import get_preset
    with pytest.raises(ValueError, match="'--steps'"):
        get_preset("tiny-test").build({"steps": steps})
    with pytest.raises(ValueError, match="'--steps'.*>= 2 for grid 'rae'"):
        get_preset("tiny-test").build({"steps": 1, "grid": "rae"})


def _config_error(tmp_path, cfg: dict, capsys) -> str:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    args = cli.argparse.ArgumentParser()
    sub = args.add_subparsers()
    cli.add_sample_parser(sub)
    ns = args.parse_args(["sample", "--config", str(path), "--out", str(tmp_path / "o"), "--no-progress",
                          "--device", "cpu"])
    capsys.readouterr()  # drop what earlier runs wrote
    assert ns.fn(ns) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


@pytest.mark.parametrize("cfg, key", [({"num": "four"}, "num"), ({"dtype": "bfloat"}, "dtype"),
                                      ({"labels": [1, 2]}, "labels"), ({"png": "false"}, "png"),
                                      ({"steps": 4.5}, "steps"), ({"solver": "rk4"}, "solver"),
                                      ({"guidance": ["cfg:2", 3]}, "guidance"), ({"keep_latents": 1}, "keep_latents")])
def test_config_values_are_checked_like_the_flags(tmp_path, capsys, cfg, key):
    err = _config_error(tmp_path, {"preset": "tiny-test", **cfg}, capsys)
    assert "'--config'" in err and repr(key) in err


def test_config_takes_the_flag_spellings_and_converts_like_the_command_line(tmp_path, capsys):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"preset": "tiny-test", "num-samples": "3", "batch_size": 2,
                               "keep-latents": True, "png": False, "steps": None, "seed": None, "dtype": None}))
    out = tmp_path / "o"
    assert cli.main(["--config", str(cfg), "--no-progress", "--device", "cpu", "--out", str(out)]) == 0
    m = _merged(out)
    assert m["arr_0"].shape[0] == 3 and "latents" in m and not (out / "images").exists()
    assert json.loads((out / "manifest.json").read_text())["steps"] == 8  # null: the preset's default
    assert "sets num twice" in _config_error(tmp_path, {"num": 3, "num-samples": 2}, capsys)
    assert "unknown option 'config'" in _config_error(tmp_path, {"config": "x.json"}, capsys)


def test_cli_missing_checkpoint_is_one_error_line(tmp_path, capsys):
    args = cli.argparse.ArgumentParser()
    cli.add_sample_parser(args.add_subparsers())
    ns = args.parse_args(["sample", "--preset", "rae-v1-256", "--ckpt", str(tmp_path / "nope.pt"), "--out",
                          str(tmp_path / "o"), "--no-progress", "--device", "cpu"])
    capsys.readouterr()
    assert ns.fn(ns) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope.pt" in err, err


def test_cli_errors_name_the_argument(tmp_path):
    ns = lambda *a: cli.argparse.Namespace(**{**cli._defaults(), "out": str(tmp_path), "preset": "tiny-test",  # noqa: E731
                                              "device": "cpu", "no_progress": True, **dict(a)})
    with pytest.raises(ValueError, match="'guidance'"):
        cli.run_sample(ns(("guidance", ["karras:2"])))
    with pytest.raises(ValueError, match="'guidance'"):
        cli.run_sample(ns(("guidance", ["cfg:1.5", "ag:2"])))
    with pytest.raises(ValueError, match="'--labels'"):
        cli.run_sample(ns(("labels", "3,99")))
    with pytest.raises(ValueError, match="'--preset'"):
        cli.run_sample(ns(("preset", "nope")))
    with pytest.raises(ValueError, match="'--num'"):
        cli.run_sample(ns(("num", 0)))
    with pytest.raises(ValueError, match="'--ckpt'"):
        cli.run_sample(ns(("preset", "rae-v1-256")))
    assert describe(["gfcg:w_max=3", "rescale:0.5"])["rescale"] == 0.5
