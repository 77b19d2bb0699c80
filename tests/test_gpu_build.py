"""Every GPU kernel builds for sm_80 and sm_90, checked on a machine without a GPU (DESIGN §6).

CUDA: each csrc/cuda/*.cu is compiled with nvcc, once per arch (sm_80, sm_90a), warnings as
errors, ``-Xptxas -v`` parsed: no kernel may spill registers or use a stack frame (local memory)
unless LOCAL_MEMORY_ALLOWED names it with the reason; kernels named in TENSOR_CORE_KERNELS must
issue mma/wgmma in their PTX. No .cu/.cuh includes a torch header, so
the kernels compile standalone; the torch-facing csrc/cuda/*.cpp (bind layers) get a syntax
check against the installed torch headers and the CUDA toolkit's.

Triton, the AOT contract: a module kernels/<name>.py may define ``AOT``, a list of entries, each
a mapping or an object with the fields
    kernel        the @triton.jit kernel
    signature     {argument: type}, e.g. {"X": "*fp32", "N": "i32", "BLOCK": "constexpr"}
    constexprs    {argument: value} for the constexpr arguments
    attrs         optional ASTSource attrs, e.g. {(0,): [["tt.divisibility", 16]]}
    num_warps     optional, default 4
    tensor_cores  optional, default False: the kernel must issue mma / wgmma
Each entry is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32),
options={"num_warps": ...})`` for cc 80 and 90 and must fit the arch's shared memory. Every
public (no leading underscore) @triton.jit function of kernels/ is a kernel and must appear in
some AOT list; device helpers are private. The compiles run in a subprocess without
TRITON_INTERPRET, which conftest.py sets on machines without CUDA and which turns @triton.jit
functions into interpreter objects that cannot be compiled.
"""

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
BIND_FILES = sorted(p.name for p in CUDA_DIR.glob("*.cpp"))
ARCHS = {"sm_80": "arch=compute_80,code=sm_80", "sm_90a": "arch=compute_90a,code=sm_90a"}
# The flags setup.py compiles .cu files with, plus warnings as errors.
NVCC_FLAGS = ["-O3", "-DNDEBUG", "-std=c++20", "--expt-relaxed-constexpr", "-Xptxas", "-v"]
NVCC_FLAGS += ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra"]
# {(file, kernel name substring): reason} for kernels allowed to spill or use local memory.
LOCAL_MEMORY_ALLOWED: dict[tuple[str, str], str] = {}
# {(file, kernel name substring): reason} for kernels that must issue tensor-core mma/wgmma: every
# kernel of the file whose demangled name contains the substring is checked in the PTX.
TENSOR_CORE_KERNELS: dict[tuple[str, str], str] = {
    ("conv_gemm.cu", "implicit_gemm_kernel<__half"): "fp16 conv implicit GEMM (issue 4)",
    ("conv_gemm.cu", "implicit_gemm_kernel<__nv_bfloat16"): "bf16 conv implicit GEMM (issue 4)",
    ("int8.cu", "gemm_kernel"): "int8 GEMM on mma.sync.m16n8k32 s8 (issue 7)",
    **{
        (cu, f"{kernel}<{t}"): "half-precision attention on mma.sync (issue 3)"
        for cu, kernel in [
            ("attention_fwd.cu", "attention_fwd_kernel"),
            ("attention_bwd.cu", "attention_bwd_dkdv_kernel"),
            ("attention_bwd.cu", "attention_bwd_dq_kernel"),
        ]
        for t in ["__half", "__nv_bfloat16"]
    },
}
TORCH_HEADER = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10|caffe2|pybind11)/', re.M)

TRITON_CCS = {80: 163 * 1024, 90: 227 * 1024}  # arch: shared memory per block, bytes
MMA = re.compile(r"^\s*(wgmma|mma)\.", re.M)


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return str(Path(home, "bin", "nvcc")) if Path(home, "bin", "nvcc").exists() else None


NVCC = _nvcc()


