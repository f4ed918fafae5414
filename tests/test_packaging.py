"""minifilip is an installable package: the README's `pip install -r requirements.txt` installs it (editable), after
which `import minifilip` works from any folder. The install goes into a throwaway virtual environment that sees the
already-installed dependencies (--system-site-packages, --no-index), so the test needs no network and leaves the
Python running the tests untouched."""
import os
import re
import subprocess
import sys
import tomllib

import pytest

from conftest import ROOT


def requirement_lines() -> list[str]:
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        return [ln.split("#")[0].strip() for ln in f if ln.split("#")[0].strip()]


def test_pyproject_lists_the_requirements_with_lower_bounds_only():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    lines = requirement_lines()
    assert "-e ." in lines, "requirements.txt must install the package itself (-e .)"
    deps = [ln for ln in lines if ln != "-e ."]
    assert sorted(project["dependencies"]) == sorted(deps)
    assert project["name"] == "minifilip"
    for dep in deps:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+>=[0-9.]+(; [a-z_]+ == \"\w+\")?", dep), f"not a lower bound: {dep}"


def test_no_sys_path_edits_in_tests_or_notebooks():
    needle = "sys.path." + "insert"  # split so this file does not find itself
    found = []
    for folder in ("tests", "notebooks"):
        for name in os.listdir(os.path.join(ROOT, folder)):
            if name.endswith((".py", ".ipynb")):
                with open(os.path.join(ROOT, folder, name)) as f:
                    text = f.read()
                if needle in text or "sys.path." + "append" in text:
                    found.append(f"{folder}/{name}")
    assert not found, f"sys.path edits in {found}"


def test_import_from_any_folder_after_readme_install(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    if not os.path.exists(python):
        pytest.skip("virtual environment without bin/python (not a POSIX layout)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    install = subprocess.run([python, "-m", "pip", "install", "--no-build-isolation", "--no-index", "-q",
                              "-r", "requirements.txt"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run([python, "-c", "import minifilip; print(minifilip.__file__); print(minifilip.FILIP)"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.splitlines()[0] == os.path.join(ROOT, "minifilip", "__init__.py")  # this checkout, editable
