"""What run.sh and .ci/run install: the packages of requirements.txt that are missing or outside their range.

    python3 tools/check_requirements.py            # one line per package; exit 1 if a required one
                                                   # needs installing
    python3 tools/check_requirements.py --install  # pip-install only those, and say so in one line

requirements.txt gives each package a range of versions the code is tested with (``>=``, ``<`` and
``==`` clauses, comma separated); requirements-lock.txt pins the exact set CI runs. A package inside
its range is left alone whatever its build (torch 2.5.1+cu121 from a Kaggle image counts as 2.5.1):
it is not handed to pip, and the constraints pip gets pin it to the installed version, so that
installing another package cannot upgrade or replace it. A missing or out-of-range package is
installed at its locked version, and so is any dependency pip has to add. A requirement whose line
ends in ``# optional: ...`` (lightgbm: the blend's stacker) is tried on its own, and when pip cannot
install it (an image without network) that is one line, not an error.

Standard library only: it runs before anything is installed.
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
REQUIREMENTS, LOCK = REPO / "requirements.txt", REPO / "requirements-lock.txt"

# a PEP 440 version as far as ranges need it: the release numbers, a pre-release or dev tag, a
# post-release tag and a local build label (+cu121), which does not count
VERSION = re.compile(r"v?(\d+(?:\.\d+)*)((?:a|b|rc|\.?dev)\d*)?(?:\.?post\d*)?(?:\+[A-Za-z0-9.]+)?", re.I)
CLAUSE = re.compile(r"(>=|<|==)\s*(\d+(?:\.\d+)*)")


class RequirementsError(Exception):
    """A malformed line of requirements.txt or the lock: one line naming the file and line."""


def normalise(name: str) -> str:
    """The name as pip compares names (PEP 503): PyYAML == pyyaml, scikit_learn == scikit-learn."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_version(text: str) -> tuple[tuple[int, ...], bool] | None:
    """(release numbers, is a pre-release) or None when ``text`` is not a version."""
    match = VERSION.fullmatch(text.strip())
    if match is None:
        return None
    return tuple(int(part) for part in match.group(1).split(".")), match.group(2) is not None


def compare(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """-1, 0 or 1 for release numbers, the shorter padded with zeros (2.4 == 2.4.0)."""
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return (a > b) - (a < b)


@dataclass
class Requirement:
    name: str
    clauses: list[tuple[str, tuple[int, ...]]]  # (operator, release numbers)
    text: str                                   # the line as written, e.g. torch>=2.4,<3
    optional: bool = False                      # "# optional: ..." on its line: the code runs without it

    @property
    def spec(self) -> str:
        return self.text[len(self.name):].strip()

    def admits(self, version: str) -> bool:
        """Whether ``version`` lies inside every clause. A pre-release satisfies neither >= its own
        release nor < it (PEP 440: <3 excludes 3.0rc1), so only a final release is in range."""
        parsed = parse_version(version)
        if parsed is None:
            return False
        release, pre = parsed
        for op, bound in self.clauses:
            order = compare(release, bound)
            if op == ">=" and not (order > 0 or (order == 0 and not pre)):
                return False
            if op == "<" and order >= 0:
                return False
            if op == "==" and (order != 0 or pre):
                return False
        return True


def read_requirements(path: Path = REQUIREMENTS) -> list[Requirement]:
    requirements = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line, _, comment = (part.strip() for part in raw.partition("#"))
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)", line)
        parts = [part.strip() for part in match.group(2).split(",")] if match and match.group(2) else []
        clauses = [CLAUSE.fullmatch(part) for part in parts]
        if not clauses or not all(clauses):
            raise RequirementsError(f"{path}:{number}: expected NAME and clauses >=X, <Y or ==Z separated "
                                    f"by commas, got {line!r}")
        requirements.append(Requirement(match.group(1), [(c.group(1), tuple(map(int, c.group(2).split("."))))
                                                         for c in clauses], line,
                                        optional=comment.lower().startswith("optional")))
    return requirements


def read_lock(path: Path = LOCK) -> dict[str, str]:
    """Normalised name -> exact version."""
    lock = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
        if match is None or parse_version(match.group(2)) is None:
            raise RequirementsError(f"{path}:{number}: expected NAME==VERSION, got {line!r}")
        lock[normalise(match.group(1))] = match.group(2)
    return lock


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@dataclass
class Decision:
    requirement: Requirement
    installed: str | None

    @property
    def status(self) -> str:
        if self.installed is None:
            return "missing"
        return "in range" if self.requirement.admits(self.installed) else "out of range"

    def __str__(self) -> str:
        found = "" if self.installed is None else f" {self.installed}"
        optional = ", optional" if self.requirement.optional else ""
        return f"{self.requirement.name}{found}: {self.status} ({self.requirement.spec}{optional})"


