"""The benchmark tooling itself (issue #9): `raekern bench` writes its table, JSON and chart, and the
CPU-side steps of benchmarks/gpu_check.sh run and report failures. Timings are never asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, env=None, timeout=900):
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_raekern_bench_writes_table_json_and_chart(tmp_path):
    # The sampling family: real cases, no torch.compile baseline, so the run stays short.
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    r = _run([sys.executable, "-m", "raekern.cli", "bench", "--device", "cpu", "--family", "sampling",
              "--dtype", "fp32", "--min-time", "0.01", "--json", str(js), "--plot", str(png)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "copy bandwidth" in r.stdout and "vs eager" in r.stdout
    data = json.loads(js.read_text())
    assert data["copy_bandwidth_gbps"] > 0
    assert data["machine"]["cpu"] and data["machine"]["torch"]
    assert "sampling" in json.dumps(data["families"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_raekern_bench_refuses_bad_flags_before_measuring():
    for flags, arg in ((["--min-time", "nan"], "--min-time"), (["--min-time", "inf"], "--min-time"),
                       (["--dtype", "fp64"], "--dtype")):  # fp64: no family has cases, it ran nothing
        r = _run([sys.executable, "-m", "raekern.cli", "bench", "--device", "cpu", *flags], timeout=120)
        assert r.returncode == 2 and f"argument {arg}" in r.stderr, r.stdout + r.stderr
        assert "copy bandwidth" not in r.stdout


def test_gpu_check_cpu_rehearsal_writes_every_output(tmp_path):
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", GPU_CHECK_SKIP_BUILD="1", PYTHON=sys.executable)
    r = _run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("summary.txt", "tests.log", "tests.xml", "bench.log", "bench.json", "bench.png"):
        assert (tmp_path / name).is_file(), name
    summary = (tmp_path / "summary.txt").read_text()
    assert "tests: rc=0" in summary and "bench: rc=0" in summary and "failed: none" in summary
    assert "profile: rc=0" in summary and "raekern::guidance_step" in (tmp_path / "bench.log").read_text()


def test_gpu_check_exits_nonzero_and_names_the_failed_steps(tmp_path):
    env = dict(os.environ, GPU_CHECK_DEVICE="cpu", GPU_CHECK_SKIP_BUILD="1", PYTHON="false")
    r = _run(["bash", "benchmarks/gpu_check.sh", str(tmp_path)], env=env, timeout=120)
    assert r.returncode != 0
    assert "failed: tests bench" in (tmp_path / "summary.txt").read_text()


def test_bench_time_budget_and_a_broken_family_keep_the_rest(tmp_path, monkeypatch):
    """The device run has a hard limit: with --time-budget no case starts late, a family whose cases
    cannot be built is reported, and the JSON written so far holds every measured case."""
    from raekern.bench import registry, runner

    def broken(device, quick):
        raise RuntimeError("no such model on this device")

    monkeypatch.setitem(registry._REGISTRY, "zz_broken", broken)
    js = tmp_path / "b.json"
    res = runner.run(["zz_broken", "sampling"], "cpu", ["fp32"], quick=True, min_time=0.01, json_path=str(js),
                     plot_path=None, quiet=True, time_budget=1e-9)
    data = json.loads(js.read_text())
    assert "no such model" in data["not_run"]["zz_broken"]
    assert "time budget" in data["not_run"]["sampling"] and data["families"]["sampling"] == []
    assert res["not_run"] == data["not_run"]
    r = _run([sys.executable, "-m", "raekern.cli", "bench", "--device", "cpu", "--time-budget", "0"], timeout=120)
    assert r.returncode == 2 and "argument --time-budget" in r.stderr


def test_bench_interrupt_keeps_measured_cases_and_skip_drops_baselines(tmp_path, monkeypatch):
    """SIGINT (the device step's time limit) inside a case ends the run with its tables and JSON; --skip
    leaves the named implementations untimed."""
    import torch
    from raekern.bench import registry, runner

    def stop():
        raise KeyboardInterrupt

    def fam(device, quick):
        mk = lambda impls: registry.Case("zz", f"c{len(impls)}", "s", torch.float32, impls)  # noqa: E731
        return [mk({"raekern": lambda: None, "eager": lambda: None, "compile": stop}), mk({"raekern": stop})]

    monkeypatch.setitem(registry._REGISTRY, "zz_fam", fam)
    js = tmp_path / "b.json"
    res = runner.run(["zz_fam"], "cpu", ["fp32"], quick=True, min_time=0.001, json_path=str(js), plot_path=None,
                     quiet=True, skip=("compile",))
    data = json.loads(js.read_text())
    first = data["families"]["zz_fam"][0]
    assert set(first["times"]) == {"raekern", "eager"} and data["skipped_impls"] == ["compile"]
    assert "interrupted" in res and "c1" in res["interrupted"] and len(data["families"]["zz_fam"]) == 1


def test_gpu_cases_use_one_timing_for_every_implementation(monkeypatch):
    """On a GPU a case is timed from CUDA-graph replays; if one implementation cannot be captured, the
    whole case falls back to the host loop (ratios never mix device and host times), while one that
    cannot run at all is an error of its own. (The graph timer itself needs a GPU: gpu_check runs it.)"""
    import torch
    from raekern.bench import registry, runner

    def graph_timer(fn, device, **kw):
        if getattr(fn, "host_sync", False):
            raise RuntimeError("operation not permitted when stream is capturing")
        fn()
        return 1e-5

    monkeypatch.setattr(runner, "time_cuda_graph", graph_timer)
    monkeypatch.setattr(runner, "time_fn", lambda fn, device, **kw: (fn(), 2e-5)[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)

    def broken():
        raise ValueError("shape unsupported")

    syncing = lambda: None  # noqa: E731
    syncing.host_sync = True
    case = lambda **impls: registry.Case("x", "n", "s", torch.float32, impls)  # noqa: E731
    row = runner.run_case(case(raekern=lambda: 1, eager=lambda: 2, sdpa=broken), "cuda", 0.01)
    assert row["times"] == {"raekern": 1e-5, "eager": 1e-5} and "sdpa" in row["errors"]
    assert row["timing"].startswith("device time")
    row = runner.run_case(case(raekern=lambda: 1, eager=syncing), "cuda", 0.01)
    assert row["times"] == {"raekern": 2e-5, "eager": 2e-5} and row["timing"] == "host loop"
    assert row["host_timed"].startswith("eager: RuntimeError")
    slow = registry.Case("x", "n", "s", torch.float32, {"raekern": lambda: 1}, cuda_graph=False)
    assert runner.run_case(slow, "cuda", 0.01)["timing"] == "host loop"


def test_gpu_memory_bound_cases_report_a_copy_of_the_same_bytes(monkeypatch):
    """GPU rows of memory-bound cases carry the time of a copy moving the same bytes, timed the same way,
    and the table shows the op's fraction of it; a reference that cannot be timed is reported, not fatal.
    (Fakes only: the graph timer itself needs a GPU.)"""
    import torch
    from raekern.bench import registry, runner

    monkeypatch.setattr(runner, "time_cuda_graph", lambda fn, device, **kw: (fn(), 4e-5)[1])
    monkeypatch.setattr(runner, "time_copy_same_size", lambda nbytes, device: nbytes / 4e12)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    case = registry.Case("x", "op", "s", torch.float32, {"raekern": lambda: 1, "eager": lambda: 2}, bytes=80_000_000)
    row = runner.run_case(case, "cuda", 0.01)
    runner.derive(row, 4000.0, None)
    assert row["copy_same_s"] == 2e-5 and abs(row["pct_copy_same_size"] - 50.0) < 1e-9
    assert "%copy@size" in runner.format_table([row]) and "50%" in runner.format_table([row])

    def broken(nbytes, device):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runner, "time_copy_same_size", broken)
    row = runner.run_case(case, "cuda", 0.01)
    runner.derive(row, 4000.0, None)
    assert "copy_same_size" in row["errors"] and "pct_copy_same_size" not in row
    cpu = runner.run_case(registry.Case("x", "op", "s", torch.float32, {"raekern": lambda: 1}, bytes=8), "cpu", 0.01)
    assert "copy_same_s" not in cpu and "%copy@size" not in runner.format_table([cpu])
