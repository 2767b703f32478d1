"""Re-create a container's isolation and start a program inside it.

    c = Container.start(iso, ["helper", ...], stdout=...)   # or: with Container.create(...) as c
    c.init_pid      # host pid of the program; pid 1 of the new pid namespace if pid is own
    c.cleanup()     # kill it (and with it the whole pid namespace), remove the cgroups

How: everything is checked first (BadTree / Unsupported naming the tree file and the value),
then the cgroups are made with their limits (cgroups.py). Then a namespace init is started
with posix-spawn-like subprocess (never fork() in the caller: it may be a threaded FUSE
daemon). That init is a small Python program (`_nsinit`) that talks to us over a socketpair:

    outer  with `user` own: unshare(CLONE_NEWUSER) alone, tells us its pid, waits while we
           write its uid/gid maps from outside (userns.py), so that every namespace made next
           belongs to the new user namespace;
           unshare(mnt uts ipc net pid time per `own`); a new time namespace gets offsets that
           continue the recorded clocks (timens.py); fork if pid or time is own (both apply
           to children only); tells us the child's host pid; waits for it, exits with its status.
    inner  (pid 1 of the new pid namespace) dies with the outer (PR_SET_PDEATHSIG);
           makes every mount private and mounts its own /proc; sets hostname and domainname;
           brings up loopback and the recorded interfaces, addresses and routes (net.py);
           re-creates the recorded mounts (mounts.py), filling each tmpfs with its recorded
           files right after mounting it (tmpfs.py); joins the new cgroups and unshares
           the cgroup namespace (so its root is the container's cgroup; last, so the setup's
           helper processes count against none of its limits); in a user namespace becomes
           its root (so that the program keeps its capabilities there); reports "ready"; execs.

The socket is close-on-exec, so end-of-file after "ready" means the exec happened. Any failure
in the init comes back as the error it raised (class, file, message) and everything is torn
down: the pid namespace dies with its init, the net and mount namespaces with their last task
(nothing is bind-mounted under /run/netns), and the cgroups are removed after their tasks are
gone. A user namespace needs its maps (isolation/user/); without them it is refused. A new
time namespace continues the recorded clocks (isolation/time/) or, for a tree without them,
starts with the offsets the caller gives (`time_offsets`; default zero).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

from .. import errors
from ..errors import BadTree, CkptError, KernelError, Unsupported
from . import Link, Mount, NetConfig, copy_extra
from . import cgroups as _cgroups
from . import timens as _timens
from . import tmpfs as _tmpfs

CLONE = {"mnt": 0x00020000, "uts": 0x04000000, "ipc": 0x08000000, "net": 0x40000000,
         "pid": 0x20000000, "time": 0x00000080, "cgroup": 0x02000000, "user": 0x10000000}
FORKING = ("pid", "time")      # these take effect for children of the unsharing task
PR_SET_PDEATHSIG = 1
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_BOOT = ("import sys; sys.path.insert(0, {root!r}); "
         "from ckptfs.isolation import create; create._nsinit(int(sys.argv[1]))")
START_TIMEOUT = 30.0


# -- checks before anything exists -----------------------------------------------------------
def validate(iso) -> None:
    own = set(iso.own_namespaces)
    for kind in sorted(own):
        if kind not in CLONE:
            raise Unsupported(f"namespace kind {kind!r} cannot be re-created here",
                              path="isolation/own")
    if "user" in own and getattr(iso, "userns", None) is None:
        raise Unsupported("'user' is own but the tree has no uid/gid maps (isolation/user/)",
                          path="isolation/own")
    if getattr(iso, "userns", None) is not None and "user" not in own:
        raise BadTree("uid/gid maps present but 'user' is not in isolation/own",
                      path="isolation/user/uid_map")
    if getattr(iso, "time", None) is not None and "time" not in own:
        raise BadTree("clocks present but 'time' is not in isolation/own",
                      path="isolation/time/monotonic")
    net, mounts = getattr(iso, "net", None), getattr(iso, "mounts", None)
    if net is not None and "net" not in own:
        raise BadTree("net configuration present but 'net' is not in isolation/own",
                      path="isolation/net")
    if mounts and "mnt" not in own:
        raise BadTree("mounts present but 'mnt' is not in isolation/own", path="isolation/mounts")
    _cgroups.validate(iso.limits)
    if net is not None:
        from . import net as _net
        _net.validate(net)
    if mounts:
        from . import mounts as _mounts
        _mounts.validate(mounts)


# -- parent side -----------------------------------------------------------------------------
class Container:
    """A program running inside re-created namespaces and cgroups."""

    def __init__(self, iso, name: str | None = None):
        self.iso = iso
        self.name = name or f"ckptfs-{uuid.uuid4().hex[:12]}"
        self.cgroups: _cgroups.CgroupSet | None = None
        self.popen: subprocess.Popen | None = None
        self.init_pid: int | None = None
        self.links: dict[str, str] = {}     # interface -> kind actually created
        self._pidfd: int | None = None
        self.time_offsets: dict[str, tuple[int, int]] = {}
        self._userns_pid: int | None = None

    @classmethod
    def start(cls, iso, argv: list[str], *, name: str | None = None,
              time_offsets: dict[str, tuple[int, int]] | None = None,
              without: tuple[str, ...] = (), **popen_kw) -> "Container":
        """`time_offsets`: {"monotonic"|"boottime": (seconds, nanoseconds)} for a new time
        namespace (so a restored task's clocks continue from the checkpoint's values).
        `without`: own namespace kinds the caller creates itself (e.g. ("pid",) for a restorer
        that clones the pid namespace's init; it must then mount that namespace's /proc)."""
        if without:
            iso = copy_extra(iso, dataclasses.replace(iso, own_namespaces=tuple(
                k for k in iso.own_namespaces if k not in without)))
        c = cls(iso, name)
        c.time_offsets = dict(time_offsets or {})
        try:
            validate(iso)
            if iso.limits:
                c.cgroups = _cgroups.CgroupSet.create(c.name, iso.limits)
            c._spawn(list(argv), popen_kw)
        except BaseException:
            c.cleanup()
            raise
        return c

    @classmethod
    @contextlib.contextmanager
    def create(cls, iso, argv: list[str], **kw):
        c = cls.start(iso, argv, **kw)
        try:
            yield c
        finally:
            c.cleanup()

    def _config(self, argv: list[str], staged: str) -> dict:
        iso, own = self.iso, set(self.iso.own_namespaces)
        net, mounts = getattr(iso, "net", None), getattr(iso, "mounts", None)
        clocks = getattr(iso, "time", None)
        return {"unshare": sorted(own - {"cgroup", "user"}), "cgroupns": "cgroup" in own,
                "userns": "user" in own,
                "procs": self.cgroups.procs_files() if self.cgroups else [],
                "hostname": iso.hostname if "uts" in own else None,
                "domainname": iso.domainname if "uts" in own else None,
                "net": dataclasses.asdict(net) if net is not None and "net" in own else None,
                "lo": "net" in own,
                "mounts": [_mount_dict(m) for m in mounts or []],
                "tmpfs": {m.target: _tmpfs.to_config(m.contents, os.path.join(staged, str(i)))
                          for i, m in enumerate(mounts or []) if m.contents is not None},
                "time_offsets": self.time_offsets if "time" in own else {},
                "time_clocks": clocks.clocks if clocks is not None and "time" in own else {},
                "argv": argv}

    def _spawn(self, argv: list[str], popen_kw: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="ckptfs-tmpfs-") as staged:
            self._stage(staged)
            self._spawn_with(argv, popen_kw, staged)

    def _stage(self, staged: str) -> None:
        """Contents held in memory (a live capture) become files the init copies from."""
        for i, m in enumerate(getattr(self.iso, "mounts", None) or []):
            if m.contents is not None and m.contents.dir is None:
                _tmpfs.stage(m.contents, os.path.join(staged, str(i)))

    def _spawn_with(self, argv: list[str], popen_kw: dict, staged: str) -> None:
        ours, theirs = socket.socketpair()
        with ours:
            try:
                kw = dict(popen_kw)
                kw["pass_fds"] = tuple(kw.get("pass_fds", ())) + (theirs.fileno(),)
                boot = _BOOT.format(root=_ROOT)
                self.popen = subprocess.Popen([sys.executable, "-c", boot, str(theirs.fileno())], **kw)
            finally:
                theirs.close()
            ours.settimeout(START_TIMEOUT)
            ours.sendall(json.dumps(self._config(argv, staged)).encode() + b"\n")
            self._await_ready(ours)

    def _await_ready(self, sock: socket.socket) -> None:
        forks = any(k in FORKING for k in self.iso.own_namespaces)
        if not forks:
            self._set_init(self.popen.pid)
        ready = False
        for msg in _messages(sock):
            if "userns" in msg:   # its maps, from outside, before it makes anything else
                from . import userns as _userns
                self._userns_pid = msg["userns"]
                _userns.write_maps(self.iso.userns, msg["userns"])
                _send(sock, {"go": True})
            elif "pid" in msg:
                self._set_init(msg["pid"])
            elif "ready" in msg:
                self.links, ready = msg["ready"], True
            elif "error" in msg:
                raise _rebuild(msg["error"])
        if not ready:
            code = self.popen.wait(timeout=5)
            raise errors.RestoreFailed(f"namespace init exited ({code}) before it was ready",
                                       step="create container")

    def _set_init(self, pid: int) -> None:
        # The init cannot be reaped (and its pid reused) before the outer process waits for
        # it, so the pid is still its own here; from now on it is held by a pidfd.
        self.init_pid, self._pidfd = pid, os.pidfd_open(pid)

    # -- use ------------------------------------------------------------------------------------
    def nsenter(self, argv: list[str]) -> list[str]:
        """argv prefixed with the nsenter call that runs it inside this container."""
        flags = {"user": "-U", "mnt": "-m", "uts": "-u", "ipc": "-i", "net": "-n", "pid": "-p",
                 "cgroup": "-C", "time": "-T"}
        return ["nsenter", "-t", str(self.init_pid),
                *[flags[k] for k in self.iso.own_namespaces if k in flags], "--", *argv]

    def add(self, pid: int) -> None:
        """Move another task into the container's cgroups."""
        if self.cgroups is not None:
            self.cgroups.add(pid)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    # -- teardown -------------------------------------------------------------------------------
    def release(self) -> list[str]:
        """Leave the container to its tasks (a restore succeeded): stop holding its init and
        hand back the cgroup directories, which outlive this object; whoever ends the
        container removes them (cgroups.remove_dirs) once its tasks are gone."""
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        dirs = list(self.cgroups.dirs) if self.cgroups is not None else []
        self.cgroups = None
        return dirs

    def cleanup(self, timeout: float = 5.0) -> None:
        """Kill the init (its pid namespace goes with it), reap, remove the cgroups."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            os.close(self._pidfd)
            self._pidfd = None
        if self.popen is not None:
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=timeout)
        if self.cgroups is not None:
            self.cgroups.remove(timeout)
            self.cgroups = None


def spawn_in_namespaces(iso, argv: list[str], **popen_kw) -> Container:
    """Start `argv` inside new namespaces per iso.own_namespaces (and new cgroups per
    iso.limits). The caller owns the result and must call .cleanup()."""
    return Container.start(iso, argv, **popen_kw)


def _mount_dict(m: Mount) -> dict:
    return {f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name != "contents"}


def _messages(sock: socket.socket):
    buf = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            raise errors.RestoreFailed(f"namespace init silent for {START_TIMEOUT} s",
                                       step="create container") from None
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)


_ERROR_CLASSES = {c.__name__: c for c in (BadTree, Unsupported, KernelError, CkptError)}


def _rebuild(info: dict) -> CkptError:
    cls = _ERROR_CLASSES.get(info["cls"], errors.RestoreFailed)
    e = CkptError.__new__(cls)
    Exception.__init__(e, info["text"])
    e.path, e.step = info.get("path"), info.get("step")
    if info.get("errno"):
        e.errno = info["errno"]
    return e


# -- the namespace init (runs in its own process) --------------------------------------------
def _send(sock: socket.socket, msg: dict) -> None:
    sock.sendall(json.dumps(msg).encode() + b"\n")


def _error_msg(e: BaseException, step: str) -> dict:
    if isinstance(e, CkptError):
        return {"cls": type(e).__name__, "text": str(e), "path": e.path, "step": e.step,
                "errno": e.errno}
    err = getattr(e, "errno", None)
    return {"cls": "KernelError" if err else "CkptError", "text": f"{step}: {e}", "step": step,
            "errno": err}


def _libc_call(name: str, *args) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if getattr(libc, name)(*args) != 0:
        err = ctypes.get_errno()
        raise KernelError(f"{name}{args}", err, step="create container")


def _nsinit(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    lines = sock.makefile("rb")
    cfg = json.loads(lines.readline())
    step = "unshare"
    try:
        if cfg["userns"]:
            step = "user namespace"
            _libc_call("unshare", ctypes.c_int(CLONE["user"]))
            _send(sock, {"userns": os.getpid()})
            if not json.loads(lines.readline() or b"{}").get("go"):
                os._exit(127)     # the parent gave up (and says why itself)
            if _root_mapped() and os.getuid() != 0:   # its root is not who we are
                _AS_ROOT.append(True)
            step = "unshare"
        lines.close()   # it holds the socket open: end-of-file after "ready" must mean exec
        flags = sum(CLONE[k] for k in cfg["unshare"])
        if flags:
            _libc_call("unshare", ctypes.c_int(flags))
        step = "time namespace"
        _set_time_offsets(cfg["time_offsets"], cfg["time_clocks"])
        step = "unshare"
        if any(k in FORKING for k in cfg["unshare"]):
            child = os.fork()
            if child:
                _outer(sock, child)
            _libc_call("prctl", PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        step = "setup"
        links = _setup(cfg)
        if cfg["userns"]:
            _become_root()
        step = "exec"
        _send(sock, {"ready": links})
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)   # Python ignores these; a program expects defaults
        try:
            os.execvp(cfg["argv"][0], cfg["argv"])
        except OSError as e:
            raise KernelError("cannot execute", e.errno, path=cfg["argv"][0], step="exec") from e
    except BaseException as e:  # report everything: the parent raises it and cleans up
        _send(sock, {"error": _error_msg(e, step)})
        os._exit(127)


def _root_mapped() -> bool:
    with open("/proc/self/uid_map") as f:
        return any(line.split()[0] == "0" for line in f)


def _root_ids() -> None:
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def _become_root() -> None:
    """Uid and gid 0 of the new user namespace (when mapped), so that the program keeps its
    capabilities there across exec (a restorer's helper needs them: clone3 with set_tid,
    mounting /proc); its supplementary groups are dropped where setgroups is allowed."""
    if not _root_mapped():
        return
    with open("/proc/self/setgroups") as f:
        if f.read().strip() == "allow":
            os.setgroups([])
    _root_ids()


def _set_time_offsets(offsets: dict, clocks: dict | None = None) -> None:
    """Only possible between unshare(CLONE_NEWTIME) and the first task entering it (the fork).
    Recorded clocks win over given offsets: the offsets that continue them are taken now.
    One write per clock, so that a refusal names the clock's tree file."""
    if clocks:
        offsets = _timens.offsets_now(_timens.TimeNs({k: tuple(v) for k, v in clocks.items()}))
    for clock, (sec, nsec) in offsets.items():
        text = f"{clock} {sec} {nsec}"
        try:
            with open("/proc/self/timens_offsets", "w") as f:
                f.write(text + "\n")
        except OSError as e:
            where = f"{_timens.TREE_DIR}/{clock}" if clocks else "/proc/self/timens_offsets"
            shown = f"clock {' '.join(map(str, clocks[clock]))} needs offset" if clocks else "offset"
            raise Unsupported(f"time namespace: {shown} {text!r}, refused: {os.strerror(e.errno)}",
                              path=where, step="time namespace") from e


