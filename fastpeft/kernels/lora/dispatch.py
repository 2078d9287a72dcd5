"""Which implementation of the LoRA linear op runs a given problem, and the per-shape table
that decides it once the kernels are validated on a GPU.

Implementations:
- ``fused`` (``fastpeft.kernels.lora.launch``): the base GEMM in Triton with the LoRA term in its epilogue.
- ``fused-tma``: the same kernels with the sm_90 TMA + persistent forward GEMM
  (``lora_fwd_tma_kernel``) where its plan allows it (sm_90, the large-M tile without split-K,
  16-byte aligned x and W: ``fastpeft.kernels.lora.configs.plan_forward``), exactly ``fused``
  elsewhere; its backward is ``fused``'s. No rule of thumb picks it: only a table written from a
  GPU run that timed it (``fastpeft tune`` on sm_90, or the focused benchmark's ``fused-tma`` row)
  and found it fastest.
- ``hybrid`` (``lora_hybrid_launch``): cuBLAS for the base GEMMs, accumulating onto a LoRA
  term written by Triton.
- ``torch`` (``fastpeft.ops.lora_linear_torch``): torch composite ops.

``choose_implementation`` is what the op asks, in its forward, its fake and its backward: a
pure function of shapes, dtypes, device, the mode (inference, or a training step: the op's
``training`` argument, true when a backward follows) and ``FASTPEFT_BACKEND`` (never of tensor
values, so compiled graphs and CUDA graphs see the choice eager mode makes). A training step
runs the forward and the backward the table chose together, from timings of both passes
together: the pair that runs is the pair that was timed (a forward timed without dropout or
backward does not decide a training step's). ``triton`` forces ``fused``
(``FASTPEFT_LORA_TMA=1`` then turns its TMA forward on), ``hybrid`` forces ``hybrid``; ``auto``
on a GPU follows the table ``fastpeft tune`` made on that GPU and software
(``fastpeft.kernels.tuned_table``: only what passed validation there, the torch path where
nothing was faster beyond the spread), else this module's table once
``KERNELS_VALIDATED_ON_GPU``, else the torch path.

The table (``dispatch_table.json``, shipped in the package; schema ``SCHEMA``) is a JSON
object ``{"schema": SCHEMA, "entries": [...]}``. Each entry has ``"implementation"`` (one of
``IMPLEMENTATIONS``), ``"measured"`` (the measurement that chose it: an object
``{"gpu", "date", "m", "ranks", "median_ms": {impl: ms}, "ratio"}``, or a string starting with
``"unmeasured"`` that says which rule of thumb chose it), and optional conditions, each
absent meaning "any":
- ``"arch"``: ``"sm_XY"``; it matches the devices of its family (``sm_90`` and newer, or
  older), the split the kernels' tile tables use;
- ``"dtype"``: the activation dtype, torch's name (``"bfloat16"``, ``"float16"``);
- ``"mode"``: ``"inference"`` (a forward without backward) or ``"training"`` (both passes of
  a training step);
- ``"m_min"``, ``"m_max"``: the range of rows M (inclusive; no ``m_max``: unbounded);
- ``"n"``, ``"k"`` (together): the layer shape it was measured on.
Lookup: among the entries whose conditions hold, those with a shape come first, the one
nearest in ``|log2(N/n)| + |log2(K/k)|``; then the shapeless ones; ties by order. Entries
without arch, dtype, mode or shape must cover every M >= 1, so every lookup finds one.

An inference forward and a training step may pick different implementations. (A forward and a
backward may also differ, e.g. under a forced backend changed between them: every kernel path
saves the same ``s``, fp32 ``x_hat A^T``, and no mask, which it regenerates from the seed, and a
torch backward after a kernel forward regenerates the mask: ``fastpeft.ops.lora_linear``.)

Writing a table from what ``fastpeft tune`` validated and timed (the GPU run does this:
``table_from_tune``, the tuned table's own choice per layer shape, mode and measured M, at
every rank measured there), or from benchmark results::

    python -m fastpeft.kernels.lora.dispatch --from-tune tune.json --out table.json [--arch sm_90]
    python -m fastpeft.kernels.lora.dispatch --from-bench bench.json --out table.json [--arch sm_90]

``bench.json`` is ``fastpeft bench``'s JSON (schema ``fastpeft-bench/4``); what is read:
- ``settings``: ``"device_name"`` (the GPU, recorded), ``"date"`` (recorded), ``"dtype"``
  (torch's name, required), optionally ``"arch"`` (``"sm_90"``; else ``--arch``, else the
  current CUDA device's);
- ``timings``: rows ``{"m", "n", "k", "r", "mode", "impl", "ms", "error"}`` where ``mode`` is
  ``"fwd"`` (decides inference) or ``"fwd+bwd"`` (decides training: a whole step's winner), ``impl`` one of
  ``IMPLEMENTATIONS`` (other rows are ignored),
  ``ms`` the median time in ms, a number or ``{"value": median, ...}``; rows with an
  ``error``, no time, a ``status`` other than ``"ok"`` or a ``runs`` other than ``impl`` (the
  row ran another path, e.g. the torch path for a kernel row on CPU) are skipped.
  ``fastpeft.bench.focused``'s JSON (``--dispatch-input``) has this layout.
Per (mode, n, k, m) the implementation with the smallest sum of medians over the ranks
measured wins (an implementation missing a rank the others have is out). Entries for the
measured Ms of one (mode, n, k) split M at the geometric means of neighbouring Ms, from 1 to
unbounded. The shipped table's shapeless entries (the rules of thumb) follow, as fallback.
"""