def _run(cmd: list[str], input: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    # nvcc runs its stages (cicc, ptxas) as children: on a timeout the whole process group is
    # killed, or they would run on, orphaned, long after the test failed.
    with subprocess.Popen(
        cmd,
        stdin=None if input is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kwargs,
    ) as proc:
        try:
            out, err = proc.communicate(input, timeout=900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _compile_cu(name: str, arch: str, out: Path) -> subprocess.CompletedProcess:
    obj = out / f"{name}.{arch}.o"
    return _run(
        [NVCC, "-c", str(CUDA_DIR / name), "-o", str(obj), "-gencode", ARCHS[arch], *NVCC_FLAGS]
    )


def _bind_syntax(name: str) -> subprocess.CompletedProcess:
    from torch.utils.cpp_extension import include_paths

    # nvcc may be a wrapper script: ask it where the toolkit's headers are.
    dry = _run([NVCC, "--dryrun", "-E", "-x", "cu", os.devnull])
    cuda_include = re.search(r'INCLUDES="-I([^"]+)"', dry.stdout + dry.stderr)[1]
    cmd = [shutil.which("c++") or "g++", "-fsyntax-only", "-std=c++20", "-Wall", "-Werror"]
    cmd += ["-Wno-unknown-pragmas", "-DFASTDL_WITH_CUDA", f"-I{ROOT / 'csrc'}"]
    cmd += [f"-isystem{p}" for p in [*include_paths(), cuda_include]]
    torch_include = Path(include_paths()[0])
    # CPU wheels ship the c10/cuda headers but not the CMake-generated one they include.
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return _run([*cmd, str(CUDA_DIR / name)])


def _selected_jobs(session) -> list[tuple[str, str]]:
    # Only what the selected tests of this file need (pytest -k), in their order.
    jobs = []
    for item in session.items:
        if item.path.resolve() != Path(__file__).resolve():
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "cu" in params:
            jobs.append((params["cu"], params["arch"]))
        elif "cpp" in params:
            jobs.append((params["cpp"], "syntax"))
    return jobs


@pytest.fixture(scope="module")
def builds(request, tmp_path_factory):
    """The nvcc compiles and bind-layer syntax checks of the selected tests, two at a time (CI
    has 2 cores), each test waiting only for its own."""
    if NVCC is None:
        pytest.skip("needs nvcc (the CUDA toolkit)")
    out = tmp_path_factory.mktemp("nvcc")
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {}
        for name, arch in _selected_jobs(request.session):
            if arch == "syntax":
                jobs[name, arch] = pool.submit(_bind_syntax, name)
            else:
                jobs[name, arch] = pool.submit(_compile_cu, name, arch, out)
        yield jobs
        for job in jobs.values():
            job.cancel()


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    return _run([tool], input="\n".join(names)).stdout.splitlines()


def ptxas_report(log: str) -> dict[str, dict[str, int]]:
    """{function: {"registers", "spill", "stack"}} from ``ptxas -v`` output."""
    kernels: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := re.search(r"(?:Compiling entry function '|Function properties for )(\w+)", line):
            current = kernels.setdefault(m[1], {"registers": 0, "spill": 0, "stack": 0})
        elif current is None:
            continue
        elif m := re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        ):
            current["stack"] = max(current["stack"], int(m[1]))
            current["spill"] = max(current["spill"], int(m[2]) + int(m[3]))
        elif m := re.search(r"Used (\d+) registers", line):
            current["registers"] = int(m[1])
            if lmem := re.search(r"(\d+) bytes lmem", line):
                current["stack"] = max(current["stack"], int(lmem[1]))
    return dict(zip(_demangle(list(kernels)), kernels.values(), strict=True))


def _allowed(cu: str, kernel: str) -> bool:
    return any(cu == f and part in kernel for f, part in LOCAL_MEMORY_ALLOWED)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("cu", CU_FILES)
def test_nvcc_no_warning_spill_or_local_memory(cu, arch, builds, record_property):
    proc = builds[cu, arch].result()
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {cu} for {arch}:\n{log}"
    assert "warning" not in log.lower(), f"nvcc warned on {cu} for {arch}:\n{log}"
    report = ptxas_report(log)
    assert report, f"ptxas -v reported no function for {cu}:\n{log}"
    bad = {
        name: usage
        for name, usage in report.items()
        if (usage["spill"] or usage["stack"]) and not _allowed(cu, name)
    }
    assert not bad, f"{cu} ({arch}): spills or local memory in\n" + "\n".join(
        f"  {name}: {usage}" for name, usage in bad.items()
    )
    record_property("registers", {name: usage["registers"] for name, usage in report.items()})


@functools.cache
def _ptx_kernels(source: str) -> dict[str, str]:
    """{demangled kernel name: its PTX} of a .cu file (compiled once per test session)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp, f"{source}.ptx")
        cmd = [NVCC, "-ptx", str(CUDA_DIR / source), "-o", str(ptx), "-arch=compute_80"]
        proc = _run([*cmd, *NVCC_FLAGS])
        assert proc.returncode == 0, f"nvcc -ptx failed on {source}:\n{proc.stdout}{proc.stderr}"
        text = ptx.read_text()
    starts = list(re.finditer(r"^(?:\.visible\s+|\.weak\s+)*\.entry\s+(\w+)", text, re.M))
    ends = [m.start() for m in starts[1:]] + [len(text)]
    names = _demangle([m[1] for m in starts])
    return {name: text[m.start() : end] for name, m, end in zip(names, starts, ends, strict=True)}


@pytest.mark.parametrize(("source", "kernel"), sorted(TENSOR_CORE_KERNELS))
def test_cuda_tensor_core_kernels_issue_mma(source, kernel):
    if NVCC is None:
        pytest.skip("needs nvcc (the CUDA toolkit)")
    kernels = _ptx_kernels(source)
    chosen = [name for name in kernels if kernel in name]
    assert chosen, f"{source}: no kernel matching {kernel!r} in the PTX"
    missing = [name for name in chosen if not MMA.search(kernels[name])]
    assert not missing, f"{source}: no mma/wgmma in {missing}"


@pytest.mark.parametrize("cpp", BIND_FILES)
def test_bind_layer_compiles_against_torch_headers(cpp, builds):
    proc = builds[cpp, "syntax"].result()
    assert proc.returncode == 0, f"{cpp} does not compile:\n{proc.stdout}{proc.stderr}"


@pytest.mark.parametrize("path", sorted(CUDA_DIR.glob("*.cu*")), ids=lambda p: p.name)
def test_cuda_sources_include_no_torch_header(path):
    found = TORCH_HEADER.findall(path.read_text())
    assert not found, f"{path.name} includes torch headers ({found}); keep them in the bind layer"


# ---------------------------------------------------------------- Triton ahead-of-time compiles


def _field(entry, name: str, default=None):
    return entry.get(name, default) if isinstance(entry, dict) else getattr(entry, name, default)


def aot_compile(cc: int) -> dict:
    """Compiles every AOT entry of every kernels module for compute capability cc (run in a
    subprocess); returns the results and the public kernels found, as JSON-able data."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    entries, public, covered = [], [], set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        if path.stem == "__init__":
            continue
        module = importlib.import_module(f"fastdl.kernels.{path.stem}")
        public += [
            f"{path.stem}.{name}"
            for name, obj in vars(module).items()
            if isinstance(obj, JITFunction)
            and not name.startswith("_")
            and obj.__module__ == module.__name__
        ]
        for index, entry in enumerate(getattr(module, "AOT", ())):
            kernel = _field(entry, "kernel")
            covered.add(f"{kernel.__module__.rsplit('.', 1)[-1]}.{kernel.__name__}")
            result = {"entry": f"{path.stem}.AOT[{index}] ({kernel.__name__})"}
            try:
                source = triton.compiler.ASTSource(
                    fn=kernel,
                    signature=_field(entry, "signature"),
                    constexprs=_field(entry, "constexprs", {}),
                    attrs=_field(entry, "attrs"),
                )
                options = {"num_warps": _field(entry, "num_warps", 4)}
                compiled = triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)
            except Exception as e:  # reported per entry by the test
                result["error"] = f"{type(e).__name__}: {e}"
            else:
                result["shared"] = compiled.metadata.shared
                result["mma"] = bool(MMA.search(compiled.asm["ptx"]))
                result["tensor_cores"] = bool(_field(entry, "tensor_cores", False))
            entries.append(result)
    return {"entries": entries, "public": public, "covered": sorted(covered)}


