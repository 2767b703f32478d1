"""Every CRIU image message and enum, by its CRIU name: `pb.core_entry`, `pb.fd_types`, ...

The classes are generated from images/*.proto into ckptfs/_pb (not committed). If that
directory is missing or older than the .proto files, it is regenerated here first, so a fresh
checkout works without running tools/setup.

Enums are exposed as their EnumTypeWrapper (`pb.fd_types.Value("REG")`, `pb.fd_types.Name(1)`);
their values are also module attributes as protoc makes them (`pb.REG`). Enums nested in a
message (core_entry.march) are exposed by their own name too (`pb.march`, `pb.X86_64`) unless
a top-level name is already taken.
"""
import importlib
import pkgutil

from ckptfs import protogen

if protogen.stale():
    protogen.main()

from ckptfs import _pb  # noqa: E402  (after regeneration on purpose)

MODULES = []   # the generated *_pb2 modules, in name order


def _export() -> None:
    g = globals()
    for info in sorted(pkgutil.iter_modules(_pb.__path__), key=lambda i: i.name):
        if not info.name.endswith("_pb2"):
            continue
        mod = importlib.import_module(f"{_pb.__name__}.{info.name}")
        MODULES.append(mod)
        fd = mod.DESCRIPTOR
        for name in fd.message_types_by_name:
            g[name] = getattr(mod, name)
        for name, enum in fd.enum_types_by_name.items():
            g[name] = getattr(mod, name)
            for value in enum.values:
                g.setdefault(value.name, value.number)
    for mod in MODULES:     # nested enums after every top-level name is in place
        for name in mod.DESCRIPTOR.message_types_by_name:
            _export_nested(g, getattr(mod, name))


def _export_nested(g: dict, cls) -> None:
    for enum in cls.DESCRIPTOR.enum_types:
        g.setdefault(enum.name, getattr(cls, enum.name))
        for value in enum.values:
            g.setdefault(value.name, value.number)
    for nested in cls.DESCRIPTOR.nested_types:
        _export_nested(g, getattr(cls, nested.name))


_export()


def message_class(full_name: str):
    """The class of a (possibly nested) message by its descriptor full name."""
    head, *rest = full_name.split(".")
    cls = globals()[head]
    for part in rest:
        cls = getattr(cls, part)
    return cls