from __future__ import annotations

import argparse
import functools
import importlib.resources
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from fastpeft.backend import backend_choice, follows_tuned_table, use_triton
from fastpeft.kernels import tuned_table
from fastpeft.kernels.lora.configs import MAX_RANK, device_info, kernel_friendly

# The implementations, named as the benchmark's rows are (and as FASTPEFT_BACKEND's choices
# hybrid and torch; "fused" is what FASTPEFT_BACKEND=triton forces, "fused-tma" what it runs
# with FASTPEFT_LORA_TMA=1).
FUSED, FUSED_TMA, HYBRID, TORCH = "fused", "fused-tma", "hybrid", "torch"
IMPLEMENTATIONS = (FUSED, FUSED_TMA, HYBRID, TORCH)
# What a table decides on its own: a forward without backward, and a training step's passes.
INFERENCE, TRAINING = "inference", "training"
MODES = (INFERENCE, TRAINING)
# Versions the table format: a reader refuses a table written for another one.
# /2: entries keyed on "mode" (inference, training), not on the pass.
SCHEMA = "fastpeft-lora-dispatch/2"
# The shipped table, package data next to this module.
TABLE_FILE = "dispatch_table.json"
# Benchmark modes (fastpeft.bench.cases) and the mode each one decides.
BENCH_MODES = {"fwd": INFERENCE, "fwd+bwd": TRAINING}
# The keys of an entry that restrict which problems it decides.
_CONDITIONS = ("arch", "dtype", "mode", "m_min", "m_max", "n", "k")
# Architecture families, as in the kernels' tile tables (fastpeft.kernels.lora.configs): sm_90 and newer
# (Hopper tables) and older GPUs (Ampere tables).
_HOPPER = 90


def choose_implementation(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, training: bool,
                          dropout: bool = False) -> str:
    """One of ``IMPLEMENTATIONS`` for x ``[..., K]``, W ``[N, K]``, A ``[R, K]`` in an
    inference forward, or (``training``) in either pass of a training step (``dropout``: with
    dropout; only a tuned table tells the two apart).

    The torch path takes ranks above MAX_RANK, empty problems (any of M, K, N zero), float64
    (no tensor cores; the kernels' tiles are sized for 16-bit), fp32 activations on a GPU
    (Triton's IEEE-fp32 ``tl.dot`` runs on FMA units, with tiles too small to compete with
    cuBLAS, and the kernels are compiled and checked for 16-bit activations only; fp32 still
    runs the kernels in the interpreter), and CUDA problems whose x or W would launch a
    variant ``fastpeft check`` does not compile (``fastpeft.kernels.lora.configs.kernel_friendly``: e.g. K or N
    not a multiple of 16, where the unaligned 64-row hybrid forward tile spills hundreds of
    bytes; the launchers make the small operands comply).
    """
    choice = backend_choice()
    # ``auto`` on a GPU follows the table ``fastpeft tune`` made there, if any (tuned_table).
    tunable = follows_tuned_table(x.device, choice)
    if lora_a.shape[0] > MAX_RANK or x.numel() == 0 or weight.numel() == 0:
        return TORCH
    if not (tunable or use_triton(x.device)):
        return TORCH
    if torch.float64 in (x.dtype, lora_a.dtype) or (x.dtype == torch.float32 and x.device.type == "cuda"):
        return TORCH
    if not kernel_friendly(x, weight):
        return TORCH
    if choice == "triton":
        return FUSED
    if choice == "hybrid":
        return HYBRID
    n, k = weight.shape
    m, mode = x.numel() // k, TRAINING if training else INFERENCE
    if tunable:
        picked = tuned_table.tuned_choice(x.device, "lora", tuned_table.mode_of(training, dropout), x.dtype, m, k,
                                          n, lora_a.shape[0])
        if picked is not None:
            return picked if picked in IMPLEMENTATIONS else TORCH
        if not use_triton(x.device):  # no table, and the kernels not validated by the project
            return TORCH
    return lookup(shipped_table(), arch=device_arch(x.device), dtype=x.dtype, mode=mode, m=m, n=n, k=k)[
        "implementation"]


