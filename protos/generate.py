"""Regenerate the Python stubs of the wire contract, or check that they are fresh.

    python protos/generate.py           # write fedlens/v1/*_pb2*.py(i)
    python protos/generate.py --check   # exit 1 if the committed stubs are stale

The include root is ``protos/``, so ``protos/fedlens/v1/x.proto`` becomes the module
``fedlens.v1.x_pb2`` beside the kernel package.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

PROTOS = Path(__file__).resolve().parent
ROOT = PROTOS.parent
PACKAGE = Path("fedlens") / "v1"


def generate(out: Path) -> None:
    # protoc finds the mypy plugins on PATH; they live beside this interpreter.
    bindir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / PACKAGE).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def stale_files(fresh: Path) -> list[str]:
    current = ROOT / PACKAGE
    names = {p.name for p in (fresh / PACKAGE).iterdir()}
    names |= {p.name for p in current.glob("*_pb2*")}
    stale = []
    for name in sorted(names):
        a, b = fresh / PACKAGE / name, current / name
        if not (a.exists() and b.exists() and filecmp.cmp(a, b, shallow=False)):
            stale.append(str(PACKAGE / name))
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check freshness")
    args = parser.parse_args()
    if not args.check:
        generate(ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = stale_files(Path(tmp))
    if stale:
        print("stale generated stubs (run `make protos`):", *stale, sep="\n  ", file=sys.stderr)
        return 1
    print("generated stubs are fresh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
