"""tools/check_requirements.py: per package missing / in range / out of range, judged on fake installed
versions, and what --install hands to pip (never an in-range torch), with pip faked."""
import subprocess
import sys
from pathlib import Path

import pytest

import check_requirements as cr

REQUIREMENTS = "torch>=2.4,<3\nmatplotlib>=3.8,<4\nnumpy>=1.26,<3  # a comment\n\nPyYAML==6.0\n"
LOCK = {"torch": "2.13.0", "matplotlib": "3.11.2", "numpy": "2.4.6", "pyyaml": "6.0", "pillow": "13.0.0",
        "six": "1.17.0"}


@pytest.fixture
def requirements(tmp_path) -> list[cr.Requirement]:
    path = tmp_path / "requirements.txt"
    path.write_text(REQUIREMENTS)
    return cr.read_requirements(path)


def statuses(requirements, installed: dict) -> dict[str, str]:
    return {d.requirement.name: d.status for d in cr.decide(requirements, installed.get)}


@pytest.mark.parametrize("version, status", [
    (None, "missing"),
    ("2.13.0", "in range"),
    ("2.13.0+cu121", "in range"),     # a local build counts as its release
    ("2.4", "in range"), ("2.4.0", "in range"), ("2.5.1+cpu", "in range"),
    ("2.9.0.post1", "in range"),
    ("2.3.1", "out of range"), ("2.3.1+cu118", "out of range"),
    ("3.0.0", "out of range"), ("3.0.0rc1", "out of range"),  # <3 excludes 3's pre-releases (PEP 440)
    ("2.4.0rc1", "out of range"),     # a pre-release of the lower bound is below it
    ("not-a-version", "out of range"),
])
def test_torch_status_by_installed_version(requirements, version, status):
    assert statuses(requirements, {"torch": version, "matplotlib": "3.11.2", "numpy": "2.4.6", "PyYAML": "6.0"}
                    )["torch"] == status


def test_each_package_is_judged_on_its_own_clauses(requirements):
    installed = {"torch": "2.13.0+cpu", "numpy": "1.21.0", "PyYAML": "6.0.0"}
    assert statuses(requirements, installed) == {"torch": "in range", "matplotlib": "missing",
                                                  "numpy": "out of range", "PyYAML": "in range"}
    assert statuses(requirements, {**installed, "PyYAML": "6.0.1"})["PyYAML"] == "out of range"  # ==6.0


@pytest.mark.parametrize("line", ["torch", "torch>=", "torch~=2.4", "torch>=2.4;<3", ">=2.4"])
def test_a_malformed_line_is_one_error_naming_file_and_line(tmp_path, line):
    path = tmp_path / "requirements.txt"
    path.write_text(f"numpy>=1.26,<3\n{line}\n")
    with pytest.raises(cr.RequirementsError, match=rf"^{path}:2: expected NAME"):
        cr.read_requirements(path)


def test_constraints_keep_what_is_in_range_and_lock_what_pip_adds(requirements):
    installed = {"torch": "2.14.1+cu121", "numpy": "1.21.0", "PyYAML": "6.0", "six": "1.16.0"}.get
    pins = cr.constraints(cr.decide(requirements, installed), LOCK, installed)
    assert pins == sorted(["torch==2.14.1+cu121",   # in range: stays exactly the build it is
                           "PyYAML==6.0",
                           "matplotlib==3.11.2",    # missing: the locked version
                           "numpy==2.4.6",          # out of range: the locked version
                           "pillow==13.0.0"])       # a dependency not installed yet: locked
    # six is installed and not a requirement: left to pip, which keeps it unless a package needs more


class FakePip:
    """subprocess.run for pip: records the call and the constraints, then 'installs' the locked versions."""

    def __init__(self, installed: dict, returncode: int = 0, unavailable: tuple = ()):
        self.installed, self.returncode, self.calls = installed, returncode, []
        self.unavailable = unavailable  # names pip finds no distribution for (no network)

    def __call__(self, cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "install"]
        assert ("--no-compile" in cmd) == (not sys.dont_write_bytecode)  # bytecode on first import
        constraints = Path(cmd[cmd.index("-c") + 1]).read_text().split()
        specs = cmd[cmd.index("-c") + 2:]
        self.calls.append((specs, constraints))
        if self.unavailable and any(spec.startswith(self.unavailable) for spec in specs):
            return subprocess.CompletedProcess(cmd, 1)
        if self.returncode == 0:
            for spec in specs:
                name = spec.split(">")[0].split("=")[0].split("<")[0]
                self.installed[name] = LOCK[cr.normalise(name)]
        return subprocess.CompletedProcess(cmd, self.returncode)


