"""The build: fastmargin._C loads and reports how it was compiled, kernels/ is installed as
fastmargin.kernels, the version is one, and a missing CUDA part is explained; setup.py's
nvcc flags (architectures, PTX, no FMA contraction); the sdist holds what a build from it
needs (with -m slow: a wheel built from it compiles and imports)."""

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import fastmargin
from fastmargin import backends

ROOT = Path(__file__).resolve().parents[1]

BUILD_INFO_TYPES = {
    "cuda": bool,
    "openmp": bool,
    "omp_max_threads": int,
    "cpu_bf16_gemms": bool,
    "compiler": str,
    "torch_version": str,
}


@pytest.fixture(scope="module")
def build_info():
    from fastmargin import _C

    return _C.build_info()


@pytest.fixture(scope="module")
def setup_py():
    # Imported under another name, so the `__main__` guard keeps setup() from running.
    spec = importlib.util.spec_from_file_location("fastmargin_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_info_has_documented_keys_and_types(build_info):
    for key, kind in BUILD_INFO_TYPES.items():
        value = build_info[key]
        assert isinstance(value, kind), f"build_info()[{key!r}] = {value!r}, not {kind.__name__}"
    cuda_version_kind = str if build_info["cuda"] else type(None)
    assert isinstance(build_info["cuda_version"], cuda_version_kind), build_info


def test_compiled_against_the_running_torch(build_info):
    # A local tag such as +cu130 is not part of the C++ version.
    assert build_info["torch_version"] == torch.__version__.split("+")[0]


def test_openmp_is_torchs_runtime(build_info):
    from fastmargin import _C

    assert build_info["openmp"], build_info
    # One OpenMP runtime: torch's thread setting reaches the extension.
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert _C.build_info()["omp_max_threads"] == 1
    finally:
        torch.set_num_threads(threads)


def test_kernels_installed_as_fastmargin_kernels():
    import fastmargin.kernels

    assert Path(fastmargin.kernels.__file__).parent.name == "kernels", fastmargin.kernels.__file__


def test_version_matches_installed_distribution():
    assert fastmargin.__version__ == importlib.metadata.version("fastmargin")


def test_cuda_backend_says_why_when_not_compiled(build_info):
    if build_info["cuda"]:
        pytest.skip("this build has the CUDA kernels compiled in")
    reason = backends.unavailable_reason("cuda")
    assert reason is not None and "built without CUDA" in reason, reason
    assert build_info["cuda_reason"] in reason, (build_info["cuda_reason"], reason)


CU = ["csrc/cuda/k.cu"]


# cuda_home "toolkit" and "bare" name two roots the test makes, with and without the headers.
@pytest.mark.parametrize(
    "env, cuda_sources, torch_cuda, cuda_home, compiled, reason_names",
    [
        ({"FASTMARGIN_SKIP_CUDA_BUILD": "1"}, CU, "13.0", "toolkit", False, "FASTMARGIN_SKIP_CUDA_BUILD"),
        ({}, CU, "13.0", None, False, "CUDA_HOME"),
        ({}, CU, "13.0", "bare", False, "no include/cuda_runtime_api.h"),
        ({}, CU, None, "toolkit", False, "CPU build"),
        ({}, [], "13.0", "toolkit", False, "no .cu sources"),
        ({"FASTMARGIN_SKIP_CUDA_BUILD": "0"}, CU, "13.0", "toolkit", True, "CUDA 13.0"),
    ],
)
def test_setup_cuda_decision(setup_py, tmp_path, env, cuda_sources, torch_cuda, cuda_home, compiled, reason_names):
    (tmp_path / "toolkit" / "include").mkdir(parents=True)
    (tmp_path / "toolkit" / "include" / "cuda_runtime_api.h").touch()
    (tmp_path / "bare").mkdir()
    if cuda_home is not None:
        cuda_home = str(tmp_path / cuda_home)
    decided, reason = setup_py.cuda_build_decision(env, cuda_sources, torch_cuda, cuda_home)
    assert decided is compiled, reason
    assert reason_names in reason, reason


def _never_asked():
    raise AssertionError("the nvcc on PATH was asked although an earlier candidate had the headers")


# Roots: "toolkit" has include/cuda_runtime_api.h, "bare" does not, "missing" does not exist.
@pytest.mark.parametrize(
    "env, torch_guess, nvcc_root, default, found, how",
    [
        ({"CUDA_HOME": "bare"}, "toolkit", _never_asked, "toolkit", "bare", "CUDA_HOME is set"),
        ({"CUDA_PATH": "toolkit"}, "bare", _never_asked, "missing", "toolkit", "CUDA_PATH is set"),
        ({}, "toolkit", _never_asked, "missing", "toolkit", "torch's guess"),
        # torch guesses a wrapper's parent (/usr/local for /usr/local/bin/nvcc): nvcc's own answer wins
        ({}, "bare", lambda: "toolkit", "missing", "toolkit", "the nvcc on PATH"),
        ({}, "bare", lambda: None, "toolkit", "toolkit", "the default location"),
        ({}, None, lambda: "missing", "toolkit", "toolkit", "the default location"),
        ({}, "bare", lambda: "bare", "missing", "bare", "no toolkit with headers found"),
        ({}, None, lambda: None, "missing", None, "no toolkit with headers found"),
    ],
)
def test_setup_finds_cuda_home(setup_py, tmp_path, env, torch_guess, nvcc_root, default, found, how):
    (tmp_path / "toolkit" / "include").mkdir(parents=True)
    (tmp_path / "toolkit" / "include" / "cuda_runtime_api.h").touch()
    (tmp_path / "bare").mkdir()

    def root(name):
        return None if name is None else str(tmp_path / name)

    def nvcc():
        return root(nvcc_root())

    home, found_by = setup_py.find_cuda_home({k: root(v) for k, v in env.items()}, root(torch_guess), nvcc,
                                             default=root(default))
    assert home == root(found), (home, found_by)
    assert how in found_by, found_by


def test_setup_nvcc_toolkit_follows_a_wrapper(setup_py, tmp_path):
    """nvcc --dryrun names its own bin directory (_HERE_): a wrapper script that execs the
    real nvcc resolves to the real toolkit; a missing or silent nvcc gives None."""
    real = tmp_path / "cuda-13.0" / "bin"
    real.mkdir(parents=True)
    (real / "nvcc").write_text(f'#!/bin/sh\necho "#$ _HERE_={real}"\n')
    wrapper = tmp_path / "bin" / "nvcc"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec {real / "nvcc"} "$@"\n')
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\n")
    for script in (real / "nvcc", wrapper, silent):
        script.chmod(0o755)
    assert setup_py.nvcc_toolkit(str(wrapper)) == str(tmp_path / "cuda-13.0")
    assert setup_py.nvcc_toolkit(str(silent)) is None
    assert setup_py.nvcc_toolkit(str(tmp_path / "absent")) is None
    assert setup_py.nvcc_toolkit(None) is None


def test_setup_nvcc_on_path_has_a_toolkit(setup_py):
    """Here: the nvcc on PATH (possibly a wrapper) leads to a toolkit with the headers."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH")
    root = setup_py.nvcc_toolkit(nvcc)
    assert setup_py.has_cuda_headers(root), f"{nvcc} runs from {root}, which has no include/cuda_runtime_api.h"


# ---------------------------------------------------------------- nvcc flags


@pytest.mark.parametrize("arch_list, targets", [
    ("8.0;9.0+PTX", ["sm_80", "sm_90", "compute_90"]),
    ("8.0 8.6;9.0a", ["sm_80", "sm_86", "sm_90a"]),
    ("12.0+PTX;", ["sm_120", "compute_120"]),
])
def test_setup_cuda_arch_flags(setup_py, arch_list, targets):
    flags, built = setup_py.cuda_arch_flags(arch_list)
    assert built == targets, (arch_list, built)
    for target in targets:
        num = target.split("_")[1]
        code = f"-gencode=arch=compute_{num},code={target}"
        assert code in flags, (code, flags)
    assert len(flags) == len(targets), flags


@pytest.mark.parametrize("arch_list", ["7.5;8.0", "Hopper", "9.0+SASS", "", "native"])
def test_setup_cuda_arch_flags_refuses(setup_py, arch_list):
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST"):
        setup_py.cuda_arch_flags(arch_list)


def test_setup_default_archs_ship_ptx_for_the_newest(setup_py):
    """The driver compiles PTX for GPUs newer than every SASS target (sm_100, sm_120):
    without it they find no kernel image."""
    flags, targets = setup_py.cuda_arch_flags(setup_py.DEFAULT_CUDA_ARCH_LIST)
    newest = max((t.split("_")[1] for t in targets if t.startswith("sm_")), key=lambda n: int(n.rstrip("af")))
    assert f"compute_{newest}" in targets, targets
    assert f"-gencode=arch=compute_{newest},code=compute_{newest}" in setup_py.nvcc_flags(flags)


def test_setup_nvcc_does_not_contract_fma(setup_py):
    flags = setup_py.nvcc_flags(setup_py.cuda_arch_flags(setup_py.DEFAULT_CUDA_ARCH_LIST)[0])
    assert "-fmad=false" in flags, flags


def test_built_extension_carries_ptx(build_info, setup_py):
    """cuobjdump finds PTX in fastmargin._C for every compute_ target the build recorded
    (build_info()['cuda_archs']; a build that predates it: setup.py's list here)."""
    if not build_info["cuda"]:
        pytest.skip("this build has no CUDA kernels")
    from test_cuda import find_cuobjdump

    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump on PATH, in $CUDA_HOME/bin, /usr/local/cuda/bin or Triton's backends/nvidia/bin")
    recorded = build_info.get("cuda_archs")
    targets = recorded.split(",") if recorded else setup_py.cuda_arch_flags(
        os.environ.get("TORCH_CUDA_ARCH_LIST") or setup_py.DEFAULT_CUDA_ARCH_LIST)[1]
    from fastmargin import _C

    result = subprocess.run([cuobjdump, "-lptx", _C.__file__], capture_output=True, text=True, timeout=120)
    listed = set(re.findall(r"\.(sm_\d+[af]?)\.ptx", result.stdout))
    wanted = {t.replace("compute_", "sm_") for t in targets if t.startswith("compute_")}
    assert wanted, f"the build targets {targets}: no PTX for GPUs newer than its SASS"
    assert wanted <= listed, (f"{_C.__file__}: PTX for {sorted(listed)} (cuobjdump -lptx: {result.stdout.strip()!r} "
                              f"{result.stderr.strip()!r}), wanted {sorted(wanted)}. Reinstall: "
                              "pip install --no-build-isolation -e .")


# ---------------------------------------------------------------- the source distribution

QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


def included_files(sources):
    """Every file that `sources` #include "..." (transitively), found as the compiler finds
    it: beside the including file, then in csrc/ (setup.py's include directory)."""
    found, todo = set(), list(sources)
    while todo:
        path = todo.pop()
        for name in QUOTED_INCLUDE.findall((ROOT / path).read_text()):
            candidates = [(ROOT / path).parent / name, ROOT / "csrc" / name]
            hit = next((c for c in candidates if c.is_file()), None)
            assert hit is not None, f"{path} includes {name!r}, found neither beside it nor in csrc/"
            rel = hit.resolve().relative_to(ROOT).as_posix()
            if rel not in found:
                found.add(rel)
                todo.append(rel)
    return found


def shipped_tree(folder):
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".so", ".o")}


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """`python setup.py sdist` of this tree, its egg-info kept out of the tree too."""
    out = tmp_path_factory.mktemp("sdist")
    env = dict(os.environ, FASTMARGIN_SKIP_CUDA_BUILD="1")  # the sdist is the same; no nvcc asked
    result = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out),
                             "sdist", "--dist-dir", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (archive,) = out.glob("*.tar.gz")
    return archive


