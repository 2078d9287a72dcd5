"""Tests of ``fastpeft check`` (fastpeft/check.py) on small kernels defined here.

The kernels are compiled for real sm_80/sm_90 targets without a GPU. One module-scoped run
compiles every spec below for both archs (about fifteen compiles at jobs=2, with TRITON_INTERPRET=1
set in the parent as in CPU test runs), and the tests read its rows. The kernels must stay at
module level: worker processes import them from this module.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from fastpeft import check  # noqa: E402
from fastpeft.kernels import all_kernel_specs  # noqa: E402
from fastpeft.kernels.aot_spec import KernelSpec  # noqa: E402

ARCHS = ["sm_80", "sm_90"]


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * alpha, mask=mask)


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k + rk)[None, :])
        b = tl.load(b_ptr + (k + rk)[:, None] * N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc.to(c_ptr.dtype.element_ty))


@triton.jit
def _atomic_sum_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # tl.atomic_add's default semantics, acq_rel: a GPU-wide fence around every call.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(y_ptr + offs % 16, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _relaxed_atomic_sum_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    # No fence (sem="relaxed"), but the order in which programs' adds land varies run to run.
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.atomic_add(y_ptr + offs % 16, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n, sem="relaxed")


@triton.jit(do_not_specialize=["n"])
def _scale_any_n_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) * alpha, mask=offs < n)


@triton.jit
def _outer_acc_kernel(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr):
    # A BM x BN fp32 accumulator stays live across the loop: 64 x 128 in one warp is 256 values
    # per thread, more than the 255 registers a thread can have, so ptxas must spill.
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(K):
        a = tl.load(a_ptr + k * BM + tl.arange(0, BM))
        b = tl.load(b_ptr + k * BN + tl.arange(0, BN))
        acc += a[:, None] * b[None, :]
    tl.store(c_ptr + tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :], acc)


class _ExitOnUnpickle:
    """A constexpr value that kills the worker process that unpickles it (a simulated crash)."""

    def __reduce__(self):
        return (os._exit, (70,))


SCALE_SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "alpha": "fp32", "BLOCK": "constexpr"}
SIMPLE = KernelSpec("scale[b=1024]", _scale_kernel, SCALE_SIG, {"BLOCK": 1024}, 4, 1)
SIMPLE_WANTS_WGMMA = KernelSpec(
    "scale_wants_wgmma", _scale_kernel, SCALE_SIG, {"BLOCK": 1024}, 4, 1, expects_wgmma_on_sm90=True
)
GEMM = KernelSpec(
    "gemm[128x128x64,w=8,s=3,bf16]",
    _gemm_kernel,
    {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "M": "i32", "N": "i32", "K": "i32",
     "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"},
    {"BM": 128, "BN": 128, "BK": 64},
    num_warps=8,
    num_stages=3,
    expects_wgmma_on_sm90=True,
)
SPILLING = KernelSpec(
    "outer_acc[64x128,w=1]",
    _outer_acc_kernel,
    {"a_ptr": "*fp32", "b_ptr": "*fp32", "c_ptr": "*fp32", "K": "i32",
     "BM": "constexpr", "BN": "constexpr"},
    {"BM": 64, "BN": 128},
    num_warps=1,
    num_stages=1,
)
# tl.arange needs a power-of-two length: a GPU compile error (the interpreter would not object).
BROKEN = KernelSpec("scale[b=100]", _scale_kernel, SCALE_SIG, {"BLOCK": 100}, 4, 1)
WITHOUT_N = {k: v for k, v in SCALE_SIG.items() if k != "n"}
INVALID = KernelSpec("scale_missing_param", _scale_kernel, WITHOUT_N, {"BLOCK": 64}, 4, 1)
CRASHING = KernelSpec("scale_crash", _scale_kernel, SCALE_SIG, {"BLOCK": _ExitOnUnpickle()}, 4, 1)
ATOMIC = KernelSpec("atomic_sum[b=256]", _atomic_sum_kernel,
                    {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 256}, 4, 1)
RELAXED_ATOMIC = KernelSpec("relaxed_atomic_sum[b=256]", _relaxed_atomic_sum_kernel,
                            {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 256}, 4, 1)
ANY_N = KernelSpec("scale_any_n[b=1024]", _scale_any_n_kernel, SCALE_SIG, {"BLOCK": 1024}, 4, 1)
# The same kernel as SIMPLE, launched only on Ampere / only on Hopper (KernelSpec.arch_family).
SIMPLE_SM80 = dataclasses.replace(SIMPLE, name="scale_ampere[b=1024]", arch_family=80)
SIMPLE_SM90 = dataclasses.replace(SIMPLE, name="scale_hopper[b=1024]", arch_family=90)


@pytest.fixture(scope="module")
def rows() -> dict[tuple[str, str], check.Result]:
    specs = [SIMPLE, SIMPLE_WANTS_WGMMA, GEMM, SPILLING, BROKEN, INVALID, ATOMIC, RELAXED_ATOMIC]
    # Under TRITON_INTERPRET=1, @triton.jit makes interpreter objects: the workers must not
    # inherit it, or nothing below would compile. The parent must get it back afterwards.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        results = check._run(specs, ARCHS, jobs=2)
        assert os.environ["TRITON_INTERPRET"] == "1"
    assert [(r.kernel, r.arch) for r in results] == [(s.name, a) for s in specs for a in ARCHS]
    return {(r.kernel, r.arch): r for r in results}


@pytest.mark.parametrize("arch", ARCHS)
def test_simple_kernel_passes(rows, arch):
    row = rows[SIMPLE.name, arch]
    assert row.status == "ok", row.reason
    assert row.registers > 0 and row.spill_bytes == 0 and row.wgmma is False


def test_gemm_uses_wgmma_on_sm90_only(rows):
    sm80, sm90 = rows[GEMM.name, "sm_80"], rows[GEMM.name, "sm_90"]
    assert sm90.status == "ok", sm90.reason
    assert sm90.wgmma is True and sm90.shared_bytes > 0
    assert sm80.status == "ok", sm80.reason
    assert sm80.wgmma is False


def test_expected_wgmma_missing_fails_on_sm90(rows):
    assert rows[SIMPLE_WANTS_WGMMA.name, "sm_80"].status == "ok"
    row = rows[SIMPLE_WANTS_WGMMA.name, "sm_90"]
    assert row.status == "FAIL" and "wgmma" in row.reason


@pytest.mark.parametrize("arch", ARCHS)
def test_spills_fail(rows, arch):
    row = rows[SPILLING.name, arch]
    assert row.spill_stores > 0 and row.spill_loads > 0
    assert row.status == "FAIL" and "spill" in row.reason


@pytest.mark.parametrize("arch", ARCHS)
def test_compile_error_is_a_failed_row(rows, arch):
    row = rows[BROKEN.name, arch]
    assert row.status == "FAIL" and row.reason.startswith("compile error")
    assert "power of 2" in row.detail or "power of two" in row.detail


def test_inconsistent_spec_is_rejected_before_compiling(rows):
    row = rows[INVALID.name, "sm_80"]
    assert row.status == "FAIL" and "invalid spec" in row.reason and row.registers is None


def test_worker_crash_fails_only_its_spec():
    results = check._run([CRASHING, SIMPLE], ["sm_80"], jobs=2)
    crash, simple = results
    assert crash.status == "FAIL" and "worker process died" in crash.reason
    assert simple.status == "ok", simple.reason


def test_judge_shared_memory_limits():
    row = check.Result("k", "sm_80", registers=32, spill_stores=0, spill_loads=0, wgmma=False)
    row.shared_bytes = 166912  # exactly sm_80's 163 KB
    assert check.judge(row, check.ARCHS["sm_80"], expects_wgmma=False) == []
    row.shared_bytes += 1
    assert "shared memory" in check.judge(row, check.ARCHS["sm_80"], expects_wgmma=False)[0]
    assert check.judge(row, check.ARCHS["sm_90"], expects_wgmma=False) == []  # 227 KB there
    row.shared_bytes = 232449
    assert "shared memory" in check.judge(row, check.ARCHS["sm_90"], expects_wgmma=False)[0]


def test_parse_ptxas_output_sums_spills_over_functions():
    out = (
        "ptxas info    : Function properties for helper\n"
        "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    0 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers\n"
    )
    expected = check.PtxasStats(registers=168, spill_stores=24, spill_loads=16)
    assert check.parse_ptxas_output(out) == expected
    with pytest.raises(RuntimeError, match="unexpected ptxas"):
        check.parse_ptxas_output("ptxas fatal: something")


def test_cli_exit_codes_and_json(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(check, "_load_specs", lambda: [SIMPLE, BROKEN])
    report = tmp_path / "report.json"
    assert check.main(["--arch", "sm_80", "--jobs", "2", "--filter", "1024", "--json", str(report)]) == 0
    table = capsys.readouterr().out
    assert "scale[b=1024]" in table and "ok" in table and "scale[b=100]" not in table
    data = json.loads(report.read_text())
    got = [(r["kernel"], r["arch"], r["status"]) for r in data["results"]]
    assert got == [("scale[b=1024]", "sm_80", "ok")]
    assert check.main(["--arch", "sm_80", "--jobs", "2", "--filter", "b=100"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_cli_list_and_usage_errors(monkeypatch, capsys):
    monkeypatch.setattr(check, "_load_specs", lambda: [SIMPLE, BROKEN])
    assert check.main(["--list"]) == 0
    assert capsys.readouterr().out.split() == ["scale[b=1024]", "scale[b=100]"]
    assert check.main(["--arch", "sm_75"]) == 2
    assert check.main(["--filter", "nothing-matches"]) == 2


def test_coverage_says_which_specs_compile_for_one_arch_only():
    specs = [SIMPLE, GEMM, SIMPLE_SM80, SIMPLE_SM90]
    assert len(check._plan(specs, ARCHS)) == 2 * 2 + 1 + 1
    lines = check._coverage_lines(specs, ARCHS)
    assert "2 spec(s) compile for each of sm_80, sm_90; 2 are launched on one architecture family only" in lines[0]
    assert lines[1:] == ["    sm_80 only: 1 spec(s) of scale_ampere", "    sm_90 only: 1 spec(s) of scale_hopper"]
    assert check._coverage_lines([SIMPLE, GEMM], ARCHS) == []
    only_sm90 = check._coverage_lines(specs, ["sm_90"])
    assert only_sm90[-1] == "    no requested target (skipped): 1 spec(s) of scale_ampere"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _finish(progress: check._Progress, results: int, failed: int = 0) -> None:
    """Report ``results`` results to ``progress``, the first ``failed`` of them failed."""
    for i in range(results):
        progress(check.Result("k", "sm_80", status="FAIL" if i < failed else "ok"))


def test_progress_in_a_log_is_a_line_per_tenth():
    log = io.StringIO()
    _finish(check._Progress(268, log), 268, failed=3)
    lines = log.getvalue().splitlines()
    assert len(lines) == 10  # every 27th result, and the last
    assert lines[0].startswith("fastpeft check: 27/268 compiled (10%), 3 failed")
    assert lines[-1].startswith("fastpeft check: 268/268 compiled (100%), 3 failed")


def test_progress_on_a_terminal_is_one_line_rewritten():
    terminal = _Terminal()
    _finish(check._Progress(5, terminal), 5)
    text = terminal.getvalue()
    assert text.count("\r") == 5 and text.count("\n") == 1 and text.endswith("\n")
    assert text.rsplit("\r", 1)[1].startswith("fastpeft check: 5/5 compiled (100%), 0 failed")


def test_cli_header_counts_compiles_and_progress_goes_to_stderr(monkeypatch, capsys):
    monkeypatch.setattr(check, "_load_specs", lambda: [SIMPLE, SIMPLE_SM90])
    assert check.main(["--arch", "sm_80,sm_90", "--jobs", "2"]) == 0
    out, err = capsys.readouterr()
    assert "fastpeft check: 2 spec(s) for sm_80, sm_90: 3 compile(s) with 2 process(es)" in err
    assert "sm_90 only: 1 spec(s) of scale_hopper" in err
    assert "fastpeft check: 3/3 compiled (100%), 0 failed" in err
    assert "compiled" not in out and "3 passed, 0 failed" in out
    assert "register spills: 0 bytes in all" in out
    assert "GPU-scope fences / ordered atomics: 0 configuration(s)" in out
    assert "global atomics: 0 configuration(s)" in out


@pytest.mark.parametrize("arch", ARCHS)
def test_acq_rel_atomic_fails(rows, arch):
    """``tl.atomic_add``'s default semantics (acq_rel) is a GPU-wide fence per call: FAIL."""
    row = rows[ATOMIC.name, arch]
    assert row.spill_bytes == 0 and row.sync.startswith("atom.global.gpu.acq_rel.add.")  # .f32, or .v2.f32 on sm_90
    assert row.status == "FAIL" and f"GPU-scope fence or ordered atomic ({row.sync})" in row.reason
    assert row.atomics == row.sync and f"{ATOMIC.name} uses global atomics ({row.atomics})" in row.reason