@pytest.fixture(scope="module")
def triton_builds():
    pytest.importorskip("triton", reason="needs triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(cc):
        proc = _run([sys.executable, __file__, str(cc)], env=env, cwd=ROOT)
        assert proc.returncode == 0, f"AOT compile for cc {cc} crashed:\n{proc.stderr}"
        return json.loads(proc.stdout.splitlines()[-1])

    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {cc: pool.submit(run, cc) for cc in TRITON_CCS}


@pytest.mark.parametrize("cc", TRITON_CCS, ids=lambda cc: f"sm_{cc}")
def test_triton_aot(cc, triton_builds):
    results = triton_builds[cc].result()
    assert results["entries"], "no AOT entries in kernels/*.py"
    limit = TRITON_CCS[cc]
    problems = []
    for r in results["entries"]:
        if "error" in r:
            problems.append(f"{r['entry']}: {r['error']}")
        elif r["shared"] > limit:
            problems.append(f"{r['entry']}: {r['shared']} bytes of shared memory > {limit}")
        elif r["tensor_cores"] and not r["mma"]:
            problems.append(f"{r['entry']}: tensor_cores=True but the PTX has no mma/wgmma")
    assert not problems, f"sm_{cc}:\n" + "\n".join(problems)


def test_triton_aot_covers_every_kernel(triton_builds):
    results = triton_builds[90].result()
    missing = sorted(set(results["public"]) - set(results["covered"]))
    assert not missing, f"@triton.jit kernels without an AOT entry: {missing}"


if __name__ == "__main__":
    print(json.dumps(aot_compile(int(sys.argv[1]))))
