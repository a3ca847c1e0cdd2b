"""Shared plumbing for every stage script: configuration, user errors, atomic writes, seeding.

Configuration is one mechanism everywhere: a YAML file (``--config``) that may name a ``base:`` file
to inherit from, plus ``--set key.sub=value`` overrides. Overriding a key that does not exist is an
error, so a typo never silently runs the default.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import errno
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import tempfile
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import yaml

from mmctr.interrupts import interrupt_ends_in_one_line

REPO_ROOT = Path(__file__).resolve().parents[2]  # src/mmctr/common.py
CONFIG_DIR = REPO_ROOT / "configs"


class UserError(Exception):
    """A problem with the user's input (file, column, config): printed as one line, no traceback."""


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------

class _ConfigLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, which reads 1e-3 (no dot) as a string: read it as a float, as YAML 1.2 does.
    A key written twice in one mapping is an error (PyYAML would keep the last one without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *anchor: keys written after it override it
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                hash(key)
            except TypeError:  # a list as a key: PyYAML's own error says so
                continue
            if key in seen:
                where = f"on line {line}" if seen[key] == line else f"on lines {seen[key]} and {line}"
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} written twice {where}",
                                                        key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


# YAML 1.2's floats (1e-3 and 1e3 too, which YAML 1.1 reads as text)
_FLOAT_1_2 = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X)
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def parse_yaml(text: str):
    return yaml.load(text, Loader=_ConfigLoader)


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


# The sections a config file may hold (besides base:); each stage checks the keys of those it reads
CONFIG_SECTIONS = ("data", "run", "model", "train", "blend", "single", "tune")


def _read_yaml(path: Path) -> dict:
    require_file(path, "config file")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "parse error"
        raise UserError(f"{path}: not valid YAML ({first})") from None
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1  # the file's bytes, as read
        raise UserError(f"{path}: line {line}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); "
                        f"save the config as UTF-8") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping of sections")
    for key, value in data.items():  # a misspelt section must not silently leave its keys at the defaults
        if key == "base":
            if not isinstance(value, str) or not value:
                raise UserError(f"{path}: base must be the file name of another config, got {_shown(value)}")
        elif key not in CONFIG_SECTIONS:
            raise UserError(f"{path}: unknown section {_shown(key)} (known: base, {', '.join(CONFIG_SECTIONS)})")
        elif value is not None and not isinstance(value, dict):
            raise UserError(f"{path}: section '{key}' must be a mapping of keys, got {_shown(value)}")
    return {key: {} if value is None else value for key, value in data.items()}


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: 'base' chain loops back to itself")
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    return _deep_merge(_load_with_bases(path.parent / base, seen + (path,)), data)