@pytest.mark.parametrize("arch", ARCHS)
def test_relaxed_atomic_fails_as_not_reproducible(rows, arch):
    """A relaxed ``tl.atomic_add`` has no fence (``forbidden_sync`` passes it), but the order in
    which the programs' adds land varies run to run: fastpeft's kernels are documented free of
    atomics (bitwise reproducible), so any global atomic fails, naming the kernel."""
    row = rows[RELAXED_ATOMIC.name, arch]
    assert row.spill_bytes == 0 and row.sync == ""
    assert row.atomics.startswith("red.global.gpu.relaxed.add.")  # .f32, or .v2.f32 on sm_90
    assert row.status == "FAIL"
    assert row.reason == (f"relaxed_atomic_sum[b=256] uses global atomics ({row.atomics}): fastpeft's kernels are "
                          "documented as free of atomics (fixed-order reductions, bitwise reproducible), relaxed "
                          "atomics included")


def test_cli_summary_names_the_kernels_with_global_atomics(monkeypatch, capsys):
    monkeypatch.setattr(check, "_load_specs", lambda: [SIMPLE, RELAXED_ATOMIC])
    assert check.main(["--arch", "sm_80", "--jobs", "2"]) == 1
    out = capsys.readouterr().out
    assert "global atomics: 1 configuration(s) (relaxed_atomic_sum)" in out and "1 passed, 1 failed" in out


