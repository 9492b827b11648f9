"""bench/train_throughput.py: its port of the TRL baseline's data equals the baseline's, and its
tiny CPU mode runs both sides and reports the table, the ratios and the parity fields."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_port_matches_the_trl_baseline():
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    base = _load("trl_kto_baseline")
    tt = _load("train_throughput")
    assert tt.SIZES == base.SIZES
    for varlen in (False, True):
        assert tt.make_rows(20, 64, 48, 4093, 0.5, varlen=varlen) == base.make_rows(20, 64, 48, 4093, 0.5, varlen=varlen)
    a, b = tt.make_tokenizer(4093), base.make_tokenizer(4093)
    text = "w1 w4092 w17 <eos>"
    assert a(text)["input_ids"] == b(text)["input_ids"] and a.pad_token_id == b.pad_token_id


@pytest.mark.slow
def test_tiny_cpu_run_reports_table_and_parity(tmp_path, capsys):
    pytest.importorskip("trl")
    tt = _load("train_throughput")
    out = tmp_path / "bench.json"
    records = tt.main(["--size", "tiny", "--device", "cpu", "--configs", "varlen-b8", "--steps", "2", "--warmup", "1",
                       "--lr", "1e-3", "--json-out", str(out), "--table-out", str(tmp_path / "table.md")])
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert saved["records"] == json.loads(json.dumps(records, default=str))
    (rec,) = records
    trl, ours = rec["sides"]["trl"], rec["sides"]["prospect"]
    for side in (trl, ours):
        assert side["tokens_per_s"] > 0 and side["median_step_s"] > 0 and side["timed_steps"] == 2
    assert ours["speedup_vs_trl"] == pytest.approx(ours["tokens_per_s"] / trl["tokens_per_s"], rel=1e-2)
    p = rec["parity"]
    assert p["pass"], p
    assert p["step1_trl"] == pytest.approx(0.5, abs=1e-6) and p["step1_prospect"] == pytest.approx(0.5, abs=1e-6)
    assert len(p["losses_trl"]) == len(p["losses_prospect"]) == 3
    assert p["loss_moved"] > 10 * p["loss_max_abs_diff"]  # the trajectory check is informative
    assert p["ref_logps_max_rel"] < 1e-5 and p["policy_logps_max_rel"] < 1e-4
    for text in ("| config | side | tokens/s", "| varlen-b8 | trl", "| varlen-b8 | prospect", "parity varlen-b8: PASS",
                 "rerun: python bench/train_throughput.py"):
        assert text in printed
    assert (tmp_path / "table.md").read_text().startswith("KTO training throughput on cpu")


def test_repeats_interleave_sides_and_pool_their_steps(tmp_path):
    tt = _load("train_throughput")

    records = tt.main(["--size", "tiny", "--device", "cpu", "--configs", "fixed-b8", "--steps", "2", "--warmup", "1",
                       "--sides", "prospect,prospect-noshare", "--repeats", "2"])
    sides = records[0]["sides"]
    for name in ("prospect", "prospect-noshare"):
        v = sides[name]
        assert len(v["tokens_per_s_runs"]) == 2 and v["timed_steps"] == 4 == len(v["step_times_s"])
        assert v["step_s_p10"] <= v["median_step_s"] <= v["step_s_p90"]


def test_step_phases_reports_every_phase():
    step_phases = _load("step_phases")

    res = step_phases.main(["--size", "tiny", "--device", "cpu", "--config", "fixed-b8", "--steps", "3"])
    phases, apart = res["step_phases_ms"], res["apart_ms"]
    for name in ("H2D", "forward policy + KL", "loss + backward", "clip + AdamW", "step total"):
        assert phases[name] >= 0
    assert phases["step total"] >= phases["forward policy + KL"] + phases["loss + backward"] - 1e-6
    assert any(k.startswith("LM head fwd+bwd") and k.endswith("checkpoint") for k in apart)
    assert all(v > 0 for v in apart.values())
    # the host's issuing time is reported per phase (equal to the device time on a CPU, where ops run inline)
    assert set(res["host_issue_ms"]) == {"H2D", "forward policy + KL", "loss + backward", "clip + AdamW", "step total"}
    assert res["host_issue_ms"]["step total"] >= res["host_issue_ms"]["forward policy + KL"]
    assert res["syncs_in_step"] == []  # the audit runs on CUDA only
