"""Build cljax's API reference from its docstrings with pdoc (``make docs``).

    python docs/build_api.py [-o OUT_DIR]      # default build/api; open OUT_DIR/cljax.html

Any warning pdoc raises (an annotation it cannot resolve, a broken cross-reference) fails
the build, so the reference stays complete; ``tests/test_docs.py`` builds it.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
import sys
import warnings
from pathlib import Path

import pdoc

import cljax

DEFAULT_OUT = Path("build/api")


def _namedtuple_constructors_in_their_module() -> None:
    """Point each NamedTuple's generated ``__new__`` at the module that defines it.

    ``collections.namedtuple`` builds ``__new__`` in a synthetic module
    (``namedtuple_<Name>``), so pdoc cannot find the names a postponed annotation such
    as ``"dict[str, SubspaceBasis]"`` refers to; the defining module holds them.
    """
    for info in pkgutil.walk_packages(cljax.__path__, "cljax."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and hasattr(cls, "_fields"):
                cls.__new__.__module__ = cls.__module__


def build(out_dir: Path) -> list[str]:
    """Render ``cljax`` and its submodules into ``out_dir``; returns pdoc's warnings."""
    _namedtuple_constructors_in_their_module()
    pdoc.render.configure(docformat="google", search=True, show_source=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc("cljax", output_directory=out_dir)
    return [str(w.message) for w in caught]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT, help="output directory")
    args = parser.parse_args(argv)
    problems = build(args.out)
    for message in problems:
        print(f"docs warning: {message}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} warning(s): the API reference is incomplete", file=sys.stderr)
        return 1
    print(f"API reference: {args.out / 'cljax.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
