"""Builds fastmargin._C (docs/design.md §5): the CPU kernels always, the CUDA kernels when a CUDA
toolkit and a CUDA build of torch are both here. It compiles against the torch already
installed, so install without build isolation:

    pip install torch==2.14.1 && pip install --no-build-isolation -e ".[test]"

FASTMARGIN_SKIP_CUDA_BUILD=1 builds the CPU part only; TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default "8.0;9.0+PTX": A100 and H100 machine code, and sm_90 PTX that the
driver compiles for newer GPUs; the kernels need 8.0 or newer). The toolkit
is CUDA_HOME if set, else the first of torch's guess, the toolkit the nvcc on PATH runs
from and /usr/local/cuda that has the headers (find_cuda_home); the build prints which.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from glob import glob
from pathlib import Path

import torch
from setuptools import Extension, find_packages, setup
from torch.utils import cpp_extension
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
# PTX for the newest: without it an sm_100 or sm_120 GPU finds "no kernel image".
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"


def has_cuda_headers(root: str | None) -> bool:
    return root is not None and Path(root, "include", "cuda_runtime_api.h").is_file()


def nvcc_toolkit(nvcc: str | None) -> str | None:
    """The toolkit root of the nvcc at `nvcc`, as nvcc itself reports it: `--dryrun` prints
    its commands without running them, among them _HERE_, the directory of the real nvcc.
    So a wrapper script (/usr/local/bin/nvcc that execs /usr/local/cuda-13.0/bin/nvcc)
    resolves to the toolkit, where torch guesses the wrapper's parent. None if it fails."""
    if nvcc is None:
        return None
    try:
        result = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                                capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("#$ _HERE_="):
            return str(Path(line.split("=", 1)[1].strip()).parent)
    return None