def test_gemm_reports_its_wgmma_shape(rows):
    """128 x 128 on 8 warps: two warpgroups of 64 rows, each m64n128 (k16 for bf16)."""
    assert rows[GEMM.name, "sm_90"].wgmma_shapes == "m64n128k16"
    assert rows[GEMM.name, "sm_80"].wgmma_shapes == ""
    assert check.wgmma_shapes("wgmma.mma_async.sync.aligned.m64n64k8.f32.tf32.tf32 {...};\n"
                              "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {...};") == ["m64n128k16",
                                                                                                 "m64n64k8"]


# Instruction lines of compiled kernels (as Triton 3.9 writes them, guards included) that order
# memory GPU-wide, with the opcode forbidden_sync reports for each.
FORBIDDEN_PTX = {
    "\t@%p1 atom.global.gpu.acq_rel.add.f32 \t%r1, [ %rd2 + 0 ], %r2;": "atom.global.gpu.acq_rel.add.f32",
    "\t@!%p2 atom.global.release.gpu.add.f32 %r3, [%rd4], %r5;": "atom.global.release.gpu.add.f32",
    "\tatom.acquire.sys.global.cas.b32 %r1, [%rd1], %r2, %r3;": "atom.acquire.sys.global.cas.b32",
    "\tatom.global.acq_rel.add.f32 %r1, [%rd1], %r2;": "atom.global.acq_rel.add.f32",  # default scope: gpu
    "\tred.release.gpu.global.add.f32 [%rd1], %r2;": "red.release.gpu.global.add.f32",
    "\tld.acquire.gpu.global.b32 %r1, [%rd1];": "ld.acquire.gpu.global.b32",
    "\tmembar.gl;": "membar.gl",
    "\tmembar.sys;": "membar.sys",
    "\tfence.acq_rel.gpu;": "fence.acq_rel.gpu",
    "\tfence.sc.gpu;": "fence.sc.gpu",
    "\tfence.sc.sys;": "fence.sc.sys",
}
# Lines forbidden_sync must pass: relaxed (or unqualified) atomics, CTA and cluster scopes,
# barriers, the fences of Hopper GEMMs, and the words in comments or debug directives. (The two
# global atomics among them fail another rule: global_atomics, tested below.)
ALLOWED_PTX = [
    "\t@%p1 red.global.gpu.relaxed.add.f32 \t[ %rd2 + 0 ], %r1;",
    "\tatom.global.add.f32 %r1, [%rd2], %r2;",
    "\tatom.shared.cta.acq_rel.add.u32 %r1, [%r2], 1;",
    "\twgmma.fence.sync.aligned;",
    "\twgmma.commit_group.sync.aligned;",
    "\tfence.proxy.async.shared::cta;",
    "\tfence.mbarrier_init.release.cluster;",
    "\tfence.acq_rel.cluster;",
    "\tmembar.cta;",
    "\tbar.sync \t0;",
    "\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
    "\t// membar.gl and atom.global.gpu.acq_rel in a comment",
    "\t.loc\t1 12 3                          // membar.gl.py:12:3",
    "$L__BB0_2:",
]


