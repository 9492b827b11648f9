import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner
from transformers import AutoModelForCausalLM

from worker.kto import toy
from worker.kto.trainer import verify_manifest


def _app():
    from worker.cli import train_command

    app = typer.Typer()
    app.command("train")(train_command)

    @app.command("noop")
    def noop():  # a second command keeps "train" a named sub-command
        pass

    return app


def test_importing_cli_is_cheap():
    code = "import sys, worker.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_train_command_writes_checkpoint(toy_dir, tmp_path):
    events = tmp_path / "events.jsonl"
    rows = toy.make_feedback(24, desirable_fraction=0.25, seed=5)
    events.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(_app(), ["train", "--events", str(events), "--model", str(toy_dir), "--out", str(out),
                                    "--lr", "1e-3", "--microbatch-size", "4", "--max-length", "32"])
    assert r.exit_code == 0, r.output
    nd = sum(r["label"] for r in rows)
    want = (24 - nd) / nd  # the balancer raises the minority class's weight to nU/nD (target ratio 1)
    assert nd < 12 and f"λD={want:.3g}" in r.output, r.output
    final = out / "final"
    assert verify_manifest(final)
    man = json.loads((final / "manifest.json").read_text())
    assert abs(man["balance"]["lambda_d"] - want) < 1e-9 and man["hyperparameters"]["lambda_d"] == man["balance"]["lambda_d"]
    assert man["step"] == 6 and man["data"]["n_kept"] == 24
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.vocab_size == len(toy.make_tokenizer())


def test_train_command_cuda_graphs_flag_is_recorded(toy_dir, tmp_path):
    """--cuda-graphs reaches the trainer; on a CPU it cannot be met, so the run is eager and the
    manifest says both what was asked and what ran."""
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(r) for r in toy.make_feedback(16, desirable_fraction=0.5, seed=1)) + "\n")
    out = tmp_path / "run"
    r = CliRunner().invoke(_app(), ["train", "--events", str(events), "--model", str(toy_dir), "--out", str(out),
                                    "--microbatch-size", "4", "--max-length", "32", "--max-steps", "2",
                                    "--cuda-graphs", "--pack-bucket", "64", "--lm-head-grad-cache-gib", "0.5"])
    assert r.exit_code == 0, r.output
    man = json.loads((out / "final" / "manifest.json").read_text())
    assert man["hyperparameters"]["cuda_graphs"] is True and man["hyperparameters"]["pack_bucket"] == 64
    assert man["hyperparameters"]["lm_head_grad_cache_gib"] == 0.5
    assert man["runtime"]["cuda_graphs"] is False and man["runtime"]["cuda_graph_replays"] == 0


def test_train_command_refuses_one_class(toy_dir, tmp_path):
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps({"prompt": "1+1=", "completion": "2", "label": True}) for _ in range(4)))
    r = CliRunner().invoke(_app(), ["train", "--events", str(events), "--model", str(toy_dir), "--out",
                                    str(tmp_path / "x")])
    assert r.exit_code == 2 and "refusing" in r.output


def test_train_command_malformed_events_is_a_usage_error(tmp_path, monkeypatch):
    """A bad row is reported with its file and line and exit 2, before any model is loaded."""
    monkeypatch.chdir(tmp_path)  # short paths: the message fits on one line of the error box
    events = tmp_path / "events.jsonl"
    events.write_text('{"prompt": "1+1=", "completion": "2", "label": true}\nnot json\n')
    argv = ["train", "--events", "events.jsonl", "--model", "m", "--out", "x"]
    r = CliRunner().invoke(_app(), argv)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "--events" in r.output and "events.jsonl:2" in r.output and "Traceback" not in r.output
    events.write_bytes(b"\xff\xfe{}\n")
    r = CliRunner().invoke(_app(), argv)
    assert r.exit_code == 2 and "not UTF-8" in r.output, r.output


