#!/usr/bin/env python3
"""Read a CUDA build log made with -Xptxas -v and fail on what must never ship:
register spills in a kernel (every raekern kernel counts as hot unless listed in
tools/ptxas_allow_spills.txt by mangled-name substring, with a reason) and ptxas warnings
C7510 / C7508 (wgmma serialisation / insufficient registers for wgmma pipelining).

Usage: check_ptxas.py BUILD_LOG [--report out.txt]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPS = re.compile(r"Function properties for (\S+)")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
REGS = re.compile(r"Used (\d+) registers")
BAD_WARN = re.compile(r"warning.*\b(C7510|C7508)\b|\b(C7510|C7508)\b.*warning", re.I)


def demangle(names: list[str]) -> dict[str, str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                             check=True).stdout.splitlines()
        return dict(zip(names, out))
    except (OSError, subprocess.CalledProcessError):
        return {n: n for n in names}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--report")
    args = ap.parse_args()
    text = Path(args.log).read_text(errors="ignore").splitlines()
    allow_file = Path(__file__).with_name("ptxas_allow_spills.txt")
    allow = []
    if allow_file.exists():
        allow = [ln.split("#")[0].strip() for ln in allow_file.read_text().splitlines()]
        allow = [a for a in allow if a]

    kernels: dict[tuple[str, str], dict] = {}
    current = None
    arch = None
    warnings = []
    for line in text:
        m = ENTRY.search(line)
        if m:
            current, arch = m.group(1), m.group(2)
            kernels[(current, arch)] = {"regs": None, "spill_st": 0, "spill_ld": 0, "stack": 0}
            continue
        m = PROPS.search(line)
        if m and arch is not None:
            if (m.group(1), arch) in kernels:
                current = m.group(1)
            else:
                current = None  # a device function, not an entry
            continue
        m = SPILL.search(line)
        if m and current is not None and (current, arch) in kernels:
            k = kernels[(current, arch)]
            k["stack"], k["spill_st"], k["spill_ld"] = (int(g) for g in m.groups())
            continue
        m = REGS.search(line)
        if m and current is not None and (current, arch) in kernels:
            kernels[(current, arch)]["regs"] = int(m.group(1))
        if BAD_WARN.search(line):
            warnings.append(line.strip())

    names = demangle(sorted({k for k, _ in kernels}))
    lines, failures = [], []
    for (name, a), k in sorted(kernels.items(), key=lambda kv: (names[kv[0][0]], kv[0][1])):
        pretty = names[name]
        row = f"{a:7s} regs={k['regs']!s:>4} stack={k['stack']:>5} spill_st={k['spill_st']:>5} " \
              f"spill_ld={k['spill_ld']:>5}  {pretty[:160]}"
        lines.append(row)
        if (k["spill_st"] or k["spill_ld"]) and not any(s in name or s in pretty for s in allow):
            failures.append("spill: " + row)
    failures += ["ptxas warning: " + w for w in warnings]
    summary = f"{len(kernels)} kernel compilations checked, {len(failures)} problem(s)"
    report = "\n".join(lines + ["", summary] + failures)
    if args.report:
        Path(args.report).write_text(report + "\n")
    print(report)
    if not kernels:
        print("check_ptxas: no kernels found in the log (was -Xptxas -v lost?)", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