def device_arch(device: torch.device) -> str:
    """``"sm_XY"`` of ``device`` (``device_info``'s fixed sm_90 in the interpreter)."""
    return f"sm_{device_info(device)[1]}"


def _family(arch: str) -> int:
    """90 for ``"sm_90"`` and newer, 80 below."""
    return _HOPPER if int(arch.removeprefix("sm_")) >= _HOPPER else 80


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _matches(entry: dict, arch: str, dtype: str, mode: str, m: int) -> bool:
    return (
        ("arch" not in entry or _family(entry["arch"]) == _family(arch))
        and entry.get("dtype", dtype) == dtype
        and entry.get("mode", mode) == mode
        and entry.get("m_min", 1) <= m
        and ("m_max" not in entry or m <= entry["m_max"])
    )


def _shape_distance(entry: dict, n: int, k: int) -> float:
    """How far ``(n, k)`` is from the entry's shape, in octaves (inf for shapeless entries)."""
    if "n" not in entry:
        return math.inf
    return abs(math.log2(n / entry["n"])) + abs(math.log2(k / entry["k"]))


def lookup(table: dict, *, arch: str, dtype: torch.dtype | str, mode: str, m: int, n: int, k: int) -> dict:
    """The entry of ``table`` that decides a problem (see the module docstring), for
    ``arch`` ``"sm_XY"``, activation ``dtype``, ``mode`` (``INFERENCE`` or ``TRAINING``), M rows
    and W ``[n, k]``."""
    dtype = dtype if isinstance(dtype, str) else _dtype_name(dtype)
    candidates = [e for e in table["entries"] if _matches(e, arch, dtype, mode, m)]
    if not candidates:
        raise LookupError(f"dispatch table has no entry for {arch} {dtype} {mode} M={m}")
    return min(candidates, key=lambda e: _shape_distance(e, n, k))  # min keeps the first of ties


def validate_table(table: Any) -> dict:
    """``table`` if it follows the schema (module docstring), else ValueError saying what is wrong."""
    if not isinstance(table, dict) or table.get("schema") != SCHEMA or not isinstance(table.get("entries"), list):
        raise ValueError(f"dispatch table must be an object with schema {SCHEMA!r} and a list of entries")
    for i, e in enumerate(table["entries"]):
        where = f"dispatch table entry {i} ({e!r})"
        if not isinstance(e, dict) or e.get("implementation") not in IMPLEMENTATIONS:
            raise ValueError(f"{where}: implementation must be one of {IMPLEMENTATIONS}")
        measured = e.get("measured")
        if not (isinstance(measured, dict) or (isinstance(measured, str) and measured.startswith("unmeasured"))):
            raise ValueError(f"{where}: 'measured' must be a measurement object or an 'unmeasured: ...' string")
        unknown = set(e) - {"implementation", "measured", *_CONDITIONS}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        if ("n" in e) != ("k" in e):
            raise ValueError(f"{where}: 'n' and 'k' go together")
        if "arch" in e and not (isinstance(e["arch"], str) and e["arch"].startswith("sm_") and e["arch"][3:].isdigit()):
            raise ValueError(f"{where}: arch must be 'sm_XY'")
        if "mode" in e and e["mode"] not in MODES:
            raise ValueError(f"{where}: mode must be one of {MODES}")
        if e.get("m_min", 1) < 1 or e.get("m_max", math.inf) < e.get("m_min", 1):
            raise ValueError(f"{where}: needs 1 <= m_min <= m_max")
    _check_fallback_coverage(table["entries"])
    return table


def _fallback_entries(entries: Sequence[dict]) -> list[dict]:
    """The entries without arch, dtype, mode or shape conditions (only an M range)."""
    return [e for e in entries if not set(e) & {"arch", "dtype", "mode", "n"}]


