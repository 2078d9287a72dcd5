"""``fastpeft check --cuda`` (fastpeft/check_cuda.py): the ptxas -v parser on captured text,
the skip without nvcc, the report wiring in ``fastpeft check``, and one real nvcc compile."""

from __future__ import annotations

import json

import pytest

from fastpeft import check, check_cuda
from fastpeft.kernel_report import Result

# nvcc -Xptxas -v output (CUDA 13.0) for two kernels, one of which spills, and a non-inlined
# device function (whose spills count too).
CAPTURED = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_ZN8fastpeft6good_kEv' for 'sm_90'
ptxas info    : Function properties for _ZN8fastpeft6good_kEv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 48 registers, used 1 barriers, 8256 bytes smem
ptxas info    : Compile time = 12.3 ms
ptxas info    : Function properties for _ZN8fastpeft6helperEf
    24 bytes stack frame, 8 bytes spill stores, 8 bytes spill loads
ptxas info    : Compiling entry function '_ZN8fastpeft7spill_kIfEEvPf' for 'sm_90'
ptxas info    : Function properties for _ZN8fastpeft7spill_kIfEEvPf
    40 bytes stack frame, 36 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers
"""


def test_parser_reads_registers_spills_and_shared_memory_per_function():
    stats = check_cuda.parse_ptxas_verbose(CAPTURED)
    assert list(stats) == ["_ZN8fastpeft6good_kEv", "_ZN8fastpeft6helperEf", "_ZN8fastpeft7spill_kIfEEvPf"]
    good, helper, spill = stats.values()
    assert (good.registers, good.spill_stores, good.spill_loads, good.shared_bytes, good.entry) == (48, 0, 0, 8256, True)
    assert (helper.registers, helper.stack_bytes, helper.spill_stores, helper.entry) == (None, 24, 8, False)
    assert (spill.registers, spill.spill_stores, spill.spill_loads, spill.shared_bytes) == (255, 36, 28, 0)


def test_judge_fails_spills_and_shared_memory_over_the_limit():
    limit = check.ARCHS["sm_80"].max_shared_bytes
    ok = check_cuda._judge(Result("k", "sm_80", registers=40, spill_stores=0, spill_loads=0, shared_bytes=1024), limit)
    assert (ok.status, ok.reason) == ("ok", "")
    spilled = check_cuda._judge(Result("k", "sm_80", registers=255, spill_stores=4, spill_loads=4, shared_bytes=0), limit)
    assert spilled.status == "FAIL" and "register spills (4 B stores, 4 B loads at 255 registers)" in spilled.reason
    big = check_cuda._judge(Result("k", "sm_80", registers=32, spill_stores=0, spill_loads=0, shared_bytes=limit + 1), limit)
    assert big.status == "FAIL" and "static shared memory" in big.reason


def test_ptx_entries_split_kernels_and_fences_fail():
    ptx = (".version 9.0\n.target sm_80\n"
           ".visible .entry _Z1av(\n)\n{\n\tred.relaxed.gpu.global.add.f32 [%rd1], %f1;\n\tret;\n}\n"
           ".entry _Z1bv(\n)\n{\n\tmembar.gl;\n\tatom.acq_rel.gpu.global.add.u32 %r1, [%rd1], 1;\n}\n")
    entries = check_cuda.ptx_entries(ptx)
    assert list(entries) == ["_Z1av", "_Z1bv"]
    assert check.forbidden_sync(entries["_Z1av"]) == []
    row = Result("b", "sm_80", registers=8, spill_stores=0, spill_loads=0, shared_bytes=0,
                 sync=", ".join(check.forbidden_sync(entries["_Z1bv"])))
    judged = check_cuda._judge(row, check.ARCHS["sm_80"].max_shared_bytes)
    assert judged.status == "FAIL" and "membar.gl" in judged.reason and "atom.acq_rel.gpu.global.add.u32" in judged.reason
    # The relaxed reduction has no fence, but it is a global atomic: not bitwise reproducible.
    assert check.global_atomics(entries["_Z1av"]) == ["red.relaxed.gpu.global.add.f32"]
    row = Result("a.cu:a", "sm_80", registers=8, spill_stores=0, spill_loads=0, shared_bytes=0,
                 atomics=", ".join(check.global_atomics(entries["_Z1av"])))
    judged = check_cuda._judge(row, check.ARCHS["sm_80"].max_shared_bytes)
    assert judged.status == "FAIL" and judged.reason.startswith(
        "a.cu:a uses global atomics (red.relaxed.gpu.global.add.f32): fastpeft's kernels are documented as free")


def test_real_compile_of_an_atomic_add_fails_naming_the_kernel(tmp_path):
    """nvcc compiles ``atomicAdd`` on a global float to ``atom.global.add.f32`` (no ordering: no
    fence), yet the check fails that kernel, and only it, for its global atomic."""
    nvcc = check_cuda.find_nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc")
    source = tmp_path / "sums.cu"
    source.write_text("__global__ void atomic_sum(float* y, const float* x) { atomicAdd(y, x[threadIdx.x]); }\n"
                      "__global__ void plain_sum(float* y, const float* x) { y[threadIdx.x] += x[threadIdx.x]; }\n")
    rows = {r.kernel: r for r in check_cuda.compile_source(nvcc, source, "sm_80")}
    assert rows["sums.cu:plain_sum"].status == "ok", rows["sums.cu:plain_sum"].reason
    atomic = rows["sums.cu:atomic_sum"]
    assert atomic.sync == "" and atomic.atomics == "atom.global.add.f32"
    assert atomic.status == "FAIL" and atomic.reason.startswith(f"sums.cu:atomic_sum uses global atomics ({atomic.atomics})")


def test_demangled_names_are_short():
    names = check_cuda._demangle(["_ZN8fastpeft7spill_kIfEEvPf"])
    assert names["_ZN8fastpeft7spill_kIfEEvPf"] in ("spill_k<float>", "_ZN8fastpeft7spill_kIfEEvPf")


def test_skips_with_the_reason_without_nvcc(monkeypatch, tmp_path):
    monkeypatch.setattr(check_cuda, "find_nvcc", lambda: None)
    report = check_cuda.run(["sm_80"], 1)
    assert report.results == [] and "nvcc not found" in report.skipped
    monkeypatch.setattr(check_cuda, "find_nvcc", lambda: "/usr/bin/true")
    report = check_cuda.run(["sm_80"], 1, csrc=tmp_path)
    assert report.results == [] and "no CUDA sources" in report.skipped


def test_fastpeft_check_cuda_adds_rows_json_and_exit_status(monkeypatch, tmp_path, capsys):
    """``--cuda`` runs the section after the Triton table, counts its failures and writes it
    under "cuda" in the JSON (the Triton compile itself is replaced by a canned row here)."""
    from fastpeft.kernels import all_kernel_specs

    spec = next(iter(all_kernel_specs()))
    monkeypatch.setattr(check, "_load_specs", lambda: [spec])
    monkeypatch.setattr(check, "_compile_plan", lambda planned, jobs, on_done=None: [
        Result(spec.name, "sm_80", registers=32, spill_stores=0, spill_loads=0, shared_bytes=0, status="ok")])
    rows = [Result("bgmv.cu:k<float>", "sm_80", registers=32, spill_stores=0, spill_loads=0, shared_bytes=0, status="ok")]
    monkeypatch.setattr(check_cuda, "run", lambda archs, jobs: check_cuda.CudaReport(results=rows, nvcc="nvcc (13.0)"))
    report = tmp_path / "check.json"
    assert check.main(["--arch", "sm_80", "--cuda", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "CUDA C++ kernels (nvcc (13.0))" in out and "bgmv.cu:k<float>" in out and "2 passed, 0 failed" in out
    cuda = json.loads(report.read_text())["cuda"]
    assert cuda["nvcc"] == "nvcc (13.0)" and cuda["results"][0]["kernel"] == "bgmv.cu:k<float>"
    rows[0].status, rows[0].reason = "FAIL", "register spills (4 B stores, 4 B loads at 255 registers)"
    assert check.main(["--arch", "sm_80", "--cuda"]) == 1
    skipped = check_cuda.CudaReport(skipped="nvcc not found")
    monkeypatch.setattr(check_cuda, "run", lambda archs, jobs: skipped)
    assert check.main(["--arch", "sm_80", "--cuda"]) == 0
    assert "CUDA C++ kernels: skipped: nvcc not found" in capsys.readouterr().out


def test_real_compile_of_the_decode_kernels_has_no_spills():
    """One real nvcc -Xptxas -v compile (csrc/bgmv.cu for sm_80: a few seconds): every
    instantiation is reported, by readable name, with 0 spill bytes and no fences."""
    nvcc = check_cuda.find_nvcc()
    if nvcc is None or not (check_cuda.CSRC / "bgmv.cu").is_file():
        pytest.skip("needs nvcc and a source checkout (csrc/)")
    rows = check_cuda.compile_source(nvcc, check_cuda.CSRC / "bgmv.cu", "sm_80")
    assert all(r.status == "ok" for r in rows), [(r.kernel, r.reason, r.detail[-2000:]) for r in rows]
    kernels = {r.kernel for r in rows}
    # 2 kernels x 5 (x, adapter) dtype pairs.
    assert len(kernels) == 10 and "bgmv.cu:bgmv_shrink_kernel<__half, float>" in kernels
    assert all(r.spill_bytes == 0 and r.registers and r.registers <= 255 and r.sync == "" and r.atomics == ""
               for r in rows)


# cuobjdump -sass output (sm_80) for two functions, one with tensor-core instructions.
CAPTURED_SASS = """\
\tcode for sm_80
\t\tFunction : _ZN8fastpeft9tc_kernelEv
\t.headerflags\t@"EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0100*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0110*/                   HMMA.16816.F32.BF16 R16, R8, R14, R16 ;
        /*0120*/                   EXIT ;