def apply_override(cfg: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override in place; the value as override_value reads it."""
    if "=" not in assignment:
        raise UserError(f"--set {assignment!r}: expected key=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    node = cfg
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(keys[:depth]) or "top level"
            known = (", ".join(sorted(node)) or "none") if isinstance(node, dict) else "nothing (not a section)"
            raise UserError(f"--set {dotted}: unknown config key '{key}' under {where} (known: {known})")
        if depth == len(keys) - 1:
            node[key] = override_value(dotted, raw)
        else:
            node = node[key]


def override_value(dotted: str, raw: str) -> Any:
    """A --set value: a YAML scalar (1e-3, true, null, 'quoted') or flow collection ([1, 2], {a: 1}).
    A command line holds no YAML comments nor block mappings, so an unquoted value that YAML would
    cut at a " #" or read as a mapping ("a: b", as in a folder name) is the text as typed: the path
    given is the path used."""
    if not raw.strip():
        return None
    written = raw.lstrip().startswith(("[", "{", "'", '"'))  # a flow collection or a quoted scalar
    if not written and re.search(r"(^|\s)#", raw):
        return raw
    try:
        value = parse_yaml(raw)
    except yaml.YAMLError:
        if written:
            raise UserError(f"--set {dotted}: cannot parse value {raw!r}") from None
        return raw
    return raw if isinstance(value, (dict, list)) and not written else value


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    cfg = _load_with_bases(Path(path))
    for assignment in overrides or []:
        apply_override(cfg, assignment)
    return cfg


def config_hash(obj: Any) -> str:
    """Stable short hash of any JSON-able object (used to tell whether cached outputs are stale)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# typed config sections: a dataclass holds a section's keys, types and defaults
# ---------------------------------------------------------------------------------------------

class ConfigError(UserError):
    """A config key's problem: ``key`` is its dotted name (``train.lr``), ``detail`` the problem
    without the key (``must be positive, got nan``), for a caller that words its errors its own way."""

    def __init__(self, key: str, detail: str, message: str | None = None):
        self.key, self.detail = key, detail
        super().__init__(message or f"config: {key} {detail}")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _must_be(where: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(where, f"must be {expected}, got {_shown(value)}")


def type_text(annotation: Any) -> str:
    """A value of ``annotation`` in words ("an integer", "valid or holdout"), for messages."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    simple = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Any: "any value"}
    if annotation in simple:
        return simple[annotation]
    if origin is typing.Literal:
        choices = [str(a) for a in args]
        return " or ".join(choices) if len(choices) == 2 else "one of " + ", ".join(choices)
    if origin in (list, tuple) and (origin is list or args[1:] == (Ellipsis,)):
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if origin is tuple:
        return f"a list of {len(args)} values ({'; '.join(type_text(a) for a in args)})"
    if origin in (typing.Union, types.UnionType):
        arms = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(arms + (["null"] if type(None) in args else []))
    if dataclasses.is_dataclass(annotation):
        return "a mapping of keys"
    return getattr(annotation, "__name__", str(annotation))


def _plural(annotation: Any) -> str:
    words = {bool: "true/false values", int: "integers", float: "numbers", str: "strings"}
    if typing.get_origin(annotation) is typing.Literal:
        return "values from " + ", ".join(str(a) for a in typing.get_args(annotation))
    return words.get(annotation) or f"values each {type_text(annotation)}"


def _typed_value(annotation: Any, value: Any, where: str) -> Any:
    """``value`` checked against ``annotation`` and coerced (8192.0 -> 8192, 1 -> 1.0, [..] -> tuple)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:  # True is an int to Python, not to a config; 8192.0 is a fine int
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isinf(value):  # .inf would pass every bound; NaN fails them (_check_constraints)
                raise _must_be(where, "a finite number", value)
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float, datetime.date)):  # YAML read 2025, yes or 2025-01-01
            key = where.rsplit(".", 1)[-1]
            raise ConfigError(where, f"must be a string, got {_shown(value)} (YAML read a number, true/false or "
                                     f"a date: quote the text, {key}: '2025' in a file, \"{where}='2025'\" after --set)")
    elif origin is typing.Literal:
        for choice in args:  # the type too: true must not pass for 1, nor 1 for true
            if value == choice and type(value) is type(choice):
                return choice
    elif origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [a for a in args if a is not type(None)]
        for arm in arms:
            try:
                return _typed_value(arm, value, where)
            except ConfigError:
                if len(arms) == 1:
                    raise
    elif origin in (list, tuple):
        variadic = origin is list or args[1:] == (Ellipsis,)
        if isinstance(value, (list, tuple)) and (variadic or len(value) == len(args)):
            arms = [args[0] if args else Any] * len(value) if variadic else args
            items = []
            for i, (arm, item) in enumerate(zip(arms, value)):
                try:
                    items.append(_typed_value(arm, item, f"{where}[{i}]"))
                except ConfigError:
                    if dataclasses.is_dataclass(arm):
                        raise
                    raise ConfigError(where, f"must be {type_text(annotation)}, got {_shown(value)} "
                                             f"(item {i}: {_shown(item)})") from None
            return items if origin is list else tuple(items)
    elif dataclasses.is_dataclass(annotation):
        return typed_section(annotation, value, where)
    else:
        raise TypeError(f"typed_section: {where}: unsupported annotation {annotation!r}")
    raise _must_be(where, type_text(annotation), value)


