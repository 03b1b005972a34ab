"""The run-time environment switches raekern reads: what each selects, for `raekern info`, the bench's
machine facts and the docs. tests (test_library.py) check this list against every variable the
sources read, so a new switch cannot go unlisted."""
from __future__ import annotations

import os

# name -> what setting it does (unset: the default the library picks)
SWITCHES: dict[str, str] = {
    "RAEKERN_CUDA_ATTENTION": "1: raekern's CUDA attention for every eligible call; 0: SDPA always "
                              "(unset: fused QK-norm/RoPE/mask calls raekern, plain calls SDPA)",
    "RAEKERN_CUDA_ATTENTION_BACKWARD": "1: CUDA training calls use raekern's backward (unset: only in "
                                       "deterministic mode)",
    "RAEKERN_ATTENTION_FWD": "rows16: the CUDA attention forward's one-m-tile configs (measured on the "
                             "H200, 2026-11-30)",
    "RAEKERN_ATTENTION_AMX": "0: no AMX / AVX512-BF16 kernels for CPU bf16 attention; 1: the AVX512-BF16 "
                             "vector kernels on Intel CPUs without AMX too (unset: AMX where the OS grants "
                             "it, else vdpbf16ps on non-Intel CPUs, fp32 kernels on Intel)",
    "RAEKERN_NORM_FORWARD": "block: the CUDA norm forward's block-per-row kernel",
    "RAEKERN_NORM_BACKWARD": "block: the CUDA norm backward's block kernel",
    "RAEKERN_FUSION_KERNEL": "block: the CUDA fusion ops' block kernels (not warp-per-token)",
    "RAEKERN_GUIDANCE_COMBINE": "generic: the CUDA guidance output pass's generic loop",
    "RAEKERN_CPU_STREAM_BYTES": "output bytes from which CPU kernels use non-temporal stores "
                                "(unset: per family, 4-8 MiB)",
    "RAEKERN_CPU_OUTPUT_CACHE_MB": "MiB of freed large (>= 32 MiB) CPU outputs kept for reuse; 0: none "
                                   "(unset: 1024)",
    "RAEKERN_CPU_LINEAR": "onednn / torch: the GEMM of the raekern model backend's fp32 CPU Linears when "
                          "no gradient is needed (unset: oneDNN on AMD CPUs, torch's MKL path elsewhere)",
    "RAEKERN_DIST_TIMEOUT_S": "seconds a distributed sampling rank waits for a peer (unset: 1800)",
}


def active_switches() -> dict[str, str]:
    """The switches set in this process's environment, with their values."""
    return {k: os.environ[k] for k in SWITCHES if k in os.environ}
