"""Compile images/*.proto into ckptfs/_pb/ (run by tools/setup; cheap when nothing changed).

The generated modules are not committed: they must match the installed protobuf runtime.
"""
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "images"
OUT_DIR = pathlib.Path(__file__).resolve().parent / "_pb"


def stale() -> bool:
    protos = sorted(PROTO_DIR.glob("*.proto"))
    stamp = OUT_DIR / "__init__.py"
    if not stamp.exists():
        return True
    newest = max((p.stat().st_mtime for p in protos), default=0)
    return newest > stamp.stat().st_mtime or any(
        not (OUT_DIR / (p.stem.replace("-", "_") + "_pb2.py")).exists() for p in protos)


def generate() -> None:
    from grpc_tools import protoc  # build-time dependency only

    OUT_DIR.mkdir(exist_ok=True)
    protos = sorted(str(p.name) for p in PROTO_DIR.glob("*.proto"))
    if not protos:
        return
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={OUT_DIR}", *protos]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO_DIR}")
    # protoc emits absolute imports ("import core_x86_pb2"); make them package-relative.
    for f in OUT_DIR.glob("*_pb2.py"):
        text = f.read_text()
        fixed = "\n".join(
            "from . import " + line[len("import "):] if line.startswith("import ") and line.split()[1].endswith("_pb2")
            else line for line in text.splitlines())
        f.write_text(fixed + "\n")
    (OUT_DIR / "__init__.py").write_text('"""Generated from images/*.proto by ckptfs.protogen."""\n')


def main() -> None:
    if stale() or "--force" in sys.argv:
        generate()


if __name__ == "__main__":
    main()
