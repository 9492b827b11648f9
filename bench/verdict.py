"""Whether a ``bench/gpu_check.sh`` run meets issue 4's targets, read from what it wrote to ``$OUT``.

A GPU session has minutes to decide whether the issue can be resolved; this says it in a few
lines instead of leaving it to a reading of several tables: each target (PROTOCOL.md: varlen-b32
at least 2x TRL's best tokens/s at no more peak memory, fixed-b32 at least 1.1x), the parity
check of each configuration, the CUDA tests, whether the LM head's kept gradient paid against
``prospect-recompute``, and the device (a CPU rehearsal never meets them).

  python bench/verdict.py "$OUT"      # bench.json, bench_varlen.json, pytest_gpu.txt
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

#: the configurations whose target includes "at no more peak memory than TRL"
MEMORY_TARGETS = {"varlen-b32"}
BENCH_FILES = ("bench.json", "bench_varlen.json")


def pytest_counts(text: str) -> dict[str, int]:
    """``{"passed": n, "failed": n, ...}`` summed over pytest's summary lines in ``text`` (the
    full gpu_check appends a second pytest run to the same file)."""
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if not re.search(r" in [\d.]+s\b", line):
            continue
        for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped|deselected)\b", line):
            key = "error" if what.startswith("error") else what
            counts[key] = counts.get(key, 0) + int(n)
    return counts


def check(records: list[dict], env: dict, pytest_text: str | None) -> tuple[bool, list[str]]:
    """(every target met, one line per check) for the bench records of one run."""
    lines: list[str] = []
    ok = True
    device = env.get("device", "?")
    on_gpu = device not in ("cpu", "?")
    if not on_gpu:
        ok = False
        lines.append(f"device: {device}: a rehearsal; the targets are for a GPU")
    for config in ("fixed-b32", "varlen-b32"):
        rec = next((r for r in records if r.get("config") == config), None)
        if rec is None:
            ok = False
            lines.append(f"{config}: NOT MEASURED (section cut short or failed: see bench_log.txt)")
            continue
        target = rec.get("target_speedup")
        ours = rec["sides"].get("prospect", {})
        speedup = ours.get("speedup_vs_trl")
        if speedup is None or target is None:
            ok = False
            lines.append(f"{config}: NOT MEASURED (no TRL or no Prospect side)")
            continue
        met = speedup >= target
        mem = ours.get("mem_vs_trl")
        text = f"{config}: {speedup}x TRL's tokens/s (target {target}x)"
        if config in MEMORY_TARGETS:
            if mem is None:
                met = met and not on_gpu
                text += ", peak memory not measured"
            else:
                met = met and mem <= 1.0
                text += f", {mem}x TRL's peak memory (target <= 1.0x)"
        elif mem is not None:
            text += f", {mem}x TRL's peak memory (no target)"
        parity = rec.get("parity") or {}
        if not parity.get("pass", False):
            met = False
            text += "; parity FAIL" if parity else "; no parity check"
        ok = ok and met
        lines.append(f"{text} -> {'MET' if met else 'NOT MET'}")
        other = rec["sides"].get("prospect-recompute", {})
        if ours.get("tokens_per_s") and other.get("tokens_per_s"):
            ratio = ours["tokens_per_s"] / other["tokens_per_s"]
            advice = ("keep DEFAULT_GRAD_CACHE_GIB" if ratio >= 1.0 else
                      "the kept gradient did not pay: try DEFAULT_GRAD_CACHE_GIB = 0.0 (prospect-recompute's figures)")
            lines.append(f"{config}: kept LM-head gradient {ratio:.3f}x prospect-recompute's tokens/s -> {advice}")
    if pytest_text is None:
        ok = False
        lines.append("CUDA tests: no pytest_gpu.txt")
    else:
        c = pytest_counts(pytest_text)
        bad = c.get("failed", 0) + c.get("error", 0)
        passed = c.get("passed", 0)
        if bad or not passed:
            ok = False
        lines.append(f"CUDA tests: {passed} passed, {bad} failed or errors"
                     + ("" if passed or bad else " (none ran)") + (" -> FAIL" if bad else ""))
    lines.insert(0, f"issue 4 targets on {device}: {'ALL MET' if ok else 'NOT ALL MET'}")
    return ok, lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    out = Path(args[0])
    records: list[dict] = []
    env: dict = {}
    for name in BENCH_FILES:
        path = out / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                print(f"{path}: unreadable ({e}); skipped", file=sys.stderr)
                continue
            records += data.get("records", [])
            env = env or data.get("env", {})
    pytest_path = out / "pytest_gpu.txt"
    ok, lines = check(records, env, pytest_path.read_text() if pytest_path.is_file() else None)
    print("\n".join(lines))
    print(f"rerun: python bench/verdict.py {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
