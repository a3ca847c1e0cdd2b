"""Exit 0 when every package pinned in requirements.txt is installed at its pinned version.

Used by run.sh and .ci/run to skip `pip install` (slow even when there is nothing to do) on a
machine that already has everything. Standard library only: it runs before anything is installed.
"""
import sys
from importlib import metadata
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parent.parent / "requirements.txt"


def missing_requirements() -> list[str]:
    missing = []
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, pinned = line.partition("==")
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(f"{line} (not installed)")
            continue
        # local version labels (torch 2.13.0+cpu) satisfy a plain pin, as pip itself treats them
        if pinned and installed.split("+", 1)[0] != pinned:
            missing.append(f"{line} (found {installed})")
    return missing


if __name__ == "__main__":
    missing = missing_requirements()
    for item in missing:
        print(f"missing: {item}")
    sys.exit(1 if missing else 0)
