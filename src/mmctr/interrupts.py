"""One line for a Ctrl-C, from a program's first import on: the standard library alone, so that the
src/<stage>.py wrappers hold the guard before anything slow (numpy, yaml, torch) loads."""
import contextlib
import sys
from typing import Iterator


@contextlib.contextmanager
def interrupt_ends_in_one_line() -> Iterator[None]:
    """A Ctrl-C inside ends the program with one line, 'interrupted', and exit code 130. The
    src/<stage>.py wrappers import their stage under it: torch takes seconds to import."""
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
