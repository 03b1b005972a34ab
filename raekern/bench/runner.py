"""`raekern bench`: time every case of the chosen families, print a table per family, write JSON and
a bar chart. Ratios are measured in the same run: "speedup vs X" = time(X) / time(raekern)."""
from __future__ import annotations

import datetime as _dt
import json
import math
import sys
import time
from pathlib import Path

import torch

from raekern.bench import registry
from raekern.bench.machine import (machine_facts, measure_copy_bandwidth, measure_gemm_tflops, time_copy_same_size,
                                   time_cuda_graph, time_fn)

ROUNDS = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


def _progress(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


class _Uncapturable(Exception):
    """An implementation that runs but cannot be captured into a CUDA graph."""


def _graph_time(impl: str, fn, device: str, min_time: float, repeats: int, warmup: int) -> float:
    try:
        return time_cuda_graph(fn, device, min_time=min_time, repeats=repeats, warmup=warmup)
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize()
        fn()  # one that cannot run at all is an error of its own (raised here), not a capture problem
        raise _Uncapturable(f"{impl}: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}") from e


def run_case(case: registry.Case, device: str, min_time: float, skip: tuple[str, ...] = ()) -> dict:
    """Times every implementation of `case` except those whose name contains one of `skip`."""
    row = {"id": case.id, "family": case.family, "name": case.name, "shape": case.shape,
           "dtype": str(case.dtype).replace("torch.", ""), "bytes": case.bytes, "flops": case.flops,
           "notes": case.notes, "times": {}, "errors": {}}
    # Implementations take turns over ROUNDS rounds and each keeps its best round's median: a burst of
    # outside load (a shared VM, a compile worker finishing) then lands on every implementation instead
    # of skewing one ratio, which timing each implementation in one block did (first-case outliers).
    rounds, warmup, repeats = case.timing or (ROUNDS, 2, 3)

    def measure(graph: bool) -> dict[str, float]:
        best: dict[str, float] = {}
        row["errors"].clear()
        for r in range(rounds):
            for impl, fn in case.impls.items():
                if impl in row["errors"] or any(k in impl for k in skip):
                    continue
                try:
                    if graph:
                        t = _graph_time(impl, fn, device, min_time / rounds, repeats, max(warmup, 1))
                    else:
                        t = time_fn(fn, device, min_time=min_time / rounds, repeats=repeats,
                                    warmup=warmup if r == 0 else 0)
                    best[impl] = min(best.get(impl, math.inf), t)
                except _Uncapturable:
                    raise
                except Exception as e:  # a baseline that cannot run this shape is reported, not fatal
                    row["errors"][impl] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return best

    # On a GPU every implementation of a case is timed the same way: device time from CUDA-graph replays
    # or, when one of them cannot be captured (a host sync inside), the host loop for all of them.
    use_graph = device.startswith("cuda") and case.cuda_graph
    try:
        best = measure(use_graph)
    except _Uncapturable as u:
        row["host_timed"], use_graph = str(u), False
        best = measure(False)
    row["times"] = {k: v for k, v in best.items() if k not in row["errors"]}
    if device.startswith("cuda"):
        row["timing"] = "device time: CUDA-graph replay, L2 flushed" if use_graph else "host loop"
        if use_graph and case.bytes and "raekern" in row["times"]:
            try:  # the same-size copy, timed the same way (see time_copy_same_size)
                row["copy_same_s"] = time_copy_same_size(case.bytes, device)
            except Exception as e:  # noqa: BLE001 - a reference that cannot be timed is reported, not fatal
                row["errors"]["copy_same_size"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return row


def derive(row: dict, bandwidth: float, peak_tflops: float | None) -> None:
    t = row["times"]
    rk = t.get("raekern")
    row["speedup"] = {k: v / rk for k, v in t.items() if rk and k != "raekern"}
    if rk and row["bytes"]:
        row["gbps"] = row["bytes"] / rk / 1e9
        row["pct_bandwidth"] = 100 * row["gbps"] / bandwidth
        if row.get("copy_same_s"):
            row["pct_copy_same_size"] = 100 * row["copy_same_s"] / rk
    if rk and row["flops"]:
        row["tflops"] = row["flops"] / rk / 1e12
        if peak_tflops:
            row["pct_peak"] = 100 * row["tflops"] / peak_tflops


def format_table(rows: list[dict]) -> str:
    baselines = sorted({k for r in rows for k in r.get("speedup", {})})
    same = any("pct_copy_same_size" in r for r in rows)  # GPU runs: vs a copy of the same bytes
    head = (["case", "shape", "dtype", "raekern", "GB/s|TF/s", "%bw|%peak"] + (["%copy@size"] if same else [])
            + [f"vs {b}" for b in baselines])
    body = []
    for r in rows:
        rk = r["times"].get("raekern")
        rate = f"{r['gbps']:.1f}" if "gbps" in r else (f"{r['tflops']:.3f}" if "tflops" in r else "-")
        pct = r.get("pct_bandwidth", r.get("pct_peak"))
        cells = [r["name"], r["shape"], r["dtype"], f"{rk * 1e6:.1f}us" if rk else "ERR", rate,
                 f"{pct:.0f}%" if pct is not None else "-"]
        if same:
            cs = r.get("pct_copy_same_size")
            cells.append(f"{cs:.0f}%" if cs is not None else "-")
        for b in baselines:
            s = r.get("speedup", {}).get(b)
            cells.append(f"{s:.2f}x" if s else ("err" if b in r["errors"] else "-"))
        body.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in body])