REAP_GRACE = 0.25   # seconds a dead child stays a zombie before the outer reaps it


def _outer(sock: socket.socket, child: int) -> None:
    _send(sock, {"pid": child})
    sock.close()
    # Seen dead first, reaped a moment later: a restorer that detaches the child and then
    # kills it (its helper) must still find it, if only as a zombie, not an unknown pid.
    os.waitid(os.P_PID, child, os.WEXITED | os.WNOWAIT)
    time.sleep(REAP_GRACE)
    _, status = os.waitpid(child, 0)
    os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


_AS_ROOT: list = []    # set in a new user namespace: helper programs run as its root


def _run(argv: list) -> None:
    # mount(8) refuses to work for a non-root uid ("must be superuser"); in a new user namespace
    # whose root is not us (host root unmapped: we are 65534 there, with every capability), the
    # helper becomes its root for the call, while we stay who may read the tree and join cgroups
    r = subprocess.run(argv, capture_output=True, text=True,
                       preexec_fn=_root_ids if _AS_ROOT else None)
    if r.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {r.stderr.strip()}")


def _setup(cfg: dict) -> dict:
    """Everything the new namespaces need before the program runs; returns the links made."""
    from . import mounts as _mounts
    if "mnt" in cfg["unshare"]:
        _mounts.private_root_and_proc(_run, proc="pid" in cfg["unshare"])
    if cfg["hostname"] is not None:
        socket.sethostname(cfg["hostname"])
    if cfg["domainname"] is not None:
        with open("/proc/sys/kernel/domainname", "w") as f:
            f.write(cfg["domainname"])
    links = _setup_net(cfg)
    tmpfs = cfg["tmpfs"]
    fill = _fill_as_root if _AS_ROOT else _tmpfs.fill
    _mounts.apply([Mount(**m) for m in cfg["mounts"]], _run,
                  after=lambda m: fill(m.target, tmpfs[m.target]) if m.target in tmpfs else None)
    _join_cgroups(cfg)
    return links


