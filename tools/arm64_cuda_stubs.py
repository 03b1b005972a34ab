"""Stand-in CUDA libraries for running an aarch64 CUDA build of torch on a machine with no GPU.

PyPI's aarch64 torch wheels are CUDA builds whose libraries link against libcudart, cuBLAS, cuDNN,
NCCL, ... (pip packages that a mirror may lack). For CPU-only tests under qemu-user, this writes a
shared library for each one that is missing, with its SONAME, its symbol versions and every symbol
torch's libraries import from it. Each function returns 100 (cudaErrorNoDevice), so torch sees no
GPU; the Python loader binds eagerly, hence every imported symbol is defined.

usage: python arm64_cuda_stubs.py TORCH_DIR SYSROOT OUT_DIR   (needs aarch64-linux-gnu-{readelf,gcc})
"""
import collections
import glob
import os
import re
import subprocess
import sys

READELF, CC = "aarch64-linux-gnu-readelf", "aarch64-linux-gnu-gcc"
# Calls torch makes while deciding that there is no GPU: they must answer sensibly, not just fail.
SPECIAL = {
    "cudaGetDeviceCount": "int cudaGetDeviceCount(int* n) { if (n) *n = 0; return 100; }",
    "cudaGetErrorString": 'const char* cudaGetErrorString(int e) { (void)e; return "no CUDA device (stub library)"; }',
    "cudaGetErrorName": 'const char* cudaGetErrorName(int e) { (void)e; return "cudaErrorNoDevice"; }',
    "cudaGetLastError": "int cudaGetLastError(void) { return 0; }",
    "cudaPeekAtLastError": "int cudaPeekAtLastError(void) { return 0; }",
}


def readelf(*args):
    return subprocess.run([READELF, "-W", *args], capture_output=True, text=True, check=True).stdout


def dyn_symbols(path):
    """(name, version or None, type, bind, undefined) for each dynamic symbol."""
    for line in readelf("--dyn-syms", path).splitlines():
        p = line.split()
        if len(p) >= 8 and p[0].endswith(":"):
            name, _, ver = p[7].partition("@")
            yield name, ver.lstrip("@") or None, p[3], p[4], p[6] == "UND"


def version_owners(path):
    """Version name -> the needed library that defines it (from .gnu.version_r)."""
    owners, lib = {}, None
    for line in readelf("-V", path).splitlines():
        if m := re.search(r"File: (\S+)", line):
            lib = m.group(1)
        elif (m := re.search(r"Name: (\S+)\s+Flags", line)) and lib:
            owners[m.group(1)] = lib
    return owners


def main(torch_dir, sysroot, out):
    os.makedirs(out, exist_ok=True)
    objs = [f for f in glob.glob(f"{torch_dir}/lib/*.so*") + glob.glob(f"{torch_dir}/_C*.so") if os.path.isfile(f)]
    present = {os.path.basename(f) for f in objs}
    system = [f for d in ("lib", "usr/lib") for f in glob.glob(f"{sysroot}/{d}/aarch64-linux-gnu/*.so*")]
    present |= {os.path.basename(f) for f in system}
    defined = {s[0] for f in objs + [f for f in system if os.path.isfile(f)] for s in dyn_symbols(f) if not s[4]}
    stubs = collections.defaultdict(lambda: {"versions": set(), "func": set(), "data": set()})
    for f in objs:
        needed = re.findall(r"\(NEEDED\).*\[(.*)\]", readelf("-d", f))
        missing = [n for n in needed if n not in present]
        if not missing:
            continue
        owners = version_owners(f)
        for lib in missing:
            stubs[lib]  # a library with no imported symbols still has to exist
        for name, ver, typ, bind, und in dyn_symbols(f):
            if not und or bind == "WEAK":
                continue
            lib = owners.get(ver) if ver else (missing[0] if name not in defined else None)
            if lib in missing:
                if ver:
                    stubs[lib]["versions"].add(ver)
                stubs[lib]["data" if typ == "OBJECT" else "func"].add(name)
    for lib, s in sorted(stubs.items()):
        src = [SPECIAL.get(n, f"long {n}(void) {{ return 100; }}") for n in sorted(s["func"])]
        src += [f"char {n}[256];" for n in sorted(s["data"])]
        with open(f"{out}/{lib}.c", "w") as fh:
            fh.write("\n".join(src) + "\n")
        versions = sorted(s["versions"]) or [lib]
        names = sorted(s["func"] | s["data"])
        exported = ("global: " + " ".join(n + ";" for n in names)) if names else ""
        with open(f"{out}/{lib}.map", "w") as fh:
            fh.write(f"{versions[0]} {{ {exported} local: *; }};\n")
            fh.writelines(f"{v} {{ }};\n" for v in versions[1:])  # only their presence is checked
        subprocess.run([CC, "-shared", "-fPIC", "-w", "-o", f"{out}/{lib}", f"{out}/{lib}.c",
                        f"-Wl,-soname,{lib}", f"-Wl,--version-script,{out}/{lib}.map"], check=True)
        print(f"{lib}: {len(s['func'])} functions, {len(s['data'])} data symbols")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