def _check_fallback_coverage(entries: Sequence[dict]) -> None:
    """The fallback entries must cover every M >= 1 (then every lookup finds an entry)."""
    covered = 0  # every M <= covered has a fallback entry
    for e in sorted(_fallback_entries(entries), key=lambda e: e.get("m_min", 1)):
        if e.get("m_min", 1) > covered + 1:
            break
        covered = max(covered, e.get("m_max", math.inf))
    if covered != math.inf:
        raise ValueError(f"dispatch table: the entries without arch/dtype/mode/shape must cover every M >= 1; "
                         f"M = {covered + 1} has none")


@functools.cache
def shipped_table() -> dict:
    """The table shipped in the package (read once)."""
    text = importlib.resources.files(__package__).joinpath(TABLE_FILE).read_text()
    return validate_table(json.loads(text))


def _median_ms(ms: Any) -> float | None:
    value = ms.get("value") if isinstance(ms, dict) else ms
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else None


def _bench_times(bench: dict) -> dict[tuple, dict[str, dict[int, float]]]:
    """``{(mode, n, k, m): {impl: {r: median ms}}}`` from the bench JSON's usable rows."""
    times: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for row in bench.get("timings", []):
        ms = _median_ms(row.get("ms"))
        if row.get("impl") not in IMPLEMENTATIONS or row.get("mode") not in BENCH_MODES or ms is None:
            continue
        if row.get("error") or row.get("status", "ok") != "ok" or row.get("runs", row["impl"]) != row["impl"]:
            continue
        key = (BENCH_MODES[row["mode"]], int(row["n"]), int(row["k"]), int(row["m"]))
        times[key][row["impl"]][int(row["r"])] = ms
    return times


def _winner(per_impl: dict[str, dict[int, float]]) -> tuple[str, dict[str, float], list[int]] | None:
    """(winner, {impl: summed ms}, ranks) over the implementations measured at every rank any
    of them was; None when none was."""
    ranks = sorted(set().union(*(set(t) for t in per_impl.values())))
    totals = {impl: sum(t[r] for r in ranks) for impl, t in per_impl.items() if set(ranks) <= set(t)}
    if not totals:
        return None
    return min(totals, key=totals.get), totals, ranks


def table_from_bench(bench: dict, arch: str, base: dict | None = None) -> dict:
    """A dispatch table from benchmark results (input format in the module docstring) measured
    on ``arch`` (``"sm_XY"``); the shapeless entries of ``base`` (default: the shipped table)
    follow the measured ones as fallback."""
    settings = bench.get("settings", {})
    if not isinstance(settings.get("dtype"), str):
        raise ValueError("bench JSON: settings.dtype (the activation dtype, e.g. 'bfloat16') is required")
    winners = {key: won for key, per_impl in _bench_times(bench).items()
               if (won := _winner(per_impl)) is not None}
    if not winners:
        raise ValueError(f"bench JSON: no usable timings (impl one of {IMPLEMENTATIONS} that ran as itself, "
                         "mode fwd or fwd+bwd, a median time, no error)")
    return _table(winners, arch, settings["dtype"], settings.get("device_name", "unknown GPU"),
                  settings.get("date", "unknown date"), base)


