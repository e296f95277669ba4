"""shusheng.cli: the one command table, its (lazy) parser and dispatch, and what ``shusheng --help`` imports."""

from __future__ import annotations

import argparse
import subprocess
import sys
import types
from pathlib import Path

import pytest

from shusheng import cli
from shusheng.cli import COMMANDS, Command, Group, build_parser, main, resolve

ROOT = Path(__file__).resolve().parents[1]


def _paths(table=COMMANDS, prefix=()):
    """(path of words, entry) for every command and sub-command of the table."""
    for name, entry in table.items():
        yield (*prefix, name), entry
        if isinstance(entry, Group):
            yield from _paths(entry.commands, (*prefix, name))


def _help(parser: argparse.ArgumentParser, argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_the_table_lists_every_command():
    assert list(COMMANDS) == ["ops", "data", "train", "eval", "caption", "ask", "chat", "generate", "detect", "segment", "index", "search", "export", "demo"]
    assert list(COMMANDS["train"].commands) == ["classify", "clip", "uniperceiver", "bridge", "t2i", "detect", "segment",
                                                "colors", "answer-types", "domain-check"]
    assert list(COMMANDS["eval"].commands) == ["classify"]
    for path, entry in _paths():
        assert isinstance(entry, (Command, Group)), path
        assert entry.help and "\n" not in entry.help, path


@pytest.mark.parametrize("path, command", [(p, e) for p, e in _paths() if isinstance(e, Command)],
                         ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_every_entry_resolves_to_callable_add_and_run(path, command):
    module, help_text = command[:2]  # design.md's (module, help)
    assert module.startswith("shusheng.") and help_text == command.help
    add_arguments, run = resolve(command)
    assert callable(add_arguments) and callable(run)
    parser = argparse.ArgumentParser(prog=" ".join(path))
    add_arguments(parser)
    assert len(parser._actions) > 1, f"{path} declares no arguments"


def test_full_parser_builds_every_subparser_and_matches_the_lazy_one(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # one line per help text
    full = build_parser()
    for path, entry in _paths():
        argv = list(path)
        text = _help(full, argv, capsys)
        assert text.startswith(f"usage: shusheng {' '.join(path)} ")
        if isinstance(entry, Group):
            assert entry.help in text and all(f"    {name}" in text for name in entry.commands)
        else:  # built: its own arguments are in the usage line (a command may set its own longer description)
            assert text.splitlines()[0] != f"usage: shusheng {' '.join(path)} [-h]", path
        # what `shusheng PATH --help` shows: built from the same table, only that command's module imported
        assert _help(build_parser([*argv, "--help"]), argv, capsys) == text, path
    top = _help(full, [], capsys)
    assert all(f"    {name}" in top and entry.help in top for name, entry in COMMANDS.items())
    assert _help(build_parser(["--help"]), [], capsys) == top


def test_main_without_a_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["no-such-command"])
    assert exit_.value.code == 2
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["train"])  # a group needs its sub-command
    assert exit_.value.code == 2
    assert "the following arguments are required: TASK" in capsys.readouterr().err


def test_main_dispatches_to_the_named_functions(monkeypatch):
    calls = []
    fake = types.ModuleType("shusheng_test_fake_commands")

    def add_hello(p):
        p.add_argument("--name", default="world")

    def run_hello(args):
        calls.append(("hello", args.name, args.command))
        return 3

    def add_arguments(p):
        p.add_argument("value", type=int)

    def run(args):
        calls.append(("nested", args.value, args.command, args.task))

    fake.add_hello, fake.run_hello, fake.add_arguments, fake.run = add_hello, run_hello, add_arguments, run
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setitem(COMMANDS, "hello", Command(fake.__name__, "say hello", add="add_hello", run="run_hello"))
    monkeypatch.setitem(COMMANDS, "group", Group("a group", {"leaf": Command(fake.__name__, "a leaf")}))
    assert main(["-v", "hello", "--name", "you"]) == 3
    assert main(["group", "leaf", "7"]) == 0  # run returned None: exit status 0
    assert calls == [("hello", "you", "hello"), ("nested", 7, "group", "leaf")]


def _run_python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_help_imports_no_command_module():
    modules = sorted({e.module for _, e in _paths() if isinstance(e, Command)})
    out = _run_python(
        "import contextlib, io, sys\n"
        "from shusheng.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['eval', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        f"print(sorted(m for m in {modules + ['torch', 'gradio', 'numpy']!r} if m in sys.modules))\n")
    assert out == "[]"


def test_apps_import_neither_gradio_nor_torch():
    out = _run_python(
        "import sys\n"
        "import shusheng.apps, shusheng.apps.tabs, shusheng.apps.gradio_app, shusheng.apps.demo\n"
        "from shusheng.apps.tabs import TAB_MODULES, load_tabs\n"
        "tabs = load_tabs()\n"
        "print(len(tabs), sorted(m for m in ('gradio', 'torch') if m in sys.modules))\n")
    assert out == "5 []"  # Search, Caption & VQA, Chat, Detect, Generate


def test_console_script_and_python_m():
    pyproject = (ROOT / "pyproject.toml").read_text()
    scripts = pyproject.split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0].strip()
    assert scripts == 'shusheng = "shusheng.cli:main"'
    assert cli.main is main
    proc = subprocess.run([sys.executable, "-m", "shusheng", "--version"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("shusheng ")
