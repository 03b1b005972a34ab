"""What the machine can do, measured in the same run as the kernels: copy bandwidth (the bar
for memory-bound ops) and, on GPU, a large bf16 GEMM (the practical tensor-core peak)."""
from __future__ import annotations

import os
import platform
import subprocess
import time

import torch


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn, device: str, *, min_time: float = 0.2, repeats: int = 5, warmup: int = 2) -> float:
    """Median seconds per call. Each repeat runs enough calls to last min_time/repeats."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    one = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, int(min_time / repeats / one))
    samples = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) / inner)
    samples.sort()
    return samples[len(samples) // 2]


_FLUSH: dict[str, torch.Tensor] = {}


def _flush_buffer(device) -> torch.Tensor:
    """256 MiB, more than any GPU's L2 (50 MB on H100/H200): reading it evicts a case's inputs."""
    key = str(torch.device(device))
    if key not in _FLUSH:
        _FLUSH[key] = torch.zeros(64 << 20, dtype=torch.float32, device=device)
    return _FLUSH[key]


def _flush_l2(buf: torch.Tensor, sink: torch.Tensor) -> None:
    """Evict the L2 by reading `buf`, not by writing it: a zeroing flush (the first H200 run's) leaves
    the L2 full of dirty lines, and the timed kernel then pays their write-back, up to ~50 MB of DRAM
    writes, which is several µs on ops that move 10-100 MB."""
    torch.sum(buf, dim=0, out=sink)


def time_cuda_graph(fn, device: str, *, min_time: float = 0.2, repeats: int = 5, warmup: int = 2,
                    flush_l2: bool = True, max_reps: int = 2000) -> float:
    """Median device seconds per call of fn, replayed from a CUDA graph with the L2 flushed (read) before
    each replay, each timed by CUDA events. Back-to-back Python calls would time the host: a fused op's
    Python wrapper costs tens of µs, more than many of these kernels (a few µs at 4 TB/s), and inputs
    that fit the 50 MB L2 would be read from it. Raises if fn cannot be captured (a host sync inside);
    the caller then times the host loop (time_fn)."""
    dev = torch.device(device)
    cur = torch.cuda.current_stream(dev)
    side = torch.cuda.Stream(dev)
    side.wait_stream(cur)
    with torch.cuda.stream(side):  # warm-up off the capture stream (allocator, cuBLAS workspaces)
        for _ in range(max(1, warmup)):
            fn()
    cur.wait_stream(side)
    torch.cuda.synchronize(dev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize(dev)
    buf = _flush_buffer(dev) if flush_l2 else None
    sink = torch.empty((), dtype=torch.float32, device=dev)

    def replay():
        if buf is not None:
            _flush_l2(buf, sink)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        return start, end

    start, end = replay()
    torch.cuda.synchronize(dev)
    one = max(start.elapsed_time(end) / 1e3, 1e-6)
    reps = int(min(max_reps, max(repeats, min_time / max(one, 5e-5))))
    events = [replay() for _ in range(reps)]
    torch.cuda.synchronize(dev)
    times = sorted(a.elapsed_time(b) / 1e3 for a, b in events)
    del graph
    return times[len(times) // 2]


def measure_copy_bandwidth(device: str = "cpu", nbytes: int | None = None) -> float:
    """GB/s of a large out-of-cache copy, counting bytes read + bytes written."""
    if nbytes is None:
        nbytes = (1 << 30) if device.startswith("cuda") else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, min_time=0.5)
    return 2 * nbytes / t / 1e9


_COPY_SAME: dict[tuple[str, int], float] = {}


def time_copy_same_size(nbytes: int, device: str, min_time: float = 0.1) -> float:
    """Device seconds of a copy moving `nbytes` in total (nbytes/2 read + nbytes/2 written), timed as the
    GPU cases are (CUDA-graph replay, L2 flushed). The bar a memory-bound op of that size can reach:
    at the 5-50 MB of the issue shapes a copy itself stays well below the large-copy bandwidth (launch
    and ramp-up are a few µs at 4 TB/s), so "% of copy bandwidth" alone mixes the kernel's quality with
    the size of the problem. Cached per size."""
    key = (str(torch.device(device)), int(nbytes))
    if key not in _COPY_SAME:
        n = max(1, int(nbytes) // 8)  # float32 elements per side
        src = torch.ones(n, dtype=torch.float32, device=device)
        dst = torch.empty_like(src)
        _COPY_SAME[key] = time_cuda_graph(lambda: dst.copy_(src), device, min_time=min_time)
        del src, dst
    return _COPY_SAME[key]


def measure_gemm_tflops(device: str = "cuda", n: int = 8192, dtype=torch.bfloat16) -> float:
    """Practical dense peak: one large square GEMM."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: a @ b, device, min_time=1.0)
    return 2 * n**3 / t / 1e12


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_facts() -> dict:
    if not torch.cuda.is_available():
        return {}
    p = torch.cuda.get_device_properties(0)
    facts = {"gpu": p.name, "gpu_memory_gib": round(p.total_memory / 2**30, 1),
             "sm_count": p.multi_processor_count, "capability": f"{p.major}.{p.minor}"}
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,driver_version",
                            "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        facts["nvidia_smi"] = q.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return facts


def machine_facts(device: str) -> dict:
    from raekern._utils.library import build_info
    from raekern._utils.switches import active_switches

    facts = {
        "host": platform.node(),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "raekern_build": build_info(),
        "switches": active_switches(),  # kernel choices that differ from the defaults
    }
    if device.startswith("cuda"):
        facts.update(gpu_facts())
    return facts