def decide(requirements: list[Requirement], installed: Callable[[str], str | None] = installed_version) -> list[Decision]:
    return [Decision(r, installed(r.name)) for r in requirements]


def constraints(decisions: list[Decision], lock: dict[str, str],
                installed: Callable[[str], str | None] = installed_version) -> list[str]:
    """pip constraint lines: every requirement inside its range stays at its installed version,
    every package pip installs (what is to be installed and any dependency not installed yet) gets
    its locked version. Dependencies already installed are left to pip, which keeps them unless a
    new package needs another version."""
    pinned = {normalise(d.requirement.name): f"{d.requirement.name}=={d.installed}"
              for d in decisions if d.status == "in range"}
    to_install = {normalise(d.requirement.name) for d in decisions if d.status != "in range"}
    for name, version in lock.items():
        if name not in pinned and (name in to_install or installed(name) is None):
            pinned[name] = f"{name}=={version}"
    return sorted(pinned.values())


def install(decisions: list[Decision], lock: dict[str, str],
            installed: Callable[[str], str | None] = installed_version) -> int:
    """pip-install what is missing or out of range; one line says what (or that nothing is). Exit
    code: 1 when a required package cannot be installed; an optional one that cannot (no network,
    no wheel) is one line, and the code runs without it."""
    todo = [d for d in decisions if d.status != "in range"]
    if not todo:
        print(f"requirements: nothing to install ({len(decisions)} packages in range)")
        return 0
    print("requirements: installing " + ", ".join(
        f"{d.requirement.text} ({d.status}{'' if d.installed is None else ', found ' + d.installed})" for d in todo),
        flush=True)
    required = [d for d in todo if not d.requirement.optional]
    if required and pip_install(required, decisions, lock, installed) != 0:
        print(f"error: pip could not install {', '.join(d.requirement.text for d in required)} (its message "
              f"is above)", file=sys.stderr)
        return 1
    for optional in (d for d in todo if d.requirement.optional):  # one by one: each may fail alone
        if pip_install([optional], decisions, lock, installed) != 0:
            print(f"requirements: optional {optional.requirement.text} could not be installed (pip's message "
                  f"is above); everything else runs without it", flush=True)
            todo.remove(optional)
    importlib.invalidate_caches()  # a fresh look at site-packages, not the one before pip ran
    still = [d for d in decide([d.requirement for d in todo], installed) if d.status != "in range"]
    if still:
        print(f"error: after pip install: {'; '.join(map(str, still))} (is pip installing into another "
              f"environment than {sys.executable}?)", file=sys.stderr)
        return 1
    return 0


def bytecode_option() -> list[str]:
    """pip's bytecode for every module of every package is 45 of a fresh venv's 70 s on 2 cores
    (docs/TIMINGS.md): --no-compile leaves it to Python, which compiles only the modules a stage
    imports, on their first import (~5 s), and keeps them. Not where Python keeps no bytecode
    (PYTHONDONTWRITEBYTECODE, -B): every process would compile its imports again."""
    return [] if sys.dont_write_bytecode else ["--no-compile"]


def pip_install(todo: list[Decision], decisions: list[Decision], lock: dict[str, str],
                installed: Callable[[str], str | None]) -> int:
    with tempfile.NamedTemporaryFile("w", prefix="constraints.", suffix=".txt") as file:
        file.write("\n".join(constraints(decisions, lock, installed)) + "\n")
        file.flush()
        return subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                               *bytecode_option(), "-c", file.name, *(d.requirement.text for d in todo)],
                              env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"}).returncode  # root in CI


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true",
                        help="pip-install what is missing or out of range, pinned by requirements-lock.txt")
    args = parser.parse_args()
    try:
        decisions, lock = decide(read_requirements()), read_lock()
    except (OSError, RequirementsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.install:
        return install(decisions, lock)
    for decision in decisions:
        print(decision)
    return 0 if all(d.status == "in range" for d in decisions if not d.requirement.optional) else 1


if __name__ == "__main__":
    sys.exit(main())