\t\t..........
\t\tFunction : _ZN8fastpeft6ffma_kEv
        /*0100*/                   FFMA R4, R8, R12, R4 ;
        /*0120*/                   EXIT ;
"""


def test_sass_hmma_counts_per_function():
    assert check_cuda.sass_hmma_counts(CAPTURED_SASS) == {"_ZN8fastpeft9tc_kernelEv": 2, "_ZN8fastpeft6ffma_kEv": 0}
    ptx = "\twmma.mma.sync.aligned.row.col.m16n16k16.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f1};\n\tfma.rn.f32 %f1;\n"
    assert check_cuda.ptx_mma_count(ptx) == 1 and check_cuda.ptx_mma_count("\tfma.rn.f32 %f1, %f2;\n") == 0


def test_a_tensor_core_kernel_without_mma_fails(tmp_path):
    """A kernel named in TENSOR_CORE_KERNELS that compiles to FFMA only fails the check."""
    nvcc = check_cuda.find_nvcc()
    if nvcc is None:
        pytest.skip("needs nvcc")
    name = next(iter(check_cuda.TENSOR_CORE_KERNELS))
    source = tmp_path / "scalar.cu"
    source.write_text(f"__global__ void {name}(float* y, const float* x) {{ y[threadIdx.x] = 2.0f * x[threadIdx.x]; }}\n")
    (row,) = check_cuda.compile_source(nvcc, source, "sm_80")
    assert row.status == "FAIL" and "written for tensor cores but no" in row.reason, row.reason
    assert row.hmma in (0, None)


def test_real_compile_of_the_bottleneck_kernels_uses_tensor_cores():
    """csrc/bottleneck.cu for sm_80 (about 20 s): every kernel ok with 0 spill bytes, and the
    16-bit instantiations of the forward, the backward's row kernel and its weight-gradient
    kernel run their products on HMMA."""
    nvcc = check_cuda.find_nvcc()
    if nvcc is None or not (check_cuda.CSRC / "bottleneck.cu").is_file():
        pytest.skip("needs nvcc and a source checkout (csrc/)")
    rows = check_cuda.compile_source(nvcc, check_cuda.CSRC / "bottleneck.cu", "sm_80")
    assert all(r.status == "ok" and r.spill_bytes == 0 for r in rows), [(r.kernel, r.reason) for r in rows]
    tensor_core = [r for r in rows if any(name in r.kernel for name in check_cuda.TENSOR_CORE_KERNELS)]
    # (forward | dz_dh) x (fp16 | bf16) x (16-bit | fp32 weights), and the outer kernel x (fp16 | bf16).
    assert len(tensor_core) == 10
    if check_cuda.find_cuobjdump(nvcc) is not None:
        assert all(r.hmma and r.hmma > 0 for r in tensor_core), [(r.kernel, r.hmma) for r in tensor_core]