def _fill_as_root(target: str, cfg: dict) -> None:
    """Fill a tmpfs of a user namespace that does not map us: a new file's owner must be
    an id of that namespace (else EOVERFLOW), and we cannot become one and come back (our
    host uid has no number there). So the recorded files are opened here, where we may read
    the tree, and a child that becomes the namespace's root creates everything from them."""
    import resource
    files = [e.path for e in _tmpfs.entries_of(cfg) if e.kind == "f"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if len(files) + 64 > soft:
        if len(files) + 64 > hard:
            raise Unsupported(f"{len(files)} files: more than this process may hold open "
                              f"({hard})", path=f"{cfg['tree']}/index", step="fill tmpfs")
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    fds = {}
    try:
        for path in files:
            try:
                fds[path] = os.open(os.path.join(cfg["dir"], path), os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise KernelError("cannot open recorded file", e.errno,
                                  path=f"{cfg['tree']}/files/{path}", step="fill tmpfs") from e
        _in_child_as_root(lambda: _tmpfs.fill(
            target, cfg, open_src=lambda p: os.fdopen(os.dup(fds[p]), "rb")))
    finally:
        for fd in fds.values():
            os.close(fd)


def _in_child_as_root(fn) -> None:
    """Run fn in a forked child that is the user namespace's root; its error comes back."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _root_ids()
            fn()
            os._exit(0)
        except BaseException as e:
            os.write(w, json.dumps(_error_msg(e, "fill tmpfs")).encode())
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        report = f.read()
    _, status = os.waitpid(pid, 0)
    if report:
        raise _rebuild(json.loads(report))
    if status != 0:
        raise CkptError(f"filling child ended with status {status:#x}", step="fill tmpfs")


def _join_cgroups(cfg: dict) -> None:
    """Last, so that the mount(8) and ip processes of the setup count against no limit of
    the container (a pids.max of 1 still lets it start)."""
    for path in cfg["procs"]:
        try:
            with open(path, "w") as f:
                f.write("0")
        except OSError as e:
            raise KernelError("cannot join cgroup", e.errno, path=path, step="cgroup") from e
    if cfg["cgroupns"]:
        _libc_call("unshare", ctypes.c_int(CLONE["cgroup"]))


def _setup_net(cfg: dict) -> dict:
    if cfg["net"] is None:
        if not cfg["lo"]:
            return {}
        cfg["net"] = {"links": [dataclasses.asdict(Link("lo"))], "routes": []}
    from . import net as _net
    raw = cfg["net"]
    links = [Link(**{**d, "addrs": tuple(d["addrs"])}) for d in raw["links"]]
    if not any(link.kind == "loopback" for link in links):
        links.insert(0, Link("lo"))
    return _net.apply(NetConfig(links=links, routes=raw["routes"]))