def table_from_tune(tuned: dict, arch: str, date: str, base: dict | None = None) -> dict:
    """A dispatch table from a ``fastpeft tune`` table (``fastpeft.kernels.tuned_table``; or its
    report, which holds it as ``"table"``) made on ``arch``, the choice made by the tuned
    table's own rule (``tuned_table.choose``: what passed validation there, only where it beats
    the torch path beyond the spread): per LoRA layer shape, mode (inference, and training
    without dropout: this table does not tell dropout apart) and measured M, the implementation
    the tuned table picks at every rank measured there, the torch path where the ranks
    disagree. ``date``: the tuning run's. The shapeless entries of ``base`` follow as fallback."""
    table = tuned_table.validate_table(tuned.get("table", tuned))
    lora = [e for e in table["entries"] if e["op"] == "lora" and e["mode"] in MODES]
    dtypes = {e["dtype"] for e in lora}
    if len(dtypes) != 1:
        raise ValueError(f"tuned table: expected LoRA entries of one activation dtype, found {sorted(dtypes) or 'none'}")
    (dtype,) = dtypes
    shapes: dict[tuple, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for e in lora:
        if e["passed"]:
            shapes[(e["mode"], e["N"], e["K"], e["M"])][e["implementation"]][e["r"]] = e["median_us"] / 1e3
    winners = {}
    for (mode, n, k, m), per_impl in shapes.items():
        ranks = sorted(set().union(*(set(t) for t in per_impl.values())))
        picks = {tuned_table.choose(table, "lora", mode, dtype, m, k, n, r) for r in ranks}
        totals = {impl: sum(t[r] for r in ranks) for impl, t in per_impl.items() if set(ranks) <= set(t)}
        winner = picks.pop() if len(picks) == 1 else TORCH
        if winner in totals:
            winners[(mode, n, k, m)] = (winner, totals, ranks)
    if not winners:
        raise ValueError("tuned table: no LoRA shape where an implementation that passed was timed at every rank")
    return _table(winners, arch, dtype, table["device"]["gpu"], date, base)


def _table(winners: dict[tuple, tuple[str, dict[str, float], list[int]]], arch: str, dtype: str, gpu: str, date: str,
           base: dict | None) -> dict:
    """The table of ``winners`` (``{(mode, n, k, m): (implementation, {impl: summed ms over the
    ranks}, ranks)}``) on ``arch`` and ``dtype``: per (mode, n, k) the measured Ms split at the
    geometric means of neighbours, from 1 to unbounded; then ``base``'s shapeless entries."""
    groups: dict[tuple, list[tuple[int, tuple]]] = defaultdict(list)
    for (mode, n, k, m), won in winners.items():
        groups[(mode, n, k)].append((m, won))
    entries = []
    for (mode, n, k), measured in sorted(groups.items()):
        measured.sort()
        for i, (m, (impl, totals, ranks)) in enumerate(measured):
            ordered = sorted(totals.values())
            entry = {"arch": arch, "dtype": dtype, "mode": mode, "n": n, "k": k}
            if i:
                entry["m_min"] = math.isqrt(measured[i - 1][0] * m) + 1
            if i + 1 < len(measured):
                entry["m_max"] = math.isqrt(m * measured[i + 1][0])
            entry["implementation"] = impl
            entry["measured"] = {
                "gpu": gpu, "date": date, "m": m, "ranks": ranks,
                "median_ms": {name: round(t, 6) for name, t in sorted(totals.items())},
                # the fastest time over the runner-up's (< 1: by how much it won)
                "ratio": round(ordered[0] / ordered[1], 4) if len(ordered) > 1 else None,
            }
            entries.append(entry)
    fallback = _fallback_entries((base or shipped_table())["entries"])
    return validate_table({"schema": SCHEMA, "entries": entries + fallback})


def _current_arch() -> str | None:
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fastpeft.kernels.lora.dispatch (--from-tune TUNE_JSON | --from-bench BENCH_JSON) --out TABLE_JSON``."""
    parser = argparse.ArgumentParser(prog="python -m fastpeft.kernels.lora.dispatch",
                                     description="Write a LoRA dispatch table from fastpeft tune or bench JSON.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-tune", metavar="TUNE_JSON", help="fastpeft tune's table or --json report (what the "
                                                                  "GPU run uses)")
    source.add_argument("--from-bench", metavar="BENCH_JSON", help="fastpeft bench --json output")
    parser.add_argument("--out", required=True, metavar="TABLE_JSON", help="the table to write")
    parser.add_argument("--arch", help="the GPU it ran on, e.g. sm_90 (default: the tuned table's capability or "
                                       "the bench's settings.arch, else the current CUDA device)")
    parser.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="the tuning run's date (default: today)")
    args = parser.parse_args(argv)
    try:
        with open(args.from_tune or args.from_bench) as f:
            data = json.load(f)
        if args.from_tune:
            recorded = data.get("table", data).get("device", {}).get("capability")
        else:
            recorded = data.get("settings", {}).get("arch")
        arch = args.arch or recorded or _current_arch()
        if not (isinstance(arch, str) and arch.startswith("sm_") and arch[3:].isdigit()):
            raise ValueError(f"the GPU architecture is unknown or malformed ({arch!r}): pass --arch sm_XY")
        table = table_from_tune(data, arch, args.date) if args.from_tune else table_from_bench(data, arch)
        with open(args.out, "w") as f:
            json.dump(table, f, indent=1)
            f.write("\n")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        print(f"lora_dispatch: {e}", file=sys.stderr)
        return 2
    measured = sum(isinstance(e["measured"], dict) for e in table["entries"])
    print(f"lora_dispatch: wrote {args.out}: {measured} measured entries, "
          f"{len(table['entries']) - measured} fallback", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