def find_cuda_home(env: Mapping[str, str], torch_guess: str | None, nvcc_root: Callable[[], str | None],
                   default: str = "/usr/local/cuda") -> tuple[str | None, str]:
    """The CUDA toolkit to build with, and how it was found. CUDA_HOME (or CUDA_PATH) as set
    is taken as it is, the user's word (cuda_build_decision says if it lacks the headers);
    else the first with include/cuda_runtime_api.h of torch's guess, the toolkit of the nvcc
    on PATH (nvcc_root, asked only if needed) and `default`; else torch's guess."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(name):
            return env[name], f"{name} is set"
    if has_cuda_headers(torch_guess):
        return torch_guess, "torch's guess"
    root = nvcc_root()
    if has_cuda_headers(root):
        return root, "the toolkit the nvcc on PATH runs from"
    if has_cuda_headers(default):
        return default, "the default location"
    return torch_guess, "torch's guess (no toolkit with headers found)"


def cuda_build_decision(
    env: Mapping[str, str],
    cuda_sources: Sequence[str],
    torch_cuda: str | None,
    cuda_home: str | None,
) -> tuple[bool, str]:
    """Whether to compile csrc/cuda, and the reason the build prints."""
    if env.get("FASTMARGIN_SKIP_CUDA_BUILD") == "1":
        return False, "FASTMARGIN_SKIP_CUDA_BUILD=1"
    if not cuda_sources:
        return False, "csrc/cuda holds no .cu sources"
    if torch_cuda is None:
        return False, "torch is a CPU build (torch.version.cuda is None)"
    if cuda_home is None:
        return False, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    # A CUDA_HOME set by hand, or torch's guess when nothing better was found (the parent of
    # the nvcc on PATH, which for a wrapper script is not the toolkit), may lack the headers
    # that the binding file needs.
    if not has_cuda_headers(cuda_home):
        return False, f"CUDA_HOME={cuda_home} has no include/cuda_runtime_api.h; set CUDA_HOME to the toolkit"
    return True, f"CUDA {torch_cuda}, toolkit at {cuda_home}"


def nvidia_include_dirs(torch_cuda: str) -> list[str]:
    """nvidia/cu<major>/include of the pip CUDA wheels: torch's CUDA headers include
    cusparse.h, which a bare toolkit may lack and those wheels bring."""
    spec = importlib.util.find_spec("nvidia")
    roots = spec.submodule_search_locations if spec is not None else []
    major = torch_cuda.split(".")[0]
    return [str(d) for d in (Path(r, f"cu{major}", "include") for r in roots) if d.is_dir()]


def sources(root: Path = ROOT) -> tuple[list[str], list[str]]:
    """(C++ sources, CUDA sources), relative to root as setuptools wants them (pip builds
    with root as the cwd). The sdist ships both and what they include (MANIFEST.in)."""
    cpp = ["csrc/fastmargin.cpp", *sorted(glob("csrc/cpu/*.cpp", root_dir=root))]
    return cpp, sorted(glob("csrc/cuda/*.cu", root_dir=root))


def cuda_arch_flags(arch_list: str) -> tuple[list[str], list[str]]:
    """nvcc's -gencode flags for a TORCH_CUDA_ARCH_LIST ("8.0;9.0+PTX": machine code for
    each, PTX too for a +PTX one), and the targets they build ("sm_80", "sm_90",
    "compute_90"), which build_info() reports. Given to nvcc, they keep cpp_extension
    from adding its own."""
    flags, targets = [], []
    for entry in filter(None, re.split(r"[;\s]+", arch_list)):
        match = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", entry)
        if match is None or int(match[1]) < 8:
            raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: {entry!r} is not an architecture of 8.0 or newer "
                             f"written as major.minor[+PTX] (the kernels need 8.0; default {DEFAULT_CUDA_ARCH_LIST!r})")
        num = match[1] + match[2] + match[3]
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        targets.append(f"sm_{num}")
        if match[4]:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
            targets.append(f"compute_{num}")
    if not flags:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no architecture")
    return flags, targets


def nvcc_flags(arch_flags: Sequence[str]) -> list[str]:
    # No FMA contraction (-fmad=false): each intended FMA is an explicit fma() or a
    # tensor-core op, and ptxas must not contract the margin psi one way in the forward
    # and another in the backward (nor z = S cos, docs/design.md §1).
    return ["-O3", "-fmad=false", *arch_flags]


def extension() -> Extension:
    cpp_sources, cuda_sources = sources()
    cuda_home, found_by = find_cuda_home(os.environ, CUDA_HOME, lambda: nvcc_toolkit(shutil.which("nvcc")))
    with_cuda, reason = cuda_build_decision(os.environ, cuda_sources, torch.version.cuda, cuda_home)
    if with_cuda:
        reason += f" ({found_by})"
    print(f"fastmargin: CUDA kernels {'compiled' if with_cuda else 'not compiled'}: {reason}")

    include_dirs = [str(ROOT / "csrc")]
    # No FMA contraction: the CPU kernel's forward rounds z = S cos before its log-sum-exp,
    # and the backward's exp(S cos - lse) must round it the same way (a fused multiply-add
    # skips that rounding: at SphereFace's S = s ||x|| ~ 1e8 p came out e^4 too large).
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if not with_cuda:
        # build_info() reports the reason, so a missing 'cuda' backend says why.
        return CppExtension(
            "fastmargin._C",
            cpp_sources,
            include_dirs=include_dirs,
            define_macros=[("FASTMARGIN_NO_CUDA_REASON", json.dumps(reason))],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    # An explicit list: without one cpp_extension asks the (possibly absent) GPU.
    arch_flags, targets = cuda_arch_flags(os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCH_LIST)
    print(f"fastmargin: CUDA targets {','.join(targets)}")
    # cpp_extension finds nvcc, headers and libraries through its module-level CUDA_HOME.
    cpp_extension.CUDA_HOME = cuda_home
    return CUDAExtension(
        "fastmargin._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs + nvidia_include_dirs(torch.version.cuda),
        define_macros=[("FASTMARGIN_WITH_CUDA", None)],
        # FASTMARGIN_CUDA_ARCHS: build_info() in the binding file reports it.
        extra_compile_args={"cxx": [*cxx_flags, f"-DFASTMARGIN_CUDA_ARCHS={json.dumps(','.join(targets))}"],
                            "nvcc": nvcc_flags(arch_flags)},
        extra_link_args=["-fopenmp"],
    )


# setuptools runs this file as __main__; tests import it for its functions.
if __name__ == "__main__":
    setup(
        packages=[*find_packages(include=["fastmargin", "fastmargin.*"]), "fastmargin.kernels"],
        package_dir={"fastmargin.kernels": "kernels"},
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension},
    )