def test_sdist_holds_what_the_build_needs(setup_py, sdist):
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    top = names[0].split("/")[0]
    members = {n.split("/", 1)[1] for n in names if "/" in n}
    cpp, cuda = setup_py.sources(ROOT)
    assert cpp and cuda, (cpp, cuda)
    needed = {
        "compiled": set(cpp) | set(cuda),
        "included": included_files(cpp + cuda),
        "package": {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"} | shipped_tree("fastmargin"),
        "kernels": shipped_tree("kernels"),
        "tests": shipped_tree("tests"),
        "docs, examples, bench": shipped_tree("docs") | shipped_tree("examples") | shipped_tree("bench"),
    }
    assert {"csrc/cpu/margin_ce.h", "csrc/margin.h"} <= needed["included"], needed["included"]
    for what, files in needed.items():
        missing = sorted(files - members)
        assert not missing, f"{sdist.name} lacks {what} files: {missing}"
    built = sorted(m for m in members if m.endswith((".so", ".o", ".pyc")))
    assert not built, f"{sdist.name} ships build outputs: {built}"
    assert top == sdist.name.removesuffix(".tar.gz"), top


@pytest.mark.slow
def test_wheel_from_sdist_compiles_and_imports(setup_py, sdist, tmp_path):
    """pip builds a wheel from the sdist alone (unpacked elsewhere, no registry), and
    fastmargin._C of that wheel loads, with the CUDA kernels where setup.py compiles them
    here. Minutes: the whole extension is compiled."""
    wheels = tmp_path / "wheels"
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index",
                             "--wheel-dir", str(wheels), str(sdist)], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    (wheel,) = wheels.glob("fastmargin-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import json, fastmargin, fastmargin.kernels\n"
             "from fastmargin import _C\n"
             "print(json.dumps(dict(_C.build_info(), file=fastmargin.__file__, kernels=fastmargin.kernels.__file__)))")
    env = dict(os.environ, PYTHONPATH=str(site))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(info["file"]).is_relative_to(site) and Path(info["kernels"]).is_relative_to(site), info
    from torch.utils.cpp_extension import CUDA_HOME

    home, _ = setup_py.find_cuda_home(os.environ, CUDA_HOME, lambda: setup_py.nvcc_toolkit(shutil.which("nvcc")))
    decided, reason = setup_py.cuda_build_decision(os.environ, setup_py.sources(ROOT)[1], torch.version.cuda, home)
    assert info["cuda"] is decided, (reason, info)
