"""The `prospect` CLI answers bad input and a bad database with one line and a non-zero exit,
not a traceback."""

import pytest
from typer.testing import CliRunner

from service.cli import app as cli


@pytest.mark.parametrize("argv", [["keys", "list"], ["keys", "create", "--scope", "ingest"],
                                  ["keys", "revoke", "1"], ["erase", "--user-id", "u1"]])
def test_unmigrated_database_is_one_line(tmp_path, monkeypatch, argv):
    monkeypatch.setenv("PROSPECT_DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 1, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert r.stdout == ""
    assert "no such table" in r.stderr and "prospect db upgrade" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_unreachable_database_is_one_line(monkeypatch):
    monkeypatch.setenv("PROSPECT_DATABASE_URL", "postgresql+psycopg://u:secret@127.0.0.1:1/none")
    monkeypatch.setenv("PROSPECT_DB_CONNECT_TIMEOUT_S", "2")
    for argv in (["db", "upgrade"], ["keys", "list"]):
        r = CliRunner().invoke(cli, argv)
        assert r.exit_code == 1 and isinstance(r.exception, SystemExit), r.output
        assert "127.0.0.1:1/none" in r.stderr and "secret" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_db_upgrade_unknown_revision(tmp_path, monkeypatch):
    monkeypatch.setenv("PROSPECT_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    r = CliRunner().invoke(cli, ["db", "upgrade", "nosuchrev"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "nosuchrev" in r.stderr


@pytest.mark.parametrize("value,says", [("tomorrow", "duration like 30d"), ("0d", "not in the future"),
                                        ("2020-01-01", "not in the future"),
                                        ("99999999999d", "too far in the future")])
def test_keys_create_refuses_bad_or_past_expiry(sqlite_url, monkeypatch, value, says):
    monkeypatch.setenv("PROSPECT_DATABASE_URL", sqlite_url)
    before = CliRunner().invoke(cli, ["keys", "list"]).stdout
    r = CliRunner().invoke(cli, ["keys", "create", "--scope", "ingest", "--expires", value])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert r.stdout == "" and "--expires" in r.stderr and says in r.stderr
    assert CliRunner().invoke(cli, ["keys", "list"]).stdout == before  # no key was stored


def test_db_upgrade_shows_each_migration_on_stderr(tmp_path, monkeypatch):
    """Progress for a long upgrade goes to stderr, one line per migration; stdout keeps the result."""
    monkeypatch.setenv("PROSPECT_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    r = CliRunner().invoke(cli, ["db", "upgrade"])
    assert r.exit_code == 0, r.output
    assert "Running upgrade  -> 0001" in r.stderr and "0001 -> 0002" in r.stderr
    assert r.stdout.startswith("database at head") and "Running" not in r.stdout


def test_erase_by_user_id_needs_the_apis_user_id_key(monkeypatch):
    """Without PROSPECT_USER_ID_KEY the id would hash with the development key, match nothing the
    API stored and report 0 events erased with exit 0; refuse before touching the database."""
    monkeypatch.setenv("PROSPECT_DATABASE_URL", "postgresql+psycopg://u@127.0.0.1:1/none")
    monkeypatch.delenv("PROSPECT_USER_ID_KEY", raising=False)
    r = CliRunner().invoke(cli, ["erase", "--user-id", "u1"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert "PROSPECT_USER_ID_KEY" in r.stderr and r.stdout == ""
    # a hash needs no key: this one goes on to the (unreachable) database
    r = CliRunner().invoke(cli, ["erase", "--user-hash", "0" * 64])
    assert r.exit_code == 1 and "PROSPECT_USER_ID_KEY" not in r.stderr, r.output


@pytest.mark.parametrize("argv", [["db", "upgrade"], ["keys", "list"], ["erase", "--user-hash", "0" * 64]])
def test_bad_setting_in_env_names_the_variable(tmp_path, monkeypatch, argv):
    monkeypatch.setenv("PROSPECT_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setenv("PROSPECT_MAX_BATCH_ITEMS", "abc")
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert r.stderr.startswith("error: PROSPECT_MAX_BATCH_ITEMS: ") and len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize(("var", "value", "says"), [
    ("PROSPECT_DEFAULT_JOB_PARAMS", "{bad", "default_job_params"),  # JSON that does not parse
    ("PROSPECT_CORS_ORIGINS", "[1]", "error: PROSPECT_CORS_ORIGINS: "),  # an item: the variable named
])
def test_bad_json_setting_is_one_line_naming_it(tmp_path, monkeypatch, var, value, says):
    monkeypatch.setenv("PROSPECT_DATABASE_URL", f"sqlite:///{tmp_path / 'x.db'}")
    monkeypatch.setenv(var, value)
    r = CliRunner().invoke(cli, ["keys", "list"])
    assert r.exit_code == 2 and isinstance(r.exception, SystemExit), r.output
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_every_option_and_argument_has_help():
    import typer

    def walk(cmd, path):
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            yield from walk(sub, [*path, name])
        for p in getattr(cmd, "params", []):
            yield " ".join(path), p

    missing = [f"{where} {p.name}" for where, p in walk(typer.main.get_command(cli), [])
               if p.name != "help" and not getattr(p, "help", None)]
    assert not missing, missing
