"""Build raekern._C with CMake + ninja.

torch is taken from the running interpreter (install with --no-build-isolation); it is never a
build requirement, so the extension is always compiled against the torch that will import it.

Environment:
  RAEKERN_CUDA=0|1          force the CUDA sources off / on (default: on when torch has CUDA and nvcc exists)
  TORCH_CUDA_ARCH_LIST      e.g. "8.0;9.0a" (the default)
  RAEKERN_CPU_ARCH          -march value for the CPU kernels (default: native)
  RAEKERN_BUILD_TYPE        Release (default) or Debug
  RAEKERN_EMULATION=1       also build raekern._emu, the host-emulated SIMT CUDA kernels (tests)
  CUDA_HOME                 CUDA toolkit folder (the one whose bin/nvcc is the real compiler)
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cuda_home():
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # The nvcc on PATH may be a wrapper script; ask the real compiler where it lives.
    real = Path(nvcc).resolve()
    text = real.read_text(errors="ignore") if real.stat().st_size < 4096 else ""
    for token in text.split():
        if token.endswith("/bin/nvcc") and Path(token).exists():
            return str(Path(token).parent.parent)
    return str(real.parent.parent)


def _cutlass_include():
    try:
        import cutlass_library  # noqa: F401  (nvidia-cutlass wheel)
    except ImportError:
        return ""
    import cutlass_library
    inc = Path(cutlass_library.__file__).parent / "source" / "include"
    return str(inc) if inc.exists() else ""


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch
        from torch.utils import cpp_extension

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)

        want = os.environ.get("RAEKERN_CUDA")
        cuda_home = _cuda_home()
        have_cuda = torch.version.cuda is not None and cuda_home is not None
        if want == "1" and not have_cuda:
            raise RuntimeError(
                "RAEKERN_CUDA=1 but torch has no CUDA (torch.version.cuda is None) or nvcc was not "
                "found; install a CUDA build of torch and set CUDA_HOME")
        use_cuda = have_cuda if want is None else want == "1"

        torch_dir = Path(torch.__file__).parent
        args = [
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DRAEKERN_OUTPUT_DIR={out_dir}",
            f"-DRAEKERN_OUTPUT_NAME={Path(self.get_ext_filename(ext.name)).name}",
            f"-DTORCH_INCLUDES={';'.join(cpp_extension.include_paths())}",
            f"-DTORCH_LIBDIR={torch_dir / 'lib'}",
            f"-DTORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DTORCH_VERSION={torch.__version__}",
            f"-DRAEKERN_CPU_ARCH={os.environ.get('RAEKERN_CPU_ARCH', 'native')}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('RAEKERN_BUILD_TYPE', 'Release')}",
            f"-DRAEKERN_CUDA={'ON' if use_cuda else 'OFF'}",
            f"-DRAEKERN_EMULATION={'ON' if os.environ.get('RAEKERN_EMULATION', '1') == '1' else 'OFF'}",
            "-GNinja",
        ]
        if use_cuda:
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
            # cuBLAS/cuRAND headers ship in torch's nvidia wheels, not always in the toolkit.
            nvidia_inc = sorted({str(p) for p in (torch_dir.parent / "nvidia").glob("*/include")})
            args += [
                f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc",
                f"-DCUDA_HOME={cuda_home}",
                f"-DRAEKERN_CUDA_ARCHS={archs}",
                f"-DCUTLASS_INCLUDE={_cutlass_include()}",
                f"-DNVIDIA_WHEEL_INCLUDES={';'.join(nvidia_inc)}",
            ]
        # Prefer the cmake/ninja pip installed next to this interpreter (a fresh .venv), else PATH.
        bindir = Path(sys.executable).parent
        cmake = str(bindir / "cmake") if (bindir / "cmake").exists() else "cmake"
        if (bindir / "ninja").exists():
            args.append(f"-DCMAKE_MAKE_PROGRAM={bindir / 'ninja'}")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run([cmake, str(ROOT), *args], cwd=build_dir, check=True)
        subprocess.run([cmake, "--build", ".", "--", f"-j{jobs}"], cwd=build_dir, check=True)


setup(
    ext_modules=[CMakeExtension("raekern._C")],
    cmdclass={"build_ext": CMakeBuild},
)