def plot(rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    baselines = sorted({k for r in rows for k in r.get("speedup", {})})
    labels = [f"{r['name']} {r['shape']} {r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(10, max(3, 0.32 * len(rows) * max(1, len(baselines)) / 2 + 1.5)))
    h = 0.8 / max(1, len(baselines))
    for i, b in enumerate(baselines):
        vals = [r.get("speedup", {}).get(b, math.nan) for r in rows]
        ax.barh([y + i * h for y in range(len(rows))], vals, height=h, label=f"vs {b}")
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks([y + h * (len(baselines) - 1) / 2 for y in range(len(rows))])
    ax.set_yticklabels(labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup of raekern (time of baseline / time of raekern), >1 is faster")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_json(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str))
    tmp.replace(path)


def run(families: list[str] | None, device: str, dtypes: list[str], quick: bool, min_time: float,
        json_path: str | None, plot_path: str | None, quiet: bool = False,
        time_budget: float | None = None, skip: tuple[str, ...] = ()) -> dict:
    """Every case of `families`; with `time_budget` (seconds), no case starts after that much time and
    the tables, JSON and plot still cover what was measured. The JSON is rewritten after every case, so
    a run stopped from outside keeps it too; a family whose cases cannot be built is reported and
    skipped, not fatal to the others."""
    t_start = time.perf_counter()
    fams = families or registry.families()
    facts = machine_facts(device)
    _progress(f"raekern bench on {facts['cpu'] if device == 'cpu' else facts.get('gpu')}: "
              f"measuring copy bandwidth ...", quiet)
    bw = measure_copy_bandwidth(device)
    peak = measure_gemm_tflops(device) if device.startswith("cuda") else None
    result = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": facts, "skipped_impls": list(skip),
              "copy_bandwidth_gbps": bw, "gemm_bf16_tflops": peak, "families": {}}
    print(f"copy bandwidth: {bw:.1f} GB/s" + (f", bf16 GEMM: {peak:.0f} TFLOP/s" if peak else ""))
    all_rows = []
    result["not_run"] = {}
    for fam in fams:
        try:
            cs = [c for c in registry.cases(fam, device, quick) if c.dtype in [DTYPES[d] for d in dtypes]]
        except Exception as e:  # noqa: BLE001 - one family's set-up must not cost the others
            result["not_run"][fam] = f"cases could not be built: {type(e).__name__}: {e}"
            print(f"\n== {fam} ({device}) ==\n(cases could not be built: {type(e).__name__}: {e})")
            continue
        rows = []
        result["families"][fam] = rows
        for i, c in enumerate(cs):
            if time_budget is not None and time.perf_counter() - t_start > time_budget:
                result["not_run"][fam] = f"{len(cs) - i} of {len(cs)} cases: time budget {time_budget:g} s spent"
                break
            _progress(f"  [{fam} {i + 1}/{len(cs)}] {c.name} {c.shape} {c.dtype}", quiet)
            try:
                row = run_case(c, device, min_time, skip)
            except KeyboardInterrupt:  # SIGINT (a time limit): keep and report what was measured
                result["interrupted"] = f"during {fam}: {c.name} {c.shape}"
                result["not_run"][fam] = f"{len(cs) - i} of {len(cs)} cases: interrupted"
                break
            derive(row, bw, peak)
            rows.append(row)
            if json_path:  # after every case: a run stopped from outside keeps what it measured
                _write_json(json_path, result)
        all_rows += rows
        print(f"\n== {fam} ({device}) ==")
        print(format_table(rows) if rows else "(no cases)")
        for r in rows:
            for impl, err in r["errors"].items():
                print(f"   note: {r['name']} {r['shape']} {r['dtype']}: {impl} failed: {err}")
        if "interrupted" in result:
            break
    for fam, why in result["not_run"].items():
        print(f"not run: {fam}: {why}")
    if json_path:
        _write_json(json_path, result)
        print(f"\nwrote {json_path}")
    if plot_path and all_rows:
        Path(plot_path).parent.mkdir(parents=True, exist_ok=True)
        plot(all_rows, plot_path, f"raekern {device} - {facts.get('gpu', facts['cpu'])} - "
                                  f"torch {facts['torch']} - {result['date'][:10]}")
        print(f"wrote {plot_path}")
    return result