def _check_constraints(metadata: typing.Mapping, value: Any, where: str, raw: Any) -> None:
    """A field's value constraints, from ``dataclasses.field(metadata=...)``: ``min``, ``max``,
    ``range: (lo, hi)`` (inclusive) and ``positive: True`` on a number, or on every number of a
    list; ``nonempty: True`` on a string or list. ``raw`` is the value as written, for the message."""
    if metadata.get("nonempty") and isinstance(value, (str, list, tuple)) and not value:
        raise ConfigError(where, f"must not be empty, got {_shown(raw)}")
    lo, hi = metadata.get("range", (metadata.get("min"), metadata.get("max")))
    rules = [(metadata.get("positive"), lambda v: v > 0, "positive"),
             (lo is not None and hi is not None, lambda v: lo <= v <= hi, f"in [{lo}, {hi}]"),
             (lo is not None and hi is None, lambda v: v >= lo, f"at least {lo}"),
             (hi is not None and lo is None, lambda v: v <= hi, f"at most {hi}")]
    is_list = isinstance(value, (list, tuple))
    for number in value if is_list else [value]:
        if not isinstance(number, (int, float)) or isinstance(number, bool):
            continue
        for active, ok, expected in rules:
            if active and not ok(number):  # NaN fails every comparison
                raise ConfigError(where, f"items must each be {expected}, got {_shown(raw)}" if is_list
                                  else f"must be {expected}, got {_shown(raw)}")


T = typing.TypeVar("T")


