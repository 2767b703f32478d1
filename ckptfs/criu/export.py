"""Write a CRIU 4.2-restorable image directory from any model.Source.

What CRIU's restore insists on (criu-image-format.md §5.1, §5.2) is enforced here rather than
trusted: `tc` only in leaders' cores, timers/rlimits/62 sigactions/creds present, inventory
root_ids that differ from every task's kernel-object ids while sharing the namespaces we do
not dump. Memory streams from the source into pages-N.img in bounded chunks.
"""
from __future__ import annotations

import errno
import os

from .. import pb, sockets
from ..errors import BadImage, CkptError, NotStopped
from ..flags import SIGACTION_SIGNALS, TASK_STATES, VMA_STATUS
from . import memory, skqueue
from .framing import write_image
from .memory import SHMEM

KOBJ_IDS = ("vm_id", "files_id", "fs_id", "sighand_id")
NS_KINDS = ("pid", "net", "ipc", "uts", "mnt", "user", "cgroup", "time")
# Namespaces a restore may create from what we write: only UTS (utsns-<id>.img) for now.
# A task in another kind of own namespace is exported as sharing CRIU's (restore would
# otherwise look for mountpoints-/netns-/... images we cannot produce).
EXPORTED_OWN_NS = ("uts",)
FILE_MAP = VMA_STATUS["VMA_FILE_PRIVATE"] | VMA_STATUS["VMA_FILE_SHARED"]
NOT_FILE_MAP = VMA_STATUS["VMA_ANON_SHARED"] | VMA_STATUS["VMA_AREA_SYSVIPC"]
REMAP_GHOST = 1 << 31       # remap_id bit: the id names a ghost file, not a file entry

# Fields newer than crit/CRIU 3.17 that CRIU 4.2 reads as "nothing special" when absent. Left
# out when they hold that neutral value, so every image crit 3.17 reads round-trips byte for
# byte; a non-neutral value is written (4.2 needs it) and only then crit 3.17 would drop it.
# (path to the sub-message from core_entry, field, is-neutral)
NEUTRAL_4X = [
    ("thread_core.creds", "no_new_privs", lambda v: v == 0),
    ("thread_core.creds", "cap_amb", lambda v: not any(v)),
    ("thread_info.fpregs.xsave", "cet", lambda v: v.cet == 0 and v.ssp == 0),
    ("tc", "stop_signo", lambda v: v == 0),
    ("tc", "membarrier_registration_mask", lambda v: v == 0),
]


def export(source, out_dir) -> None:
    """Write every image of `source` (frozen) into `out_dir` (created if needed). A directory that
    already holds images is refused: restore would also read stale ones (a leftover
    remap-fpath.img or cgroup.img changes what it does)."""
    if not getattr(source, "frozen", True):
        raise NotStopped("a running source would give images of no single moment: freeze it "
                         "first", path=str(out_dir), step="export")
    os.makedirs(out_dir, exist_ok=True)
    stale = sorted(n for n in os.listdir(out_dir) if n.endswith(".img"))
    if stale:
        raise CkptError(f"already holds CRIU images ({', '.join(stale[:3])} ...)",
                        path=str(out_dir), step="export", err=errno.EEXIST)
    _Export(source, str(out_dir)).run()