# Instruction lines that read-modify-write global memory atomically, whatever their memory
# order, with the opcode global_atomics reports for each.
GLOBAL_ATOMIC_PTX = {
    "\t@%p1 red.global.gpu.relaxed.add.f32 \t[ %rd2 + 0 ], %r1;": "red.global.gpu.relaxed.add.f32",
    "\t@%p1 red.global.gpu.relaxed.add.v2.f32 \t[ %rd2 + 0 ], { %r1, %r2 };": "red.global.gpu.relaxed.add.v2.f32",
    "\tatom.global.add.f32 %r1, [%rd2], %r2;": "atom.global.add.f32",
    "\t@!%p2 atom.global.gpu.acq_rel.add.f32 \t%r1, [ %rd2 + 0 ], %r2;": "atom.global.gpu.acq_rel.add.f32",
    "\tatom.add.f32 %f1, [%rd1], %f2;": "atom.add.f32",  # generic address: may be global
    "\tred.relaxed.gpu.global.max.s32 [%rd1], %r2;": "red.relaxed.gpu.global.max.s32",
    "\tatom.global.cas.b32 %r1, [%rd1], %r2, %r3;": "atom.global.cas.b32",
    "\tmultimem.red.relaxed.gpu.global.add.f32 [%rd1], %f1;": "multimem.red.relaxed.gpu.global.add.f32",
    "\tcp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%rd1], [%r1], 256;":
        "cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32",
    "\tcp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group [%rd1, {%r1, %r2}], [%r3];":
        "cp.reduce.async.bulk.tensor.2d.global.shared::cta.add.tile.bulk_group",
}
# Lines that are no global atomic: shared-memory atomics, plain and bulk loads/stores, bulk
# reductions into (cluster) shared memory, and the words in comments.
NOT_GLOBAL_ATOMIC_PTX = [
    "\tatom.shared.cta.acq_rel.add.u32 %r1, [%r2], 1;",
    "\tatom.shared::cta.add.f32 %f1, [%r2], %f2;",
    "\tred.shared::cluster.add.u32 [%r1], 1;",
    "\tst.global.v4.b32 [ %rd1 + 0 ], { %r1, %r2, %r3, %r4 };",
    "\tld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
    "\tcp.async.bulk.global.shared::cta.bulk_group [%rd1], [%r1], 256;",
    "\tcp.reduce.async.bulk.shared::cluster.shared::cta.mbarrier::complete_tx::bytes.add.u32 [%r1], [%r2], 64, [%r3];",
    "\tmbarrier.arrive.shared::cta.b64 %rd1, [%r1];",
    "\t// red.global.add.f32 and atom.global in a comment",
    "\t.loc\t1 12 3                          // atom.global.py:12:3",
]