def typed_section(cls: type[T], raw: Any, where: str) -> T:
    """The config section ``raw`` (a mapping) as an instance of the dataclass ``cls``.

    ``cls`` holds the section's keys, types (annotations) and defaults, so no checker repeats
    them: a key that is not a field is an error naming the known ones, a missing key takes the
    field's default (no default: required), and every value is checked and coerced by its
    annotation: bool (true/false only), int (8192.0 is 8192; true is not 1), float (ints too), str,
    Literal[...], list[X], tuple[X, ...], X | None, a nested dataclass (a nested section), and by
    the field's metadata constraints (see _check_constraints). Every problem is one ConfigError
    (a UserError) line naming the key as ``{where}.{key}``.
    """
    if not isinstance(raw, dict):
        raise _must_be(where, "a mapping of keys", raw)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    known = f"known: {', '.join(fields) or 'none'}"
    for key in raw:
        if key not in fields:  # a typo must never silently run the default
            raise ConfigError(f"{where}.{key}", f"unknown key ({known})",
                              f"config: unknown key {where}.{key} ({known})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in fields.items():
        if name in raw:
            values[name] = _typed_value(hints[name], raw[name], f"{where}.{name}")
            _check_constraints(f.metadata, values[name], f"{where}.{name}", raw[name])
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            expected = type_text(hints[name])
            raise ConfigError(f"{where}.{name}", f"missing key ({expected}, no default)",
                              f"config: missing key {where}.{name} ({expected}, no default)")
    return cls(**values)


def add_config_args(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=str(CONFIG_DIR / default_config),
                        help=f"YAML config (default: configs/{default_config})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set data.n_folds=5 (repeatable)")


def config_from_args(args: argparse.Namespace) -> dict:
    return load_config(args.config, args.overrides)


def data_paths(cfg: dict) -> dict[str, Path]:
    """The fixed locations every stage agrees on (see docs/DESIGN.md)."""
    work = Path(cfg["data"]["work_dir"])
    return {
        "raw": Path(cfg["data"]["raw_dir"]),
        "oracle": Path(cfg["data"]["raw_dir"]) / "oracle",
        "work": work,
        "processed": work / "processed",
        "runs": work / "runs",
    }


# ---------------------------------------------------------------------------------------------
# atomic output: write to a temporary name in the same folder, then rename
# ---------------------------------------------------------------------------------------------

def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# tempfile makes files 0600 and folders 0700 (private to their owner); what a stage publishes gets
# the permissions any other new file would get: 0666 / 0777 minus the umask
UMASK = _read_umask()
FILE_MODE, DIR_MODE = 0o666 & ~UMASK, 0o777 & ~UMASK


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended: a zombie (ended, not yet reaped by its
    parent, which a container's init may never do) counts as ended."""
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    with contextlib.suppress(OSError, IndexError):  # Linux: the state follows the name in parentheses
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return False
    return True


PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal this process gets when its parent dies


def die_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid``, its parent, ends (Linux: prctl PR_SET_PDEATHSIG):
    a worker process must not outlive the run that started it, training on into a folder that a
    rerun may have taken over. Exits at once if the parent has ended already. Elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return  # not allowed here (a sandbox): the worker lives as before
    if os.getppid() != parent_pid:  # the parent died before the prctl took effect
        os._exit(1)


def _sweep_left_overs(final: Path, suffix_glob: str, pattern: str) -> None:
    """Remove the scratch files and folders beside ``final`` (``.<name><suffix>``) whose writer, the
    pid in group 1 of ``pattern``, is gone: what a killed process could not clean up."""
    regex = re.compile(rf"\.{re.escape(final.name)}{pattern}")
    for path in final.parent.glob(f".{glob.escape(final.name)}{suffix_glob}"):
        match = regex.fullmatch(path.name)
        if match and not process_alive(int(match.group(1))):
            log(f"removing {path}, left by an interrupted process")
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


def sweep_staged_left_overs(final: Path) -> None:
    """Remove the scratch folders of staged_folder(final) whose process is gone (a kill -9 or SIGTERM
    skips the clean-up): a stage that may not reach staged_folder, or checks the disk's room first,
    calls it before."""
    _sweep_left_overs(Path(final), "-*", r"-(?:tmp|old)-(\d+)-.*")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    A crash or kill inside the block leaves at most a ``.<name>.<pid>.*.tmp`` file, never a
    half-written ``path``; the next write of ``path`` removes such files of dead processes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_left_overs(path, ".*.tmp", r"\.(\d+)\..*\.tmp")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(fd)
    tmp_path = Path(tmp)
    tmp_path.chmod(FILE_MODE)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike, result_files: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a new empty folder beside ``final``; on success it replaces ``final`` whole.

    A stage writes every output into it, so a failure (full disk, kill, error) leaves the previous
    complete ``final`` and no mix. Scratch folders of dead processes (``.<name>-tmp-<pid>-*``,
    ``.<name>-old-<pid>-*``) are removed first: a killed full-size build leaves gigabytes.
    ``result_files``: the files whose bytes are the folder's result. A previous ``final`` with other
    bytes in any of them is another finished result: it is moved aside (aside_path), not deleted.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_staged_left_overs(final)
    staging = scratch_folder(final, "tmp")
    try:
        yield staging
        old = None
        if final.exists() and not same_files(final, staging, result_files):
            aside = aside_path(final)
            final.replace(aside)
            log(f"{final}: the earlier result (other predictions) is kept as {aside}")
        elif final.exists():
            old = scratch_folder(final, "old")
            final.replace(old / final.name)
        staging.replace(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def same_files(folder: Path, other: Path, names: tuple[str, ...]) -> bool:
    """Whether each named file holds the same bytes in both folders (a file missing in both counts as
    the same)."""
    def content(path: Path) -> bytes | None:
        return path.read_bytes() if path.is_file() else None
    return all(content(folder / name) == content(other / name) for name in names)


def scratch_folder(final: Path, kind: str) -> Path:
    """A new folder beside ``final`` whose name records this process, e.g. .processed-tmp-4242-x1y2
    (kind tmp or old: sweep_staged_left_overs(final) removes it once the process is gone)."""
    path = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-{kind}-{os.getpid()}-"))
    path.chmod(DIR_MODE)  # mkdtemp's 0700 would make a published folder private
    return path


def require_writable_folder(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` if needed and check that a file can be written in it: a stage checks its
    output folders before its work starts, not after hours of training."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{path}: {what} must be a folder, and this is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{exc.filename or path}: {what} cannot be written ({exc.strerror})") from None
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class _ConfigDumper(yaml.SafeDumper):
    """Writes what _ConfigLoader reads back: a string such as '1e3', which YAML 1.1 takes for text
    but the loader (as YAML 1.2) for a number, is quoted."""


_ConfigDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def dump_yaml(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_ConfigDumper, sort_keys=False)


def write_yaml(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(dump_yaml(obj))


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_parquet(path: str | os.PathLike, df) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def first_line(what: BaseException | str | None) -> str:
    """The first line of an exception's message (its type when it has none) or of a text: errors are
    reported as one line."""
    text = ("" if what is None else str(what)).strip()
    if text:
        return text.splitlines()[0]
    return type(what).__name__ if isinstance(what, BaseException) else ""


def aside_path(path: Path) -> Path:
    """A free name beside ``path`` for it to be moved aside to, never deleted: <name>.old-<time> for
    a folder, <stem>.old-<time><suffix> for a file (submission.zip -> submission.old-<time>.zip)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = "" if path.is_dir() else path.suffix
    stem = path.name[:len(path.name) - len(suffix)]
    aside, n = path.with_name(f"{stem}.old-{stamp}{suffix}"), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{stem}.old-{stamp}-{n}{suffix}")
    return aside


def require_file(path: str | os.PathLike, what: str = "file", note: str = "") -> None:
    """A one-line UserError naming ``path`` unless it is a file: missing, or a folder (+ ``note``)."""
    if not Path(path).is_file():
        problem = f"a folder, not a {what}" if Path(path).is_dir() else f"{what} not found"
        raise UserError(f"{path}: {problem}{note}")


def read_json(path: str | os.PathLike) -> Any:
    """A JSON file's content; a missing or unreadable file is a one-line UserError naming it."""
    path = Path(path)
    require_file(path)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise UserError(f"{path}: not a readable JSON file ({first_line(exc)})") from None


def read_parquet(path: str | os.PathLike, columns: list[str], filters=None):
    """``columns`` of a parquet file as a DataFrame; a missing or unreadable file, or a missing
    column, is a one-line UserError naming the file (and the column)."""
    import pandas as pd
    import pyarrow.parquet as pq
    path = Path(path)
    require_file(path)
    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # pyarrow raises many types for a damaged file; all mean the same here
        raise UserError(f"{path}: not a readable parquet file ({first_line(exc)})") from None
    for column in columns:
        if column not in names:
            raise UserError(f"{path}: column '{column}': missing (found: {', '.join(names) or 'none'})")
    try:
        return pd.read_parquet(path, columns=columns, filters=filters)
    except Exception as exc:
        raise UserError(f"{path}: not a readable parquet file ({first_line(exc)})") from None


# ---------------------------------------------------------------------------------------------
# misc
# ---------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    try:
        import torch
        torch.manual_seed(seed)
    except ImportError:  # torch-free scripts (make_synthetic) still seed numpy
        pass


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_main(main: Callable[[], Any]) -> None:
    """Entry point wrapper: user errors become one line on stderr and exit code 2, a Ctrl-C one
    line and exit code 130."""
    try:
        with interrupt_ends_in_one_line():
            main()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        print(f"error: {disk_error_text(exc)}", file=sys.stderr, flush=True)
        sys.exit(2)


# what the machine's disks can refuse: the user can act on each (free space, permissions, a path)
DISK_ERRORS = {errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EEXIST,
               errno.ENOTDIR, errno.EISDIR, errno.EFBIG}


def disk_error_text(exc: OSError) -> str:
    where = exc.filename or "an output file"
    hint = {errno.ENOSPC: "free space there or point the outputs elsewhere",
            errno.EDQUOT: "free space there or point the outputs elsewhere",
            errno.EROFS: "point the outputs at a writable folder",
            errno.EACCES: "point the outputs at a folder you can write",
            errno.EPERM: "point the outputs at a folder you can write"}.get(exc.errno, "check the path")
    return f"{where}: {exc.strerror} ({hint}); finished outputs are kept, rerun the same command after"


# ---------------------------------------------------------------------------------------------
# oracle (synthetic data only): the true click probabilities and the hidden test labels
# ---------------------------------------------------------------------------------------------

def read_oracle_prob(raw_dir: str | os.PathLike, split: str) -> np.ndarray | None:
    """True click probability of every row of ``split``, ordered by row id; None on real data."""
    path = Path(raw_dir) / "oracle" / "click_prob.parquet"
    if not path.is_file():
        return None
    df = read_parquet(path, ["split", "row_id", "prob"], filters=[("split", "==", split)])
    prob = df.sort_values("row_id")["prob"].to_numpy(np.float64)
    if not ((prob >= 0) & (prob <= 1)).all():  # NaN fails both comparisons
        raise UserError(f"{path}: column 'prob': values must be probabilities in [0, 1] (NaN or "
                        f"out of range in split {split})")
    return prob


def read_test_labels(raw_dir: str | os.PathLike) -> np.ndarray | None:
    """Hidden test labels ordered by ID (synthetic data only); None on real data."""
    path = Path(raw_dir) / "oracle" / "test_labels.parquet"
    if not path.is_file():
        return None
    df = read_parquet(path, ["ID", "label"]).sort_values("ID")
    ids, labels = df["ID"].to_numpy(), df["label"].to_numpy(np.float64)
    if len(ids) and not np.array_equal(ids, np.arange(len(ids))):
        raise UserError(f"{path}: column 'ID': IDs must be 0..{len(ids) - 1}, each once")
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if len(bad):
        raise UserError(f"{path}: column 'label': ID {ids[bad[0]]} has label {labels[bad[0]]:g}, "
                        f"expected 0 or 1")
    return labels.astype(np.int64)

