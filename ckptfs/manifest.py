"""The tree's `manifest`: build it, load and validate it, and check a tree against it.

Format (docs/FORMAT.md "manifest"): JSON with sorted keys, `format` 1, `state` (`running` or
`frozen`), `source` (Meta as a dict), `root`, `tasks`, `chunk_size`, `checksum` = `xxh3_64`,
and when frozen `files`: {relative path: {"size": n, "xxh3_64": 16 hex digits}}.

A manifest comes from another host, so load() treats it as hostile: relative paths only, no
`..`, no more than MAX_FILES entries, no file larger than a sane bound (a memory chunk never
exceeds chunk_size). Every refusal is errors.BadTree naming the manifest and the value.

check() decides completeness: it walks the tree once without following symlinks, so a listed
path reached through a symlink (or being one) counts as absent, compares sizes first and only
reads files (to checksum them) when every listed file is present with its size.
"""
from __future__ import annotations

import json
import os
import re
import stat

import xxhash

from .errors import BadTree

FORMAT = 1
ALGO = "xxh3_64"
MAX_FILES = 200_000
MAX_MANIFEST_BYTES = 64 << 20
MAX_FILE_SIZE = 64 << 30          # anything but a chunk: e.g. a deleted file's contents
MAX_CHUNK_SIZE = 1 << 30
NOT_LISTED = ("manifest", "ctl", "status")   # top-level names a manifest never lists
REQUIRED = ("format", "state", "source", "root", "tasks", "chunk_size", "checksum")
STATES = ("running", "frozen")
_HEX16 = re.compile(r"[0-9a-f]{16}\Z")
_TEMP = re.compile(r"\.(.+)\.[A-Za-z0-9]{6}\Z")   # rsync's hidden temp name: .NAME.XXXXXX
_READ = 1 << 20


def checksum(data: bytes) -> str:
    """xxh3-64 of data as 16 lowercase hex digits."""
    return xxhash.xxh3_64(data).hexdigest()


def checksum_file(path: str) -> str:
    """Streaming xxh3-64 of a file (symlinks are not followed). Raises OSError naming path.

    Reads without touching atime where allowed, so a watcher does not see the check itself."""
    h = xxhash.xxh3_64()
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NOATIME)
    except PermissionError:       # O_NOATIME needs ownership or CAP_FOWNER
        fd = os.open(path, flags)
    try:
        while block := os.read(fd, _READ):
            h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest()


def checksum_fd(fd: int) -> str:
    """xxh3-64 of an open file's whole content (pread from 0: the file offset is left alone)."""
    h, off = xxhash.xxh3_64(), 0
    while block := os.pread(fd, _READ, off):
        h.update(block)
        off += len(block)
    return h.hexdigest()


def build(meta: dict, root: int, tasks: list[int], chunk_size: int, state: str,
          files: dict[str, tuple[int, str]] | None) -> bytes:
    """The manifest as bytes: deterministic JSON (sorted keys, one entry a line, final newline).

    `files` ({path: (size, checksum)}) must be given exactly when state is `frozen`.
    Raises BadTree if the result would not pass load()."""
    doc = {"format": FORMAT, "state": state, "source": dict(meta), "root": int(root),
           "tasks": [int(t) for t in tasks], "chunk_size": int(chunk_size), "checksum": ALGO}
    if files is not None:
        doc["files"] = {p: {"size": int(s), ALGO: h} for p, (s, h) in files.items()}
    validate(doc, "manifest")
    return (json.dumps(doc, sort_keys=True, indent=1) + "\n").encode()


def scan_tree(tree_dir: str) -> dict[str, tuple[int, str]]:
    """Every regular file under tree_dir (except top-level manifest/ctl/status) with its size
    and checksum: the `files` argument of build() for a tree already on disk."""
    files = {}
    for rel, st in _walk(tree_dir)[0].items():
        if rel not in NOT_LISTED and stat.S_ISREG(st.st_mode):
            files[rel] = (st.st_size, checksum_file(os.path.join(tree_dir, rel)))
    return files