class _Export:
    def __init__(self, source, out: str):
        self.src, self.out = source, out
        self.pstree = list(source.pstree())
        if not self.pstree:
            raise BadImage("the source has no processes", path=self.path("pstree.img"),
                           step="export")
        self.root = self.pstree[0].pid
        # A zombie keeps only its core (task_state DEAD, exit_code): it has no memory, files
        # or kernel objects, and CRIU writes nothing else for it.
        self.zombies = {e.pid for e in self.pstree if _is_zombie(source.core(e.pid))}
        if self.root in self.zombies:
            raise BadImage(f"the root task {self.root} is a zombie", path=self.path("pstree.img"),
                           step="export")
        live = [e.pid for e in self.pstree if e.pid not in self.zombies]
        self.ids = {pid: source.ids(pid) for pid in live}      # every live task, tree order
        self.mms = {pid: self.mm(pid) for pid in live}
        self.fss = {pid: source.fs(pid) for pid in live}
        self.iso = source.isolation()
        self._name_own_uts()

    def _name_own_uts(self) -> None:
        """A source that knows the root task has its own UTS namespace (and its hostname)
        but gives no namespace ids (a tree) gets one, shared by every task without one, so
        restore creates the namespace from utsns-<id>.img."""
        if "uts" not in self.iso.own_namespaces or self.iso.hostname is None or \
                self.ids[self.root].HasField("uts_ns_id"):
            return
        used = [getattr(i, f"{k}_ns_id") for i in self.ids.values() for k in NS_KINDS]
        fresh = max(used, default=0) + 1
        for pid, ids in list(self.ids.items()):
            if not ids.HasField("uts_ns_id"):
                self.ids[pid] = copy = pb.task_kobj_ids_entry()
                copy.CopyFrom(ids)
                copy.uts_ns_id = fresh

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def img(self, name: str, kind: str, messages, extras=None) -> None:
        write_image(self.path(name), kind, messages, extras)

    def run(self) -> None:
        cores = self.cores()
        self.img("inventory.img", "INVENTORY", [self.inventory(cores)])
        self.img("pstree.img", "PSTREE", root_pstree(self.pstree))
        for tid, core in cores.items():
            self.img(f"core-{tid}.img", "CORE", [core])
        for pid in self.ids:
            self.img(f"ids-{pid}.img", "IDS", [self.ids[pid]])
            self.img(f"mm-{pid}.img", "MM", [self.mms[pid]])
            self.img(f"fs-{pid}.img", "FS", [self.fss[pid]])
        files = self.files(self.fdinfos())
        self.img("files.img", "FILES", [files[i] for i in sorted(files)])
        memory.write_all(self.src, self.out, self.mms, self.img)
        self.pipes(files)
        self.socket_queues(files)
        self.ghosts(files)
        self.memfds(files)
        self.utsns()
        self.img("seccomp.img", "SECCOMP", [pb.seccomp_entry()])

    # -- tasks ----------------------------------------------------------------------------
    def cores(self) -> dict:
        out = {}
        for e in self.pstree:
            if e.pid in self.zombies:
                out[e.pid] = self.src.core(e.pid)
                continue
            for tid in e.threads:
                out[tid] = self.core(e.pid, tid)
        return out

    def mm(self, pid: int):
        """mm_entry with VMAs ascending (CRIU's reader relies on it); every shared-memory VMA
        must name its object, or two maps of one object could not be told apart."""
        mm = pb.mm_entry()
        mm.CopyFrom(self.src.mm(pid))
        vmas = sorted(mm.vmas, key=lambda v: v.start)
        del mm.vmas[:]
        mm.vmas.extend(vmas)
        for v in vmas:
            if v.status & SHMEM and not v.shmid:
                raise BadImage(f"shared VMA {v.start:#x}-{v.end:#x} has no shmid (object id)",
                               path=self.path(f"mm-{pid}.img"), step="export")
        return mm

    def core(self, pid: int, tid: int):
        core = pb.core_entry()
        core.CopyFrom(self.src.core(tid))
        where = self.path(f"core-{tid}.img")
        if tid != pid:
            core.ClearField("tc")
        elif not core.HasField("tc"):
            raise BadImage(f"leader {pid} has no task_core (tc)", path=where, step="export")
        else:
            _complete_tc(core.tc, where)
        if not core.thread_core.HasField("creds"):
            raise BadImage(f"thread {tid} has no creds", path=where, step="export")
        return trim_core(core)

    def inventory(self, cores):
        inv = pb.inventory_entry(img_version=2, fdinfo_per_id=True, ns_per_id=True,
                                 lsmtype=pb.NO_LSM, network_lock_method=0)
        inv.root_ids.CopyFrom(self.root_ids())
        root_core = cores[self.root]
        cg_set = (root_core.thread_core.cg_set if root_core.thread_core.HasField("cg_set")
                  else root_core.tc.cg_set if root_core.tc.HasField("cg_set") else 0)
        if cg_set:
            # No cgroup.img: "the tasks' set is CRIU's own", so restore keeps its cgroups.
            inv.root_cg_set = cg_set
        return inv

    def root_ids(self):
        """CRIU's own ids at dump time: kernel objects distinct from every task's, namespaces
        equal to the root task's except the ones the root task owns (and we can restore)."""
        task = self.ids[self.root]
        root = pb.task_kobj_ids_entry()
        for field in KOBJ_IDS:
            used = {getattr(i, field) for i in self.ids.values()}
            setattr(root, field, min(set(range(1, len(used) + 2)) - used))
        ns_used = [getattr(i, f"{k}_ns_id") for i in self.ids.values() for k in NS_KINDS]
        fresh = max(ns_used, default=0) + 1
        for kind in NS_KINDS:
            field = f"{kind}_ns_id"
            if not task.HasField(field):
                continue
            if kind in self.iso.own_namespaces and kind in EXPORTED_OWN_NS:
                setattr(root, field, fresh)
                fresh += 1
            else:
                setattr(root, field, getattr(task, field))
        return root

    # -- files ----------------------------------------------------------------------------
    def fdinfos(self) -> dict:
        """fdinfo-<files_id>.img, one per fd table (tasks sharing a table share the image)."""
        tables = {}
        for pid, ids in self.ids.items():
            if ids.files_id not in tables:
                tables[ids.files_id] = list(self.src.fdinfo(pid))
                self.img(f"fdinfo-{ids.files_id}.img", "FDINFO", tables[ids.files_id])
        return tables

    def files(self, tables) -> dict:
        wanted = {fd.id for fds in tables.values() for fd in fds}
        for pid, mm in self.mms.items():
            wanted.add(mm.exe_file_id)
            wanted |= {v.shmid for v in mm.vmas if v.status & FILE_MAP and
                       not v.status & NOT_FILE_MAP}
            wanted |= {self.fss[pid].cwd_id, self.fss[pid].root_id}
        files, todo = {}, sorted(wanted)
        while todo:
            fid = todo.pop()
            if fid in files:
                continue
            files[fid] = _with_fown(self.src.file(fid))
            _check_file(files[fid], fid, self.path("files.img"))
            todo += _nested_file_ids(files[fid])
        return files

    def pipes(self, files) -> None:
        for kind, sub, name in (("PIPES_DATA", "pipe", "pipes-data.img"),
                                ("FIFO_DATA", "fifo", "fifo-data.img")):
            ids = sorted({getattr(f, sub).pipe_id for f in files.values() if f.HasField(sub)})
            entries, extras = [], []
            for pipe_id in ids:
                data = self.src.pipe_data(pipe_id)
                if data:
                    entries.append(pb.pipe_data_entry(pipe_id=pipe_id, bytes=len(data)))
                    extras.append(data)
            if entries or sub == "pipe":
                self.img(name, kind, entries, extras)

    def socket_queues(self, files) -> None:
        """sk-queues.img: what waits on each socket, keyed by the socket's file id (written
        only when something waits, as CRIU does); a TCP connection's queues go to its
        tcp-stream image instead."""
        packets = []
        for fid in sorted(files):
            f = files[fid]
            if f.HasField("isk") and sockets.is_tcp_connected(f.isk):
                self.tcp_stream(fid, f.isk)
            elif f.HasField("usk") or f.HasField("isk"):
                packets += [(fid, msg) for msg in self.src.socket_queue(fid)]
        if packets:
            skqueue.write(self.path(skqueue.NAME), packets)

    def tcp_stream(self, fid: int, isk) -> None:
        """tcp-stream-<ino>.img of a connection: its repair state and both queues."""
        stream = self.src.tcp_stream(fid)
        if stream is None:
            return      # no repair state: restore refuses the connection, as ours does
        entry, outq = stream
        inq = b"".join(self.src.socket_queue(fid))
        skqueue.write_tcp(self.path(skqueue.tcp_name(isk.ino)), entry, inq, outq)

    def memfds(self, files) -> None:
        """memfd.img: one memfd_inode_entry per memfd a descriptor holds (CRIU's layout); its
        contents are the shmem object `shmid` = the inode: pagemap-shmem-<ino>.img and a pages
        image of their own, the last page zero-padded (size says where the file ends)."""
        from .. import fdkinds
        inodes: dict[int, object] = {}
        for fid in sorted(files):
            f = files[fid]
            if not f.HasField("memfd") or f.memfd.inode_id in inodes:
                continue
            state = fdkinds.memfd_state(self.src, fid, self.path("files.img"))
            data = state.contents()
            ino = f.memfd.inode_id
            inodes[ino] = pb.memfd_inode_entry(name=state.name, uid=0, gid=0, size=len(data),
                                               shmid=ino, seals=state.seals, inode_id=ino)
            self._shmem_contents(ino, data)
        if inodes:
            self.img("memfd.img", "MEMFD_INODE", [inodes[i] for i in sorted(inodes)])

    def _shmem_contents(self, shmid: int, data: bytes) -> None:
        from ..model import PAGE_SIZE
        from .framing import PE_PRESENT
        used = [int(n[6:-4]) for n in os.listdir(self.out)
                if n.startswith("pages-") and n.endswith(".img") and n[6:-4].isdigit()]
        pages_id = max(used, default=0) + 1
        n = -(-len(data) // PAGE_SIZE)
        entries = [pb.pagemap_head(pages_id=pages_id)]
        if n:
            entries.append(pb.pagemap_entry(vaddr=0, compat_nr_pages=n, flags=PE_PRESENT,
                                            nr_pages=n))
        with open(self.path(f"pages-{pages_id}.img"), "wb") as f:
            f.write(data + bytes(n * PAGE_SIZE - len(data)))
        self.img(f"pagemap-shmem-{shmid}.img", "PAGEMAP", entries)

    def ghosts(self, files) -> None:
        """Files unlinked while open: remap-fpath.img says "ghost", ghost-file-<id>.img holds
        the contents restore recreates them from. Only sources that can tell (the optional
        file_deleted/file_contents methods, LiveSource and ImageSource) have any. The
        descriptors and maps of one deleted inode (tree.ghost_of) share one ghost image, as
        CRIU's do: a remap entry per file id, one remap_id."""
        from ..tree import ghost_of
        deleted = getattr(self.src, "file_deleted", None)
        if deleted is None:
            return
        remaps, made = [], {}
        for fid in sorted(files):
            f = files[fid]
            if not f.HasField("reg") or not deleted(fid):
                continue
            ghost = ghost_of(self.src, fid)
            if ghost in made:
                remaps.append(pb.remap_file_path_entry(orig_id=fid, remap_id=made[ghost],
                                                       remap_type=pb.GHOST))
                continue
            ghost_id = len(made) + 1
            made[ghost] = ghost_id | REMAP_GHOST
            data = self.src.file_contents(fid)
            creds = self.root_creds()
            head = pb.ghost_file_entry(uid=creds.euid, gid=creds.egid,
                                       mode=f.reg.mode if f.reg.HasField("mode") else 0o100600,
                                       size=len(data))
            self.img(f"ghost-file-{ghost_id:x}.img", "GHOST_FILE", [head], [data])
            remaps.append(pb.remap_file_path_entry(orig_id=fid, remap_id=ghost_id | REMAP_GHOST,
                                                   remap_type=pb.GHOST))
        if remaps:
            self.img("remap-fpath.img", "REMAP_FPATH", remaps)

    def root_creds(self):
        """Owner given to recreated ghost files: the file's own owner is not in the model."""
        return self.src.core(self.root).thread_core.creds

    def utsns(self) -> None:
        task = self.ids[self.root]
        if self.iso.hostname is None or not task.HasField("uts_ns_id"):
            return
        uts = pb.utsns_entry(nodename=self.iso.hostname,
                             domainname=self.iso.domainname or "(none)")
        self.img(f"utsns-{task.uts_ns_id}.img", "UTSNS", [uts])


def _is_zombie(core) -> bool:
    return core.HasField("tc") and core.tc.task_state == TASK_STATES["dead"]


def root_pstree(pstree) -> list:
    """CRIU records the dump root with ppid 0 (its parent is not part of the dump; crit's
    `x ps` and restore look for the root that way)."""
    root = pb.pstree_entry()
    root.CopyFrom(pstree[0])
    root.ppid = 0
    return [root, *pstree[1:]]


def trim_core(core):
    """core_entry without the 4.x-only fields that hold their neutral value (NEUTRAL_4X)."""
    out = pb.core_entry()
    out.CopyFrom(core)
    for path, field, neutral in NEUTRAL_4X:
        msg = out
        for part in path.split("."):
            if not msg.HasField(part):
                break
            msg = getattr(msg, part)
        else:
            value = getattr(msg, field)
            present = msg.HasField(field) if not _repeated(msg, field) else len(value) > 0
            if present and neutral(value):
                msg.ClearField(field)
    return out


def _repeated(msg, field: str) -> bool:
    return msg.DESCRIPTOR.fields_by_name[field].is_repeated


def _complete_tc(tc, where) -> None:
    """Fill what restore needs but a source may leave at its neutral value; refuse the rest."""
    for t in (tc.timers.real, tc.timers.virt, tc.timers.prof):   # absent = not armed
        for field in ("isec", "iusec", "vsec", "vusec"):
            if not t.HasField(field):
                setattr(t, field, 0)
    if not tc.sigactions:
        for _ in SIGACTION_SIGNALS:
            tc.sigactions.add(sigaction=0, flags=0, restorer=0, mask=0)
    if len(tc.sigactions) != len(SIGACTION_SIGNALS):
        raise BadImage(f"{len(tc.sigactions)} sigactions, CRIU wants exactly "
                       f"{len(SIGACTION_SIGNALS)}", path=where, step="export")
    if not tc.HasField("rlimits") or not tc.rlimits.rlimits:
        raise BadImage("task_core has no rlimits", path=where, step="export")


def _check_file(f, fid: int, where) -> None:
    sub = _file_sub(f)
    if f.id != fid or sub is None or getattr(f, sub).id != fid:
        raise BadImage(f"file entry for id {fid} is inconsistent (id {f.id}, "
                       f"{sub or 'no'} sub-message)", path=where, step="export")


def _with_fown(f):
    """A copy of file entry `f` whose owner record is complete: unset fown fields are 0
    (no F_SETOWN owner, no F_SETSIG signal), which is what nearly every file has."""
    out = pb.file_entry()
    out.CopyFrom(f)
    sub = _file_sub(out)
    if sub and "fown" in getattr(out, sub).DESCRIPTOR.fields_by_name:
        fown = getattr(out, sub).fown
        for field in ("uid", "euid", "signum", "pid_type", "pid"):
            if not fown.HasField(field):
                setattr(fown, field, 0)
    return out


def _file_sub(f):
    """Name of the one sub-message set in a file_entry, None if none (or unknown to us)."""
    subs = [d.name for d, _ in f.ListFields() if d.message_type is not None]
    return subs[0] if len(subs) == 1 else None


def _nested_file_ids(f) -> list[int]:
    """Files a file entry refers to (the REG entry naming a fifo or tty)."""
    refs = []
    for sub in ("fifo", "tty"):
        if f.HasField(sub) and getattr(f, sub).HasField("regf_id"):
            refs.append(getattr(f, sub).regf_id)
    return refs