# Each PTX rule, the lines it flags (with the opcode it reports) and lines it must pass.
RULES = {
    "forbidden_sync": (check.forbidden_sync, FORBIDDEN_PTX, ALLOWED_PTX),
    "global_atomics": (check.global_atomics, GLOBAL_ATOMIC_PTX, NOT_GLOBAL_ATOMIC_PTX),
}


@pytest.mark.parametrize("rule,line,opcode", [(rule, line, opcode) for rule, (_, flagged, _) in RULES.items()
                                              for line, opcode in flagged.items()])
def test_rule_flags_each_line(rule, line, opcode):
    find, _, passing = RULES[rule]
    assert find("\n".join([*passing, line, *passing])) == [opcode]


@pytest.mark.parametrize("rule", RULES)
def test_rule_passes_its_allowed_lines_and_reports_each_opcode_once(rule):
    find, flagged, passing = RULES[rule]
    assert find("\n".join(passing)) == []
    assert find("\n".join([*flagged, *flagged])) == list(flagged.values())  # each once, in order


def test_judge_fails_on_global_atomics():
    row = check.Result("k[b=64]", "sm_80", registers=32, spill_stores=0, spill_loads=0, shared_bytes=0, wgmma=False)
    row.atomics = "red.global.gpu.relaxed.add.f32"
    problems = check.judge(row, check.ARCHS["sm_80"], expects_wgmma=False)
    assert problems == ["k[b=64] uses global atomics (red.global.gpu.relaxed.add.f32): fastpeft's kernels are "
                        "documented as free of atomics (fixed-order reductions, bitwise reproducible), relaxed "
                        "atomics included"]


