"""`python -m bench [name] [options]`: run one benchmark (default: all), or `--list`."""

from __future__ import annotations

import importlib
import sys

from bench import BENCHMARKS


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-l", "--list"):
        for name, (_, what) in BENCHMARKS.items():
            print(f"{name:8} {what}")
        return 0
    if argv and not argv[0].startswith("-"):
        name, rest = argv[0], argv[1:]
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        names = [name]
    else:
        names, rest = list(BENCHMARKS), argv
    status = 0
    for name in names:
        status |= importlib.import_module(BENCHMARKS[name][0]).main(rest)
    return status


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
