"""A catalogue of bad input across the CLI's commands.

Every case asserts: exactly one line on stderr, the right exit code (2 usage/configuration,
1 operational), no traceback, nothing on stdout, and that the distinctive fake secrets in the
environment (a Service Bus ``SharedAccessKey`` and an AWS secret key) never appear in either
stream. A few cases run the installed ``queue-runtime`` script in a real process to check the
process exit code too.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from queue_runtime.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/: the sqs_server helper

from sqs_server import REGION, moto_sqs  # noqa: F401  (moto_sqs: a fixture, used by name)

SAS_SECRET = "SECRETSECRET0fake0SAS0key0must0never0show="
CONNECTION = f"Endpoint=sb://ns.servicebus.windows.net/;SharedAccessKeyName=root;SharedAccessKey={SAS_SECRET}"
AWS_SECRET = "AWSSECRETSECRET0fake0must0never0show"
SECRETS = (SAS_SECRET, "SECRETSECRET", AWS_SECRET)


class Case(NamedTuple):
    argv: list[str]
    code: int
    says: str
    env: dict[str, str] = {}
    files: dict[str, str] = {}
    moto: bool = False  # point the aws provider at the moto server


AWS_ENV = {"QUEUE_PROVIDER": "aws", "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing"}

CASES: dict[str, Case] = {
    # -- unknown queue (operational: exit 1) ------------------------------------------------
    "sqs unknown queue: dlq peek": Case(
        ["dlq", "peek", "-q", "no-such-queue.fifo"], 1, "does not exist", AWS_ENV, moto=True
    ),
    "sqs unknown queue: send": Case(
        ["send", "-q", "no-such-queue.fifo", "-s", "g", "-b", "x"], 1, "does not exist", AWS_ENV, moto=True
    ),
    "sqs unknown queue: stats": Case(
        ["stats", "-q", "no-such-queue"], 1, "does not exist", AWS_ENV, moto=True
    ),
    "sqs unknown queue: replay": Case(
        ["dlq", "replay", "-q", "no-such-queue.fifo"], 1, "does not exist", AWS_ENV, moto=True
    ),
    "sqs unreachable endpoint": Case(
        ["stats", "-q", "orders.fifo"],
        1,
        "cannot reach",
        {**AWS_ENV, "AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:9"},
    ),
    # -- bad numbers (usage: exit 2) --------------------------------------------------------
    "--max abc": Case(
        ["dlq", "peek", "-q", "orders", "--max", "abc"], 2, "argument --max: expected an integer"
    ),
    "--max 0": Case(["dlq", "replay", "-q", "orders", "--max", "0"], 2, "argument --max"),
    "--max -3": Case(["dlq", "export", "-q", "orders", "-o", "x.jsonl", "--max", "-3"], 2, "argument --max"),
    "--max 1.5": Case(["dlq", "peek", "-q", "orders", "--max", "1.5"], 2, "'1.5'"),
    "--count 0": Case(["send", "-q", "orders", "-s", "s", "-b", "x", "--count", "0"], 2, "argument --count"),
    "--count too many": Case(
        ["send", "-q", "o", "-s", "s", "-b", "x", "--count", "100001"], 2, "1 to 100000"
    ),
    "env number": Case(
        ["stats", "-q", "orders"],
        2,
        "receive_timeout from env:QUEUE_RECEIVE_TIMEOUT_SECONDS",
        {"QUEUE_RECEIVE_TIMEOUT_SECONDS": "soon"},
    ),
    # -- provider ---------------------------------------------------------------------------
    "unknown provider flag": Case(
        ["stats", "-q", "orders", "--provider", "kafka"], 2, "invalid choice: 'kafka'"
    ),
    "unknown provider env": Case(
        ["dlq", "peek", "-q", "orders"], 2, "provider from env:QUEUE_PROVIDER", {"QUEUE_PROVIDER": "kafka"}
    ),
    "unknown provider in file": Case(
        ["config", "show", "--config", "c.toml"],
        2,
        "provider from file:c.toml",
        files={"c.toml": 'provider = "rabbit"\n'},
    ),
    "azure connection string without endpoint": Case(
        ["stats", "-q", "orders"],
        2,
        "value not shown",
        {"QUEUE_PROVIDER": "azure", "AZURE_SERVICE_BUS_CONNECTION_STRING": f"SharedAccessKey={SAS_SECRET}"},
    ),
    # -- malformed config files -------------------------------------------------------------
    "malformed toml": Case(
        ["send", "-q", "orders", "-s", "s", "-b", "x", "--config", "bad.toml"],
        2,
        "malformed config file 'bad.toml'",
        files={"bad.toml": f'[azure]\nconnection_string = "{CONNECTION}\nqueue = [\n'},
    ),
    "malformed yaml": Case(
        ["dlq", "peek", "--config", "bad.yaml"],
        2,
        "malformed config file 'bad.yaml'",
        files={"bad.yaml": f"azure:\n  connection_string: {CONNECTION}\n queue: [orders\n"},
    ),
    "yaml not a table": Case(
        ["stats", "--config", "list.yml"], 2, "must hold a table of keys", files={"list.yml": "- a\n- b\n"}
    ),
    "unknown key in config": Case(
        ["stats", "-q", "orders", "--config", "c.toml"],
        2,
        "did you mean 'worker'",
        files={"c.toml": "[wroker]\nprefetch = 1\n"},
    ),
    "missing config file": Case(["stats", "-q", "orders", "--config", "nope.toml"], 2, "does not exist"),
    "config file from env, wrong suffix": Case(
        ["stats", "-q", "orders"], 2, "must end in .toml", {"QUEUE_CONFIG_FILE": "settings.ini"}
    ),
    # -- missing credentials (aws: no env keys, no profile, empty shared files) ------------
    "aws without credentials": Case(
        ["stats", "-q", "orders.fifo"],
        1,
        "no AWS credentials found",
        {"QUEUE_PROVIDER": "aws", "AWS_REGION": REGION},
        moto=True,
    ),
    "aws unknown profile": Case(
        ["stats", "-q", "orders.fifo"],
        2,
        "profile 'ghost' not found",
        {"QUEUE_PROVIDER": "aws", "AWS_REGION": REGION, "AWS_PROFILE": "ghost"},
        moto=True,
    ),
    # -- bad values -------------------------------------------------------------------------
    "bad --property form": Case(
        ["send", "-q", "o", "-s", "s", "-b", "x", "--property", "novalue"], 2, "KEY=VALUE"
    ),
    "empty --property key": Case(["send", "-q", "o", "-s", "s", "-b", "x", "-p", "=v"], 2, "KEY=VALUE"),
    "repeated --property": Case(
        ["send", "-q", "o", "-s", "s", "-b", "x", "-p", "a=1", "-p", "a=2"], 2, "more than once"
    ),
    "bad session id": Case(["send", "-q", "orders", "-s", "bad\tid", "-b", "x"], 2, "session id"),
    "no session id on a session queue": Case(["send", "-q", "orders", "-b", "x"], 2, "session"),
    "sqs fifo send without group": Case(
        ["send", "-q", "orders.fifo", "-b", "x"], 2, "MessageGroupId", AWS_ENV, moto=True
    ),
    "bad queue name": Case(["stats", "-q", "bad queue!"], 2, "is not a valid queue name"),
    "no queue": Case(["dlq", "peek"], 2, "no queue given"),
    "body and file together": Case(["send", "-q", "o", "-b", "x", "-f", "y"], 2, "not allowed with"),
    "missing body file": Case(["send", "-q", "o", "-s", "s", "-f", "missing.bin"], 2, "cannot read --file"),
    "export into a directory": Case(["dlq", "export", "-q", "orders", "--out", "."], 2, "is a directory"),
    "export into a missing directory": Case(
        ["dlq", "export", "-q", "orders", "--out", "no/dir/x.jsonl"], 2, "does not exist"
    ),
    "purge without --yes": Case(["dlq", "purge", "-q", "orders"], 2, "add --yes to confirm"),
    "unknown command": Case(["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    "unknown flag": Case(["stats", "-q", "orders", "--colour"], 2, "unrecognized arguments: --colour"),
    "dlq without subcommand": Case(["dlq"], 2, "choose a subcommand"),
    "worker: bad MODULE:Class": Case(["worker", "justamodule", "-q", "orders"], 2, "MODULE:ActorClass"),
}


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[Case], None]:
    """Empty working directory; only the fake secrets and the case's variables in the env."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith(("QUEUE_", "AWS_", "AZURE_", "SERVICE_BUS")):
            monkeypatch.delenv(name)
    empty = tmp_path / "empty-aws-file"
    empty.write_text("")

    def apply(case: Case) -> None:
        monkeypatch.setenv("AZURE_SERVICE_BUS_CONNECTION_STRING", CONNECTION)
        if "AWS_ACCESS_KEY_ID" in case.env:
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
        # No shared credentials or profile, no instance-metadata lookups (which only wait).
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(empty))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        for name, value in case.env.items():
            monkeypatch.setenv(name, value)
        for name, text in case.files.items():
            (tmp_path / name).write_text(text)

    return apply


