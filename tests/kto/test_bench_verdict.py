"""bench/verdict.py: the issue-4 verdict a GPU session reads after ``bench/gpu_check.sh``."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def verdict():
    spec = importlib.util.spec_from_file_location("verdict", BENCH / "verdict.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["verdict"] = mod
    spec.loader.exec_module(mod)
    return mod


def _record(config: str, target: float, speedup: float, mem: float | None, parity: bool = True,
            recompute_tok_s: float | None = None) -> dict:
    sides = {"trl": {"tokens_per_s": 100.0, "peak_mem_gib": 20.0},
             "prospect": {"tokens_per_s": 100.0 * speedup, "speedup_vs_trl": speedup, "mem_vs_trl": mem}}
    if recompute_tok_s is not None:
        sides["prospect-recompute"] = {"tokens_per_s": recompute_tok_s, "speedup_vs_trl": recompute_tok_s / 100}
    return {"config": config, "target_speedup": target, "sides": sides, "parity": {"pass": parity}}


H100 = {"device": "NVIDIA H100 80GB HBM3"}
TESTS_OK = "....\n4 passed, 11 deselected in 23.1s\n"


def _run(verdict, records, env=H100, tests=TESTS_OK):
    ok, lines = verdict.check(records, env, tests)
    return ok, "\n".join(lines)


def test_all_targets_met_on_a_gpu(verdict):
    ok, text = _run(verdict, [_record("fixed-b32", 1.1, 1.15, 1.06, recompute_tok_s=111.0),
                              _record("varlen-b32", 2.0, 2.45, 0.66)])
    assert ok and text.startswith("issue 4 targets on NVIDIA H100 80GB HBM3: ALL MET")
    assert "fixed-b32: 1.15x TRL's tokens/s (target 1.1x), 1.06x TRL's peak memory (no target) -> MET" in text
    assert "varlen-b32: 2.45x TRL's tokens/s (target 2.0x), 0.66x TRL's peak memory (target <= 1.0x) -> MET" in text
    assert "kept LM-head gradient 1.036x prospect-recompute's tokens/s -> keep DEFAULT_GRAD_CACHE_GIB" in text
    assert "CUDA tests: 4 passed, 0 failed or errors" in text


@pytest.mark.parametrize("records,tests,why", [
    ([_record("fixed-b32", 1.1, 1.09, 1.0), _record("varlen-b32", 2.0, 2.5, 0.6)], TESTS_OK,
     "fixed-b32: 1.09x TRL's tokens/s (target 1.1x), 1.0x TRL's peak memory (no target) -> NOT MET"),
    ([_record("fixed-b32", 1.1, 1.2, 1.0), _record("varlen-b32", 2.0, 2.5, 1.02)], TESTS_OK,
     "varlen-b32: 2.5x TRL's tokens/s (target 2.0x), 1.02x TRL's peak memory (target <= 1.0x) -> NOT MET"),
    ([_record("fixed-b32", 1.1, 1.2, 1.0, parity=False), _record("varlen-b32", 2.0, 2.5, 0.6)], TESTS_OK,
     "parity FAIL -> NOT MET"),
    ([_record("fixed-b32", 1.1, 1.2, 1.0), _record("varlen-b32", 2.0, 2.5, 0.6)],
     "1 failed, 3 passed in 30.0s", "CUDA tests: 3 passed, 1 failed or errors -> FAIL"),
    ([_record("fixed-b32", 1.1, 1.2, 1.0), _record("varlen-b32", 2.0, 2.5, 0.6)],
     "6 skipped, 11 deselected in 4.00s", "CUDA tests: 0 passed, 0 failed or errors (none ran)"),
    ([_record("fixed-b32", 1.1, 1.2, 1.0)], TESTS_OK, "varlen-b32: NOT MEASURED"),
    ([_record("fixed-b32", 1.1, 1.2, 1.0), _record("varlen-b32", 2.0, 2.5, None)], TESTS_OK,
     "peak memory not measured -> NOT MET"),
    ([_record("fixed-b32", 1.1, 1.2, 1.0), _record("varlen-b32", 2.0, 2.5, 0.6)], None,
     "CUDA tests: no pytest_gpu.txt"),
])
def test_any_target_missed_says_which(verdict, records, tests, why):
    ok, text = _run(verdict, records, tests=tests)
    assert not ok and "NOT ALL MET" in text.splitlines()[0]
    assert why in text


def test_a_cpu_rehearsal_never_meets_them_and_a_slower_kept_gradient_is_named(verdict):
    ok, text = _run(verdict, [_record("fixed-b32", 1.1, 3.5, None, recompute_tok_s=360.0),
                              _record("varlen-b32", 2.0, 7.3, None)], env={"device": "cpu"})
    assert not ok and "device: cpu: a rehearsal" in text
    assert "varlen-b32: 7.3x TRL's tokens/s (target 2.0x), peak memory not measured -> MET" in text
    assert "0.972x prospect-recompute's tokens/s -> the kept gradient did not pay" in text


def test_main_reads_the_run_folder_and_exits_nonzero_unless_all_met(verdict, tmp_path, capsys):
    env = dict(H100)
    (tmp_path / "bench.json").write_text(json.dumps({"env": env, "records": [_record("fixed-b32", 1.1, 1.12, 1.0)]}))
    (tmp_path / "bench_varlen.json").write_text(json.dumps({"env": env,
                                                            "records": [_record("varlen-b32", 2.0, 2.4, 0.6)]}))
    (tmp_path / "pytest_gpu.txt").write_text(TESTS_OK)
    assert verdict.main([str(tmp_path)]) == 0
    assert "ALL MET" in capsys.readouterr().out
    (tmp_path / "bench_varlen.json").write_text("{truncated")
    assert verdict.main([str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "varlen-b32: NOT MEASURED" in captured.out and "unreadable" in captured.err
    assert verdict.main([]) == 2


def test_pytest_counts_sum_the_summary_lines_of_both_runs(verdict):
    text = ("PASSED tests/kto/test_gpu.py::test_a\n4 passed, 11 deselected in 23.10s\n"
            "FAILED tests/kto/test_gpu.py::test_b - assert 3 passed\n"
            "======= 1 failed, 9 passed, 1 error, 5 deselected in 41.52s =======\n")
    assert verdict.pytest_counts(text) == {"passed": 13, "deselected": 16, "failed": 1, "error": 1}