def test_install_hands_pip_only_what_is_missing_or_out_of_range(requirements, monkeypatch, capsys):
    # a Kaggle-like image: a newer CUDA torch inside the range, an old numpy, no matplotlib
    installed = {"torch": "2.14.1+cu121", "numpy": "1.21.0", "PyYAML": "6.0"}
    pip = FakePip(installed)
    monkeypatch.setattr(cr.subprocess, "run", pip)
    assert cr.install(cr.decide(requirements, installed.get), LOCK, installed.get) == 0

    [(specs, pins)] = pip.calls
    assert specs == ["matplotlib>=3.8,<4", "numpy>=1.26,<3"]
    assert "torch==2.14.1+cu121" in pins and not any(spec.startswith("torch") for spec in specs)
    assert installed["torch"] == "2.14.1+cu121"
    out = capsys.readouterr().out
    assert out == ("requirements: installing matplotlib>=3.8,<4 (missing), numpy>=1.26,<3 (out of range, "
                   "found 1.21.0)\n")


@pytest.mark.parametrize("dont_write_bytecode", [False, True])
def test_pip_leaves_bytecode_to_the_first_import_unless_python_keeps_none(requirements, monkeypatch,
                                                                          dont_write_bytecode):
    monkeypatch.setattr(sys, "dont_write_bytecode", dont_write_bytecode)  # PYTHONDONTWRITEBYTECODE, -B
    commands = []
    monkeypatch.setattr(cr.subprocess, "run", lambda cmd, **kwargs: commands.append(cmd) or
                        subprocess.CompletedProcess(cmd, 1))
    cr.install(cr.decide(requirements, {}.get), LOCK, {}.get)
    assert commands and all(("--no-compile" in cmd) != dont_write_bytecode for cmd in commands)


def test_nothing_to_install_runs_no_pip(requirements, monkeypatch, capsys):
    # the lock's torch build on this machine (2.13.0+cpu) satisfies the range: nothing happens
    installed = {"torch": "2.13.0+cpu", "matplotlib": "3.11.2", "numpy": "2.4.6", "PyYAML": "6.0"}
    pip = FakePip(installed)
    monkeypatch.setattr(cr.subprocess, "run", pip)
    assert cr.install(cr.decide(requirements, installed.get), LOCK, installed.get) == 0
    assert pip.calls == []
    assert capsys.readouterr().out == "requirements: nothing to install (4 packages in range)\n"


def test_a_failed_pip_is_an_error(requirements, monkeypatch, capsys):
    installed = {"torch": "2.13.0", "numpy": "2.4.6", "PyYAML": "6.0"}
    monkeypatch.setattr(cr.subprocess, "run", FakePip(installed, returncode=1))
    assert cr.install(cr.decide(requirements, installed.get), LOCK, installed.get) == 1
    assert "error: pip could not install matplotlib>=3.8,<4" in capsys.readouterr().err


def test_an_optional_package_pip_cannot_install_is_one_line_not_an_error(tmp_path, monkeypatch, capsys):
    path = tmp_path / "requirements.txt"
    path.write_text(REQUIREMENTS + "lightgbm>=4.5,<5   # optional: the blend's stacker\n")
    requirements = cr.read_requirements(path)
    assert [r.optional for r in requirements] == [False] * 4 + [True]
    installed = {"torch": "2.13.0", "numpy": "2.4.6", "PyYAML": "6.0"}  # no matplotlib, no lightgbm
    pip = FakePip(installed, unavailable=("lightgbm",))
    monkeypatch.setattr(cr.subprocess, "run", pip)
    lock = {**LOCK, "lightgbm": "4.7.0"}
    assert cr.install(cr.decide(requirements, installed.get), lock, installed.get) == 0
    assert [specs for specs, _ in pip.calls] == [["matplotlib>=3.8,<4"], ["lightgbm>=4.5,<5"]]
    assert installed["matplotlib"] == "3.11.2" and "lightgbm" not in installed
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == ("requirements: optional lightgbm>=4.5,<5 could not be installed (pip's message is "
                       "above); everything else runs without it")
    decisions = cr.decide(requirements, installed.get)
    assert str(decisions[-1]) == "lightgbm: missing (>=4.5,<5, optional)"


def test_the_repos_lock_pins_every_requirement_inside_its_range():
    lock = cr.read_lock()
    for requirement in cr.read_requirements():
        version = lock.get(cr.normalise(requirement.name))
        assert version is not None, f"{requirement.name}: not in requirements-lock.txt"
        assert requirement.admits(version), f"{requirement.name}=={version} (lock) outside {requirement.spec}"
