"""The import-linter contracts of pyproject.toml: one-way layers (a module imports only its own layer or lower
ones, lazy imports included) and no import cycles inside any package."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_linter_contracts_are_kept():
    out = subprocess.run(["lint-imports", "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def test_python_m_aniso_fast_lists_the_commands():
    from aniso_fast.__main__ import COMMANDS, main

    assert main([]) == 0
    assert main(["no-such-command"]) == 2
    assert set(COMMANDS) == {"sample", "train", "evaluate", "models"}