def test_train_command_bad_model_folder_is_a_usage_error(toy_dir, tmp_path, monkeypatch):
    """A missing or non-model local folder for --model/--reference fails at once, in one line."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(r) for r in toy.make_feedback(8, desirable_fraction=0.5, seed=1)))
    for args, says in [(["--model", "./nope"], "no such model folder"),
                       (["--model", "empty"], "no config.json"),
                       (["--model", "events.jsonl"], "not a folder"),
                       (["--model", str(toy_dir), "--reference", "./nope"], "no such model folder")]:
        r = CliRunner().invoke(_app(), ["train", "--events", "events.jsonl", "--out", "x", *args])
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit), (args, r.output)
        assert says in r.output and ("--reference" in args) == ("'--reference'" in r.output), r.output
        assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("args", [["--target-ratio", "3"], ["--pack-bucket", "100"], ["--microbatch-size", "0"],
                                  ["--grad-accum", "0"], ["--lora", "--lora-r", "0"], ["--warmup-ratio", "2"],
                                  ["--max-steps", "0"], ["--epochs", "0"], ["--save-every", "0"],
                                  ["--min-per-class", "0"]])
def test_train_command_out_of_range_options_are_usage_errors(tmp_path, monkeypatch, args):
    """Values the balancer or trainer would refuse mid-run (a traceback, after the model loaded)
    fail on the command line, naming the option."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "events.jsonl").write_text(
        "\n".join(json.dumps(r) for r in toy.make_feedback(8, desirable_fraction=0.5, seed=1)))
    r = CliRunner().invoke(_app(), ["train", "--events", "events.jsonl", "--model", "m", "--out", "x", *args])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert f"'{args[-2]}'" in r.output


def test_read_jsonl_says_what_a_row_lacks(tmp_path):
    from worker.kto.data import read_jsonl

    f = tmp_path / "e.jsonl"
    for text, says in [('{"completion": "b", "label": true}\n', "e.jsonl:1: missing 'prompt'"),
                       ('\n[1, 2]\n', "e.jsonl:2: expected a JSON object, got list")]:
        f.write_text(text)
        with pytest.raises(ValueError) as e:
            read_jsonl(f)
        assert str(e.value).endswith(says), e.value


def test_train_command_out_that_is_a_file_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "events.jsonl").write_text(
        "\n".join(json.dumps(r) for r in toy.make_feedback(8, desirable_fraction=0.5, seed=1)))
    (tmp_path / "taken").write_text("not a folder")
    r = CliRunner().invoke(_app(), ["train", "--events", "events.jsonl", "--model", "m", "--out", "taken"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "'--out'" in r.output and "is a file" in r.output


def test_train_command_progress_of_a_resumed_run_counts_from_its_step(toy_dir, tmp_path, monkeypatch):
    """The progress bar counted from 0 on a resumed run: resumed at step 4 of 6, it ended at
    2/6 for a run that completed."""
    import tqdm.auto

    bars = []

    class Bar:
        def __init__(self, total=None, initial=0, **kw):
            self.total, self.n = total, initial
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix(self, **kw):
            pass

        def close(self):
            pass

    real = tqdm.auto.tqdm
    monkeypatch.setattr(tqdm.auto, "tqdm", lambda *a, **kw: Bar(**kw) if kw.get("desc") == "KTO" else real(*a, **kw))
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(r) for r in toy.make_feedback(24, desirable_fraction=0.5, seed=5)) + "\n")
    args = ["train", "--events", str(events), "--model", str(toy_dir), "--out", str(tmp_path / "run"),
            "--microbatch-size", "4", "--max-length", "32", "--save-every", "2"]
    for _ in range(2):  # the second run resumes from step 4 (no checkpoint at the last step)
        r = CliRunner().invoke(_app(), args)
        assert r.exit_code == 0, r.output
    assert [(b.n, b.total) for b in bars] == [(6, 6), (6, 6)]