def check_one_line(code: int, out: str, err: str, case: Case) -> None:
    assert code == case.code, (code, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("queue-runtime: error: ")
    assert case.says in lines[0]
    assert "Traceback" not in err
    for secret in SECRETS:
        assert secret not in out + err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_clear_line(
    name: str,
    isolated: Callable[[Case], None],
    capsys: pytest.CaptureFixture[str],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case = CASES[name]
    isolated(case)
    if case.moto:
        monkeypatch.setenv("AWS_ENDPOINT_URL_SQS", request.getfixturevalue("moto_sqs"))
    if case.argv[0] == "worker" and "worker" not in _commands():
        pytest.skip("the worker command is not registered in this checkout")
    code = main(case.argv)
    out, err = capsys.readouterr()
    check_one_line(code, out, err, case)


def _commands() -> set[str]:
    from queue_runtime.cli.common import build_parser

    parser = build_parser()
    actions: Any = parser._subparsers._group_actions[0] if parser._subparsers else None
    return set(actions.choices) if actions is not None else set()


def test_debug_shows_the_traceback_but_still_no_secret(
    isolated: Callable[[Case], None], capsys: pytest.CaptureFixture[str]
) -> None:
    case = CASES["malformed toml"]
    isolated(case)
    code = main([*case.argv, "--debug"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" in err and err.splitlines()[-1].startswith("queue-runtime: error: malformed config")
    for secret in SECRETS:
        assert secret not in out + err


def test_config_show_never_shows_the_secret(
    isolated: Callable[[Case], None], capsys: pytest.CaptureFixture[str]
) -> None:
    isolated(Case([], 0, "", {"QUEUE_PROVIDER": "azure", "AWS_ACCESS_KEY_ID": "AKIAFAKE"}))
    for argv in (["config", "show"], ["config", "show", "--json"], ["config", "validate", "-q", "orders"]):
        code = main(argv)
        out, err = capsys.readouterr()
        assert code == 0, err
        assert "**********" in out or argv[1] == "validate"
        for secret in SECRETS:
            assert secret not in out + err


SCRIPT = Path(sys.executable).with_name("queue-runtime")


@pytest.mark.skipif(not SCRIPT.exists(), reason="the queue-runtime script is not installed in this venv")
@pytest.mark.parametrize("name", ["purge without --yes", "malformed yaml"])
def test_the_installed_script_exits_with_the_code(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "AWS_", "AZURE_"))}
    env.update(case.env, AZURE_SERVICE_BUS_CONNECTION_STRING=CONNECTION)
    for file_name, text in case.files.items():
        (tmp_path / file_name).write_text(text)
    done = subprocess.run(
        [str(SCRIPT), *case.argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    check_one_line(done.returncode, done.stdout, done.stderr, case)