def load(path_or_bytes: str | bytes | os.PathLike) -> dict:
    """Parse and validate a manifest given as a file path or as its bytes.

    Raises BadTree naming the file: unreadable, too large, not JSON, unknown format, missing
    keys, unsafe paths, too many files, sizes out of bounds."""
    if isinstance(path_or_bytes, bytes):
        name, raw = "manifest", path_or_bytes
    else:
        name, raw = os.fspath(path_or_bytes), _read_manifest(os.fspath(path_or_bytes))
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BadTree(f"{len(raw)} bytes, more than {MAX_MANIFEST_BYTES}", path=name)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadTree(f"not JSON: {e}", path=name) from None
    validate(doc, name)
    return doc


def _read_manifest(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as e:
        raise BadTree(f"cannot read: {e.strerror}", path=path, err=e.errno) from None


def validate(doc, name: str = "manifest") -> None:
    """Raise BadTree (naming `name`) unless doc is a well-formed, safe manifest."""
    if not isinstance(doc, dict):
        raise BadTree(f"top level is {type(doc).__name__}, not an object", path=name)
    missing = [k for k in REQUIRED if k not in doc]
    if missing:
        raise BadTree(f"missing keys: {', '.join(missing)}", path=name)
    if doc["format"] != FORMAT:
        raise BadTree(f"unknown format {doc['format']!r} (this ckptfs reads {FORMAT})", path=name)
    if doc["state"] not in STATES:
        raise BadTree(f"unknown state {doc['state']!r}", path=name)
    if doc["checksum"] != ALGO:
        raise BadTree(f"unknown checksum {doc['checksum']!r} (want {ALGO})", path=name)
    _validate_numbers(doc, name)
    frozen = doc["state"] == "frozen"
    if frozen != ("files" in doc):
        raise BadTree(f"state {doc['state']} {'needs' if frozen else 'must not have'} files",
                      path=name)
    if frozen:
        _validate_files(doc["files"], doc["chunk_size"], name)


def _validate_numbers(doc: dict, name: str) -> None:
    if not _is_int(doc["root"]) or doc["root"] <= 0:
        raise BadTree(f"bad root {doc['root']!r}", path=name)
    tasks = doc["tasks"]
    if not isinstance(tasks, list) or not all(_is_int(t) and t > 0 for t in tasks):
        raise BadTree(f"bad tasks {tasks!r:.80}", path=name)
    if doc["root"] not in tasks:
        raise BadTree(f"root {doc['root']} not in tasks", path=name)
    cs = doc["chunk_size"]
    if not _is_int(cs) or cs <= 0 or cs % 4096 or cs > MAX_CHUNK_SIZE:
        raise BadTree(f"bad chunk_size {cs!r}", path=name)
    if not isinstance(doc["source"], dict):
        raise BadTree("source is not an object", path=name)


def _validate_files(files, chunk_size: int, name: str) -> None:
    if not isinstance(files, dict):
        raise BadTree("files is not an object", path=name)
    if len(files) > MAX_FILES:
        raise BadTree(f"lists {len(files)} files, more than {MAX_FILES}", path=name)
    for rel, entry in files.items():
        problem = path_problem(rel) or _entry_problem(rel, entry, chunk_size)
        if problem:
            raise BadTree(f"files[{rel!r:.200}]: {problem}", path=name)


def path_problem(rel) -> str | None:
    """Why rel is not an acceptable relative path inside a tree, or None."""
    if not isinstance(rel, str) or not rel:
        return "empty or not a string"
    if rel.startswith("/"):
        return "absolute path"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "path with an empty, '.' or '..' component"
    if "\0" in rel or len(rel) > 4096:
        return "path with a NUL byte or longer than 4096"
    if rel in NOT_LISTED:
        return f"{rel} is never listed"
    return None


def _entry_problem(rel: str, entry, chunk_size: int) -> str | None:
    if not isinstance(entry, dict) or set(entry) != {"size", ALGO}:
        return f"entry must be {{size, {ALGO}}}, got {entry!r:.80}"
    size = entry["size"]
    bound = chunk_size if "/pages/" in f"/{rel}" else MAX_FILE_SIZE
    if not _is_int(size) or not 0 <= size <= bound:
        return f"size {size!r} outside 0..{bound}"
    if not isinstance(entry[ALGO], str) or not _HEX16.match(entry[ALGO]):
        return f"checksum {entry[ALGO]!r:.40} is not 16 hex digits"
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check(tree_dir: str, manifest: dict, known=None) -> list[str]:
    """What keeps tree_dir from being complete for manifest (already load()ed); [] = complete.

    One problem per line, naming the file: not frozen, missing (or not a regular file, or
    reached through a symlink), wrong size, wrong checksum. A hidden temp file next to an
    incomplete file (`.NAME.XXXXXX`, as rsync writes) is named with it as a copy in progress;
    a stale temp beside a correct file does not matter and is ignored. Checksums are only
    computed when every listed file is present with its size.

    known(path, lstat) -> checksum or None: checksums the caller already has for a file in
    exactly this state (the target's verified sums); only the others are read."""
    return inspect(tree_dir, manifest, known)[0]


def inspect(tree_dir: str, manifest: dict, known=None) -> tuple[list[str], list[str]]:
    """check()'s problems, and the files present that the manifest does not list (`extras`:
    never manifest/ctl/status, rsync temp files or a FreeBSD `plan/`). Extras do not make a
    tree incomplete; a copy tool may still be about to delete them."""
    if manifest.get("state") != "frozen":
        return [f"manifest: state is {manifest.get('state')!r}, not frozen"], []
    found, temps = _walk(tree_dir)
    files = manifest["files"]
    problems = _size_problems(files, found)
    if not problems:
        problems = _checksum_problems(tree_dir, files, found, known)
    extras = [rel for rel in found if rel not in files and rel not in NOT_LISTED
              and not rel.startswith("plan/") and not _TEMP.match(os.path.basename(rel))]
    return [_with_temp(p, rel, temps) for rel, p in problems], sorted(extras)


def _walk(tree_dir: str) -> tuple[dict[str, os.stat_result], dict[str, str]]:
    """Every non-directory under tree_dir (rel -> lstat) and rsync temp files (final rel ->
    temp rel), without following symlinks."""
    found, temps = {}, {}
    for top, dirs, names, dfd in os.fwalk(tree_dir, follow_symlinks=False):
        base = os.path.relpath(top, tree_dir)
        base = "" if base == "." else base + "/"
        for n in names + [d for d in dirs if os.path.islink(os.path.join(top, d))]:
            found[base + n] = st = os.stat(n, dir_fd=dfd, follow_symlinks=False)
            m = _TEMP.match(n)
            if m and stat.S_ISREG(st.st_mode):
                temps[base + m.group(1)] = base + n
    return found, temps


def _size_problems(files: dict, found: dict) -> list[tuple[str, str]]:
    problems = []
    for rel, entry in files.items():
        st = found.get(rel)
        if st is None:
            problems.append((rel, f"{rel}: missing"))
        elif not stat.S_ISREG(st.st_mode):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file"
            problems.append((rel, f"{rel}: is {kind} (refused)"))
        elif st.st_size != entry["size"]:
            problems.append((rel, f"{rel}: size {st.st_size}, want {entry['size']}"))
    return problems


def _checksum_problems(tree_dir: str, files: dict, found: dict, known=None
                       ) -> list[tuple[str, str]]:
    problems = []
    for rel, entry in files.items():
        path = os.path.join(tree_dir, rel)
        got = known(path, found[rel]) if known else None
        if got == entry[ALGO]:
            continue
        try:
            got = checksum_file(path)
        except OSError as e:
            problems.append((rel, f"{rel}: cannot read: {e.strerror}"))
            continue
        if got != entry[ALGO]:
            problems.append((rel, f"{rel}: checksum {got}, want {entry[ALGO]}"))
    return problems


def _with_temp(problem: str, rel: str, temps: dict[str, str]) -> str:
    temp = temps.get(rel)
    return f"{problem} (copy in progress: {temp})" if temp else problem