def test_judge_fails_on_forbidden_sync():
    row = check.Result("k", "sm_90", registers=32, spill_stores=0, spill_loads=0, shared_bytes=0, wgmma=False)
    assert check.judge(row, check.ARCHS["sm_90"], expects_wgmma=False) == []
    row.sync = "membar.gl"
    problems = check.judge(row, check.ARCHS["sm_90"], expects_wgmma=False)
    assert problems == ["GPU-scope fence or ordered atomic (membar.gl)"]


def test_unspecialized_parameters_are_not_compiled_as_aligned():
    """A do_not_specialize integer is never a multiple of 16 to Triton's launcher: specs leave
    it plain by default, and naming it in divisible_by_16 is an invalid spec."""
    assert ANY_N.aligned_params() == ("x_ptr", "y_ptr")
    assert check._spec_problem(ANY_N) is None
    wrong = dataclasses.replace(ANY_N, divisible_by_16=("x_ptr", "n"))
    assert "never specializes" in check._spec_problem(wrong)


def _fastpeft_spec(prefix: str, contains: str) -> KernelSpec:
    (spec,) = [s for s in all_kernel_specs() if s.name.startswith(prefix) and contains in s.name]
    return spec


@pytest.fixture(scope="module")
def fastpeft_rows() -> dict[str, check.Result]:
    """Three of fastpeft's own configurations compiled for sm_90: the dA/dB kernel of the
    backward (rank 64, dropout), the forward GEMM on the medium (M 17-512) tile and the
    opt-in TMA forward (rank 64)."""
    specs = [
        _fastpeft_spec("lora_bwd_wgrad[", "R64,HAS_DROPOUT=1,bf16/fp32"),
        _fastpeft_spec("lora_fwd[64x128x64,w4,", "R16,HAS_BIAS=1,HAS_SCALE=0,FUSE_SHRINK=0,bf16/fp32"),
        _fastpeft_spec("lora_fwd_tma[", "R64,HAS_BIAS=1,HAS_SCALE=0,fp16/fp16"),
    ]
    return {r.kernel.split("[", 1)[0]: r for r in check._run(specs, ["sm_90"], jobs=2)}


def test_backward_reduction_has_no_fences_or_spills(fastpeft_rows):
    row = fastpeft_rows["lora_bwd_wgrad"]
    assert row.status == "ok", row.reason
    assert row.sync == "" and row.atomics == "" and row.spill_bytes == 0


def test_medium_tile_is_one_warpgroup_wide_wgmma_on_sm90(fastpeft_rows):
    """The 64-row tile on 4 warps: one warpgroup multiplies 64 x 128 per instruction (on 8
    warps it was two warpgroups of m64n64), and the fp32 adapter's s B^T runs in tf32 (k8)."""
    row = fastpeft_rows["lora_fwd"]
    assert row.status == "ok", row.reason
    assert row.wgmma_shapes.split("+") == ["m64n128k16", "m64n128k8"]


def test_tma_forward_loads_through_tma_with_wgmma_and_no_spills(fastpeft_rows):
    row = fastpeft_rows["lora_fwd_tma"]
    assert row.status == "ok", row.reason
    assert row.tma and row.wgmma_shapes.split("+") == ["m64n256k16"] and row.spill_bytes == 0


@pytest.mark.parametrize("line,found", [
    ("\tcp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd2, {%r3, %r4}], [%r5];",
     True),
    ("\t@%p1 cp.async.bulk.tensor.3d.shared::cta.global.tile.mbarrier::complete_tx::bytes [%r1], [%rd2], [%r5];",
     True),
    ("\tcp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%rd2, {%r3, %r4}], [%r1];", False),  # a TMA store
    ("\tcp.async.cg.shared.global [%r1], [%rd2], 16;", False),  # a pointer load (cp.async)
])
def test_has_tma_loads(line, found):
    assert check.has_tma_loads(f".visible .entry k()\n{{\n{line}\n}}") is found


def test_judge_fails_on_missing_tma_loads_on_sm90_only():
    row = check.Result("k", "sm_90", registers=32, spill_stores=0, spill_loads=0, shared_bytes=0, wgmma=True, tma=False)
    assert "expected TMA loads" in check.judge(row, check.ARCHS["sm_90"], expects_wgmma=True, expects_tma=True)[0]
    assert check.judge(row, check.ARCHS["sm_90"], expects_wgmma=True) == []
    assert check.judge(row, check.ARCHS["sm_80"], expects_wgmma=False, expects_tma=True) == []
    row.tma = True
    assert check.judge(row, check.ARCHS["sm_90"], expects_wgmma=True, expects_tma=True) == []
