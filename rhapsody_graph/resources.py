"""Resources: what a node asks for, what the machine has, and who holds what.

State and policy:

* :class:`Resources` is a node's request for *one rank*: ``cpus`` cores, ``gpus`` GPU
  ids and ``memory`` bytes, all on one host. ``ranks`` copies of it make a job.
* :class:`Host` lists the concrete core ids and GPU ids of one machine;
  an :class:`Inventory` is the hosts a backend can place work on. It is detected
  (:func:`detect_host`) or declared (``Host("n0", cpus=4, gpus=4)``), so GPU
  assignment can be checked on a machine without GPUs.
* The :class:`Ledger` owns the free lists. ``allocate`` returns a :class:`Placement`
  (host, core ids, GPU ids) or ``None`` when the request does not fit *now*;
  ``release`` gives it back. Cores are taken lowest id first (packing); GPUs are
  taken round-robin over every GPU of every host, so a stream of one-GPU nodes is
  spread over all of them. Multi-rank requests are all-or-nothing, ranks placed
  ``block`` (fill a host, then the next) or ``round_robin`` (one rank per host in turn).
* :meth:`Inventory.check` says, before anything runs, whether a request could ever
  fit, and if not, what the largest host has.
"""
from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import threading
from typing import (Any, Collection, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple)

from .errors import UnsatisfiableError, brief

__all__ = ["Resources", "Host", "Inventory", "Placement", "Ledger", "detect_host", "gpu_masks",
           "gpu_names", "current_placement", "placement_env"]

DISTRIBUTIONS = ("block", "round_robin")
#: How a backend places a node (the seed's vocabulary): ``default`` and ``anywhere`` let
#: the runtime choose (the ledger counts the cores), ``host_name``/``host_id`` pin the
#: node to the ledger's host, cores and GPUs.
PLACEMENTS = ("default", "anywhere", "host_name", "host_id")


class Resources:
    """A validated per-rank request: ``cpus`` cores, ``gpus`` GPUs, ``memory`` bytes.

    Where it may run: ``host`` (a host name) or ``host_id`` (a host's id), exactly
    these core ids (``cpu_ids``) or GPU ids (``gpu_ids``), and the ``placement``
    mode a backend lowers it with (see :data:`PLACEMENTS`). ``per_rank``: one
    request per rank where the ranks differ (groups with their own Dragon policies);
    the ledger then places rank ``r`` by ``per_rank[r]``.
    """

    __slots__ = ("cpus", "gpus", "memory", "ranks", "distribution", "host", "host_id",
                 "cpu_ids", "gpu_ids", "placement", "per_rank", "_key")

    def __init__(self, cpus: int = 1, gpus: int = 0, memory: int = 0, ranks: int = 1,
                 distribution: str = "block", host: Optional[str] = None,
                 host_id: Optional[int] = None, cpu_ids: Optional[Tuple[int, ...]] = None,
                 gpu_ids: Optional[Tuple[int, ...]] = None, placement: str = "default",
                 per_rank: "Optional[Tuple[Resources, ...]]" = None) -> None:
        self.cpus = cpus
        self.gpus = gpus
        self.memory = memory
        self.ranks = ranks
        self.distribution = distribution
        self.host = host
        self.host_id = host_id
        self.cpu_ids = cpu_ids
        self.gpu_ids = gpu_ids
        self.placement = placement
        self.per_rank = per_rank
        self._key = (cpus, gpus, memory, ranks, distribution, host, host_id, cpu_ids, gpu_ids,
                     placement, per_rank and tuple(r.key for r in per_rank))

    @property
    def key(self) -> tuple:
        """A hashable identity: equal requests share one key."""
        return self._key

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Resources) and other._key == self._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        parts = [f"cpus={self.cpus}", f"gpus={self.gpus}"]
        if self.memory:
            parts.append(f"memory={self.memory}")
        if self.ranks != 1:
            parts += [f"ranks={self.ranks}", f"distribution={self.distribution!r}"]
        for name in ("host", "host_id", "cpu_ids", "gpu_ids"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)!r}")
        if self.placement != "default":
            parts.append(f"placement={self.placement!r}")
        return "Resources(" + ", ".join(parts) + ")"

    def where(self) -> str:
        """The placement constraints in words, for error messages ('' if none)."""
        said = [f"{n}={getattr(self, n)!r}" for n in ("host", "host_id") if getattr(self, n) is not None]
        said += [f"{a}={list(getattr(self, n))}" for n, a in
                 (("cpu_ids", "cpu_affinity"), ("gpu_ids", "gpu_affinity")) if getattr(self, n) is not None]
        return ", ".join(said)


def gpu_masks(gpus: Sequence[int], names: Mapping[int, str] = {}) -> Dict[str, str]:
    """The variables that show a process only ``gpus`` (NVIDIA, AMD, Intel); empty: none.
    ``names``: the UUID of each id on this host (:func:`gpu_names`), if it has them.

    >>> gpu_masks([2, 3])["CUDA_VISIBLE_DEVICES"], gpu_masks([1], {1: "GPU-b"})["ZE_AFFINITY_MASK"]
    ('2,3', 'GPU-b')
    """
    ids = ",".join([names.get(g) or str(g) for g in gpus] if names else map(str, gpus))
    return {"CUDA_VISIBLE_DEVICES": ids, "ROCR_VISIBLE_DEVICES": ids, "ZE_AFFINITY_MASK": ids}


#: what a worker is started with to know its host's GPU UUIDs (its own
#: CUDA_VISIBLE_DEVICES is its placement's): the entries, comma-separated
GPU_NAMES = "RHAPSODY_GPU_NAMES"


def gpu_names(visible: Optional[str] = None) -> Dict[int, str]:
    """GPU id -> UUID when ``visible`` (default: this process's ``CUDA_VISIBLE_DEVICES``)
    names GPUs by UUID, as Slurm and MIG do (``GPU-8f1c…,MIG-1a2b…``): ids are the
    entries' positions; ``{}`` when it lists numbers or is unset. As CUDA reads it, the
    list ends at the first entry that is neither (``-1``, ``NoDevFiles``).

    >>> gpu_names("GPU-a,MIG-b,-1,GPU-c"), gpu_names("0,1"), gpu_names("-1")
    ({0: 'GPU-a', 1: 'MIG-b'}, {}, {})
    """
    entries = _visible(os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None
                       else visible)
    return {} if all(e.isdigit() for e in entries) else dict(enumerate(entries))


def names_env(names: Mapping[int, str]) -> Dict[str, str]:
    """What a worker started on this host needs to know its GPUs' UUIDs (:data:`GPU_NAMES`;
    empty when it has none, so that an outer run's never reaches a nested one's)."""
    return {GPU_NAMES: ",".join(names[i] for i in sorted(names))}


def _visible(value: str) -> List[str]:
    """The entries of a ``CUDA_VISIBLE_DEVICES`` value up to the first invalid one."""
    entries = []
    for e in value.split(","):
        e = e.strip()
        if not (e.isdigit() or e.startswith(("GPU-", "MIG-"))):
            break
        entries.append(e)
    return entries


class Placement:
    """Concrete resources granted to one rank: a host, core ids and GPU ids."""

    __slots__ = ("host", "cpus", "gpus", "memory", "rank", "world_size", "local_rank", "epoch")

    def __init__(self, host: str, cpus: Tuple[int, ...], gpus: Tuple[int, ...] = (),
                 memory: int = 0, rank: int = 0, world_size: int = 1,
                 local_rank: Optional[int] = None, epoch: int = 0) -> None:
        self.host = host
        self.epoch = epoch  # which coming of its host a ledger took it from (0: none)
        self.cpus = cpus
        self.gpus = gpus
        self.memory = memory
        self.rank = rank
        self.world_size = world_size
        self.local_rank = rank if local_rank is None else local_rank  # rank among its host's

    def env(self, names: Mapping[int, str] = {}) -> Dict[str, str]:
        """The environment a process placed here sees (GPU masks, rank, placement);
        ``names``: its host's GPU UUIDs by id, where a process of that host applies it."""
        gpu_ids = ",".join(map(str, self.gpus))
        return {
            **gpu_masks(self.gpus, names),
            "RHAPSODY_HOST": self.host,
            "RHAPSODY_CPUS": ",".join(map(str, self.cpus)),
            "RHAPSODY_GPUS": gpu_ids,
            "RANK": str(self.rank),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(self.local_rank),
            "OMPI_COMM_WORLD_RANK": str(self.rank),
            "OMPI_COMM_WORLD_SIZE": str(self.world_size),
            "PMI_RANK": str(self.rank),
            "PMI_SIZE": str(self.world_size),
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Placement) and (
            (self.host, self.cpus, self.gpus, self.memory, self.rank, self.world_size)
            == (other.host, other.cpus, other.gpus, other.memory, other.rank, other.world_size))

    def __hash__(self) -> int:
        return hash((self.host, self.cpus, self.gpus, self.rank))

    def __repr__(self) -> str:
        rank = f", rank={self.rank}/{self.world_size}" if self.world_size > 1 else ""
        return f"Placement(host={self.host!r}, cpus={list(self.cpus)}, gpus={list(self.gpus)}{rank})"


#: the placement variables of the call this thread runs, where several calls run at
#: once in one process (a Dask worker's threads): os.environ holds only one of them
_this_thread = threading.local()


@contextlib.contextmanager
def placed(env: Dict[str, str]) -> Iterator[None]:
    """Inside the block, this thread's :func:`current_placement` is the one of the
    placement variables ``env`` (:meth:`Placement.env`), whatever another thread set."""
    before = getattr(_this_thread, "env", None)
    _this_thread.env = env
    try:
        yield
    finally:
        _this_thread.env = before


def _placed_env() -> Optional[Mapping[str, str]]:
    """The environment the running node's placement was set in (its thread's, else this
    process's); ``None`` outside of a node."""
    env = getattr(_this_thread, "env", None) or os.environ
    return env if "RHAPSODY_HOST" in env else None


def placement_env() -> Dict[str, str]:
    """Inside a running node: the variables of its placement (GPU masks, rank, ...) as
    set for it, to give a program it starts last (empty outside of one)."""
    env = _placed_env()
    return {} if env is None else {k: env[k] for k in _PLACEMENT_VARIABLES if k in env}


def current_placement() -> Optional[Placement]:
    """Inside a running node: where it was placed (``None`` outside of one).

    The cores are the ledger's ids; ``os.sched_getaffinity(0)`` shows the real ones.
    """
    env = _placed_env()
    if env is None:
        return None

    def ids(name: str) -> Tuple[int, ...]:
        return tuple(int(x) for x in env.get(name, "").split(",") if x)
    return Placement(env["RHAPSODY_HOST"], ids("RHAPSODY_CPUS"), ids("RHAPSODY_GPUS"), 0,
                     int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                     int(env.get("LOCAL_RANK", env.get("RANK", 0))))


_PLACEMENT_VARIABLES = tuple(Placement("", (), (), 0).env())


class Host:
    """One machine: its name, core ids, GPU ids and memory in bytes.

    >>> Host("n0", cpus=4, gpus=2).gpus
    (0, 1)
    """

    __slots__ = ("name", "cpus", "gpus", "memory", "id")

    def __init__(self, name: str, cpus: "int | Sequence[int]", gpus: "int | Sequence[int]" = 0,
                 memory: Optional[int] = None, id: Optional[int] = None) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"a host's name must be a non-empty str, got {brief(name)}")
        self.name = name
        self.id = id  # the runtime's host id (Dragon's h_uid); its inventory index if None
        self.cpus = _ids(name, "cpus", cpus)
        self.gpus = _ids(name, "gpus", gpus)
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int)
                                   or memory < 0):
            raise ValueError(f"host {name!r}: memory must be a number of bytes >= 0, "
                             f"got {brief(memory)}")
        self.memory = memory if memory is not None else _total_memory()
        if not self.cpus:
            raise ValueError(f"host {name!r} needs at least one core, got cpus={cpus!r}")

    def __repr__(self) -> str:
        return (f"Host({self.name!r}, cpus={len(self.cpus)} {list(self.cpus)[:8]}"
                f"{'...' if len(self.cpus) > 8 else ''}, gpus={list(self.gpus)})")


def _ids(host: str, what: str, value: "int | Sequence[int]") -> Tuple[int, ...]:
    """A count (ids 0..n-1) or explicit ids, checked: non-negative and distinct."""
    def is_id(i: Any) -> bool:
        return isinstance(i, int) and not isinstance(i, bool) and i >= 0
    if is_id(value):
        ids = tuple(range(value))
    elif (not isinstance(value, (list, tuple, range, set, frozenset))
          or not all(is_id(i) for i in value)):
        raise ValueError(f"host {host!r}: {what} must be a count >= 0 or a list of ids >= 0, "
                         f"got {brief(value)}")
    else:
        ids = tuple(sorted(value) if isinstance(value, (set, frozenset)) else value)
    if len(set(ids)) != len(ids):
        raise ValueError(f"host {host!r}: {what} ids must be distinct, got {list(ids)}")
    return ids


def _total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def detect_gpus() -> Tuple[int, ...]:
    """GPU ids visible here: ``CUDA_VISIBLE_DEVICES`` if set (UUIDs are numbered by
    their position, and placed processes see the UUIDs), else ``nvidia-smi``."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        names = gpu_names(visible)
        return tuple(names) if names else tuple(int(g) for g in _visible(visible))
    import shutil
    import subprocess
    smi = shutil.which("nvidia-smi")
    if not smi:
        return ()
    try:
        out = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    return tuple(int(line) for line in out.split() if line.strip().isdigit())


def detect_host(cpus: "int | Sequence[int] | None" = None,
                gpus: "int | Sequence[int] | None" = None,
                memory: Optional[int] = None) -> Host:
    """This machine as a :class:`Host`, with counts optionally declared.

    Declared ``cpus=N`` takes the first N cores this process may run on; more than
    that adds virtual ids that are pinned onto the real cores in turn.
    """
    real = sorted(os.sched_getaffinity(0))
    if cpus is None:
        core_ids: Sequence[int] = real
    elif isinstance(cpus, int) and not isinstance(cpus, bool):
        extra = range(max(real) + 1, max(real) + 1 + max(0, cpus - len(real)))
        core_ids = (real + list(extra))[:cpus] if cpus > 0 else cpus  # (Host refuses it)
    else:
        core_ids = cpus
    gpu_ids = detect_gpus() if gpus is None else gpus
    return Host(os.uname().nodename, core_ids, gpu_ids, memory)  # socket.gethostname(), without socket


class Inventory:
    """The hosts a backend can place work on; ``total_cpus`` and ``total_gpus`` count
    their cores and GPUs as hosts join (:meth:`add`) and leave (:meth:`remove`)."""

    def __init__(self, hosts: Iterable[Host]) -> None:
        if isinstance(hosts, Host) or not isinstance(hosts, Iterable):
            raise TypeError(f"hosts must be a list of Host(name, cpus=..., gpus=...) "
                            f"objects, got {brief(hosts)}")
        self.hosts: List[Host] = list(hosts)
        if not self.hosts:
            raise ValueError("an inventory needs at least one host")
        for h in self.hosts:
            if not isinstance(h, Host):
                raise TypeError(f"hosts must be Host(name, cpus=..., gpus=...) objects, got "
                                f"{brief(h)}")
        names = [h.name for h in self.hosts]
        if len(set(names)) != len(names):
            raise ValueError(f"host names must be unique, got {names}")
        given = [h.id for h in self.hosts if h.id is not None]
        if len(set(given)) != len(given):
            raise ValueError(f"host ids must be unique, got {given}")
        free = (i for i in itertools.count() if i not in set(given))
        for h in self.hosts:  # the others: their index, past the ids given
            if h.id is None:
                h.id = next(free)
        self.total_cpus = sum(len(h.cpus) for h in self.hosts)
        self.total_gpus = sum(len(h.gpus) for h in self.hosts)

    def add(self, host: Host) -> None:
        """A host that joined (a Dask worker that started later): placed on from now on.

        Raises:
            ValueError: a host of that name is already here.
        """
        if any(h.name == host.name for h in self.hosts):
            raise ValueError(f"host names must be unique: {host.name!r} is already here")
        if host.id is not None and any(h.id == host.id for h in self.hosts):
            raise ValueError(f"host ids must be unique: {host.id!r} ({host.name!r}) is "
                             "already here")
        if host.id is None:
            host.id = max((h.id for h in self.hosts if isinstance(h.id, int)), default=-1) + 1
        self.hosts.append(host)
        self.total_cpus += len(host.cpus)
        self.total_gpus += len(host.gpus)

    def remove(self, name: str) -> Optional[Host]:
        """A host that left: nothing more is placed on it; the host, if it was here."""
        for i, h in enumerate(self.hosts):
            if h.name == name:
                self.total_cpus -= len(h.cpus)
                self.total_gpus -= len(h.gpus)
                return self.hosts.pop(i)
        return None

    def eligible(self, req: Resources) -> List[Host]:
        """The hosts ``req`` may run on: all, or the one it names, that hold its ids."""
        return [h for h in self.hosts
                if _named(h, req)
                and (req.cpu_ids is None or set(req.cpu_ids) <= set(h.cpus))
                and (req.gpu_ids is None or set(req.gpu_ids) <= set(h.gpus))]

    def fits_elsewhere(self, req: Resources, avoid: Collection[str]) -> bool:
        """Whether all ranks of ``req`` could run on hosts not named in ``avoid``."""
        others = [h for h in self.hosts if h.name not in avoid]
        return bool(others) and Inventory(others).ranks_that_fit(req) >= req.ranks

    def largest(self, hosts: Optional[List[Host]] = None) -> Host:
        """The host with the most GPUs, then cores, then memory (of ``hosts``: default all)."""
        return max(hosts or self.hosts, key=lambda h: (len(h.gpus), len(h.cpus), h.memory))

    def ranks_that_fit(self, req: Resources) -> int:
        """How many ranks of ``req`` fit on the whole inventory when it is empty."""
        if req.per_rank is not None:  # ranks of their own: all of them, or none
            return req.ranks if Ledger(self).allocate_ranks(req) is not None else 0
        total = 0
        for h in self.eligible(req):
            if req.cpu_ids is not None or req.gpu_ids is not None:
                total += 1  # the same ids: one rank per host at a time
                continue
            fits = [len(h.cpus) // req.cpus if req.cpus else None,
                    len(h.gpus) // req.gpus if req.gpus else None,
                    h.memory // req.memory if req.memory else None]
            known = [f for f in fits if f is not None]
            total += min(known) if known else req.ranks
        return total

    def check(self, req: Resources, who: str) -> None:
        """Raise :class:`UnsatisfiableError` if ``req`` can never be placed.

        Raises:
            UnsatisfiableError: naming ``who`` (``"node 'train'"``), the request and the
                largest host.
        """
        if not self.hosts:
            raise UnsatisfiableError(f"{who} cannot be placed: the inventory has no host now "
                                     "(every worker left); start workers, then submit again")
        if req.per_rank is not None:
            self._check_per_rank(req.per_rank, who)
            return
        if self.ranks_that_fit(req) >= req.ranks:
            return
        where = req.where()
        eligible = self.eligible(req)
        if where and not eligible:
            hosts = ", ".join(f"{h.name!r} (id {h.id}, cpus {list(h.cpus)}, gpus {list(h.gpus)})"
                              for h in self.hosts[:8])
            raise UnsatisfiableError(f"{who} asks for {where}, but no host matches: "
                                     f"the inventory has {hosts}")
        if req.cpu_ids is not None or req.gpu_ids is not None:  # one rank per host
            raise UnsatisfiableError(
                f"{who} asks for {req.ranks} ranks on {where}, but ranks pinned to the same "
                f"ids take one host each, and only {len(eligible)} host(s) have them. Ask "
                "for fewer ranks, or drop the affinity so that the ledger picks the ids")
        big = self.largest(eligible)
        per = "per rank " if req.ranks > 1 else ""
        fit = self.ranks_that_fit(req)
        if req.ranks > 1 and fit:  # each rank fits a host; all of them, not at once
            raise UnsatisfiableError(
                f"{who} asks for {req.ranks} ranks of {req.cpus} cpus, {req.gpus} gpus"
                + (f", {_size(req.memory)} of memory" if req.memory else "")
                + (f" on {where}" if where else "")
                + f", but only {fit} such ranks fit on the whole inventory at once "
                f"({len(eligible)} host(s)). Ask for fewer ranks or less per rank, or "
                "declare a larger inventory.")
        raise UnsatisfiableError(
            f"{who} asks for {per}{req.cpus} cpus, {req.gpus} gpus"
            + (f", {_size(req.memory)} of memory" if req.memory else "")
            + (f" x {req.ranks} ranks" if req.ranks > 1 else "")
            + (f" on {where}" if where else "")
            + f", but no host can hold it: the largest {'such ' if where else ''}host {big.name!r} has "
            f"{len(big.cpus)} cpus, {len(big.gpus)} gpus and {_size(big.memory)} of memory "
            f"({len(self.hosts)} host(s) in all). Ask for less, or declare a larger "
            f"inventory: cpus=/gpus=/memory= of the backend, or its hosts=[Host(...)] "
            "(LocalBackend, DragonBackend).")

    def _check_per_rank(self, ranks: "Sequence[Resources]", who: str) -> None:
        """Ranks with requests of their own: placed one by one on an empty ledger; the
        first that finds no room is named with what it asks and what the hosts hold."""
        ledger = Ledger(self)
        for r, req in enumerate(ranks):
            if ledger.allocate(req, r, len(ranks)) is None:
                hosts = ", ".join(f"{h.name!r} (cpus {list(h.cpus)}, gpus {list(h.gpus)})"
                                  for h in self.hosts[:8])
                where = req.where()
                raise UnsatisfiableError(
                    f"{who}: rank {r} of {len(ranks)} asks for {req.cpus} cpus, {req.gpus} gpus"
                    + (f" on {where}" if where else "")
                    + f", which does not fit beside the ranks before it; the inventory has "
                    f"{hosts}. Pin ids the hosts have, or ask for fewer ranks.")

    def __repr__(self) -> str:
        return "Inventory(" + ", ".join(map(repr, self.hosts)) + ")"


def _size(n: int) -> str:
    """Bytes as a message shows them: ``25276194816 bytes (23.5 GiB)``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n} bytes ({n / scale:.1f} {unit})"
    return f"{n} bytes"


def _named(h: Host, req: Resources) -> bool:
    """True unless ``req`` names another host (by ``host`` or ``host_id``)."""
    return (req.host is None or h.name == req.host) and (req.host_id is None or h.id == req.host_id)


_EPOCHS = itertools.count(1)


class _HostState:
    """One host's free cores (sorted), GPU ids and memory; ``slot``: its position in
    the ledger's host order, ``bit`` = ``1 << slot`` in the free-capacity masks."""

    __slots__ = ("host", "free_cpus", "free_gpus", "free_memory", "slot", "bit", "epoch")

    def __init__(self, host: Host, slot: int) -> None:
        self.host = host
        self.epoch = next(_EPOCHS)  # a host that left and came back is another coming
        self.free_cpus = sorted(host.cpus)
        self.free_gpus = set(host.gpus)
        self.free_memory = host.memory
        self.slot = slot
        self.bit = 1 << slot

    def fits(self, req: Resources) -> bool:
        if req.cpu_ids is not None and not set(req.cpu_ids) <= set(self.free_cpus):
            return False
        if req.gpu_ids is not None and not set(req.gpu_ids) <= self.free_gpus:
            return False
        return (len(self.free_cpus) >= req.cpus and len(self.free_gpus) >= req.gpus
                and self.free_memory >= req.memory)

    def room(self, req: Resources, most: int) -> int:
        """How many ranks of ``req`` fit here now (at most ``most``)."""
        if req.cpu_ids is not None or req.gpu_ids is not None:
            return 1 if self.fits(req) else 0  # the same ids: one rank at a time
        fits = most
        if req.cpus:
            fits = min(fits, len(self.free_cpus) // req.cpus)
        if req.gpus:
            fits = min(fits, len(self.free_gpus) // req.gpus)
        if req.memory:
            fits = min(fits, self.free_memory // req.memory)
        return fits


def _lowest(mask: int) -> int:
    """The lowest set bit's position (``mask`` > 0)."""
    return (mask & -mask).bit_length() - 1


class Ledger:
    """Free cores, GPU ids and memory per host; allocations are all-or-nothing.

    >>> ledger = Ledger(Inventory([Host("n0", cpus=2, gpus=2)]))
    >>> p = ledger.allocate(Resources(cpus=1, gpus=1))
    >>> (p.host, p.cpus, p.gpus)
    ('n0', (0,), (0,))
    >>> ledger.allocate(Resources(cpus=1, gpus=1)).gpus
    (1,)
    >>> ledger.allocate(Resources(cpus=1, gpus=1)) is None
    True
    >>> ledger.release(p)

    Free-capacity index: hosts have a slot (their position in the inventory) and
    ``_cpus_ge[k]`` is a bit mask (a Python int) of the slots with at least ``k``
    free cores, ``_gpus_ge[k]`` likewise for GPUs. ``_cpus_ge[c] & _gpus_ge[g]`` are
    the hosts a request of ``c`` cores and ``g`` GPUs fits on now: first fit is its
    lowest bit, round-robin the lowest at or after the GPU cursor, and a request that
    fits nowhere is refused without looking at a host. Each allocate or release moves
    one host between a few masks: a placement decision costs about the same at 1 host
    and at 1,000 (``benchmarks/scale.py``).
    """

    def __init__(self, inventory: Inventory) -> None:
        self.inventory = inventory
        self._hosts: Dict[str, _HostState] = {}
        self._index(inventory.hosts)

    def _index(self, hosts: Sequence[Host]) -> None:
        """(Re)build the host order and the free-capacity masks; the GPU cursor
        goes back to the first GPU of the first host."""
        old = self._hosts
        self._order: List[_HostState] = []
        self._hosts = {}
        self._by_id: Dict[Any, _HostState] = {}
        self._cpus_ge: List[int] = [0]
        self._gpus_ge: List[int] = [0]
        for h in hosts:
            st = old.get(h.name)
            if st is None:
                st = _HostState(h, 0)
            self._enter(st)
        # round-robin over every GPU of every host: the next (slot, index in host.gpus)
        self._cursor = (0, 0)

    def _enter(self, st: _HostState) -> None:
        """Give ``st`` the next slot and put it in the masks of its free counts."""
        st.slot = len(self._order)
        st.bit = 1 << st.slot
        self._order.append(st)
        self._hosts[st.host.name] = st
        self._by_id.setdefault(st.host.id, st)
        self._cpus_ge[0] |= st.bit  # every host has at least 0 free of each
        self._gpus_ge[0] |= st.bit
        _flip(self._cpus_ge, st.bit, 0, len(st.free_cpus))
        _flip(self._gpus_ge, st.bit, 0, len(st.free_gpus))

    def add_host(self, host: Host) -> None:
        """Add a host that joined to the inventory, all of it free."""
        self.inventory.add(host)
        self._enter(_HostState(host, 0))
        self._cursor = (0, 0)

    def remove_host(self, name: str) -> None:
        """Place nothing more on host ``name`` (it left); releasing what was on it is a no-op."""
        self.inventory.remove(name)
        if name in self._hosts:
            self._index([st.host for st in self._order if st.host.name != name])

    def short_of_cpus(self, req: Resources, avoid: Collection[str] = ()) -> bool:
        """Whether a host ``req`` may use has its GPUs free now: if one rank of it does
        not fit, cores (or memory) are what it lacks, not GPUs."""
        gpus = self._gpus_ge
        mask = gpus[req.gpus] if req.gpus < len(gpus) else 0
        if mask and (avoid or req.host is not None or req.host_id is not None):
            mask &= self._allowed(req, avoid)
        return bool(mask)

    def fits_after_release(self, req: Resources, placement: Placement,
                           avoid: Collection[str] = ()) -> bool:
        """Whether one rank of ``req`` would fit on ``placement``'s host once that
        placement is released (by counts; one that names cores: if it holds one of
        them)."""
        st = self._hosts.get(placement.host)
        if st is None or placement.host in avoid or (
                placement.epoch and placement.epoch != st.epoch) or (
                req.host is not None and req.host != placement.host) or (
                req.host_id is not None and req.host_id != st.host.id):
            return False
        if req.cpu_ids:
            return not set(req.cpu_ids).isdisjoint(placement.cpus)
        if req.gpu_ids and not set(req.gpu_ids) <= set(st.free_gpus) | set(placement.gpus):
            return False
        return (len(st.free_cpus) + len(placement.cpus) >= req.cpus
                and len(st.free_gpus) + len(placement.gpus) >= req.gpus
                and st.free_memory + placement.memory >= req.memory)

    def holds(self, placement: Placement) -> bool:
        """Whether ``placement``'s host is in the ledger, in the coming it was taken from
        (it has not left, nor left and come back)."""
        st = self._hosts.get(placement.host)
        return st is not None and (not placement.epoch or placement.epoch == st.epoch)

    # -- queries of the index --------------------------------------------------------

    def _fitting(self, req: Resources, avoid: Collection[str]) -> int:
        """The mask of hosts with enough free cores and GPUs for one rank of ``req`` that
        it may use (the one it names, if any; none in ``avoid``)."""
        cpus, gpus = self._cpus_ge, self._gpus_ge
        if req.cpus >= len(cpus) or req.gpus >= len(gpus):
            return 0
        mask = cpus[req.cpus] & gpus[req.gpus]
        if mask and (avoid or req.host is not None or req.host_id is not None):
            mask &= self._allowed(req, avoid)
        return mask

    def _allowed(self, req: Resources, avoid: Collection[str]) -> int:
        """The mask of hosts ``req`` may use: the one it names (if any), none in ``avoid``."""
        if req.host is not None or req.host_id is not None:
            st = (self._hosts.get(req.host) if req.host is not None
                  else self._by_id.get(req.host_id))
            allowed = st.bit if st is not None and _named(st.host, req) else 0
        else:
            allowed = -1  # every slot
        for name in avoid:
            st = self._hosts.get(name)
            if st is not None:
                allowed &= ~st.bit
        return allowed

    def _first(self, mask: int, start: int, req: Resources) -> Optional[_HostState]:
        """The first host at slot ``start`` or later in ``mask`` that ``req`` fits on."""
        order = self._order
        mask >>= start
        while mask:
            low = _lowest(mask)
            st = order[start + low]
            if st.fits(req):
                return st
            start += low + 1
            mask >>= low + 1
        return None

    # -- allocation --------------------------------------------------------------------

    def allocate(self, req: Resources, rank: int = 0, world_size: int = 1,
                 avoid: Collection[str] = ()) -> Optional[Placement]:
        """Take one rank's worth of ``req`` on one host (none named in ``avoid``), or
        return ``None``."""
        mask = self._fitting(req, avoid)
        if not mask:
            return None
        if req.host is not None or req.host_id is not None or req.cpu_ids or req.gpu_ids:
            st = self._first(mask, 0, req)
            return None if st is None else self._take(st, req, self._gpus_for(st, req), rank,
                                                      world_size)
        if req.gpus:
            return self._allocate_gpus(req, mask, rank, world_size)
        st = self._first(mask, 0, req) if req.memory else self._order[_lowest(mask)]
        return None if st is None else self._take(st, req, (), rank, world_size)

    @staticmethod
    def _gpus_for(st: _HostState, req: Resources) -> Tuple[int, ...]:
        if req.gpu_ids is not None:
            return req.gpu_ids
        return tuple(sorted(st.free_gpus)[:req.gpus]) if req.gpus else ()

    def _allocate_gpus(self, req: Resources, mask: int, rank: int,
                       world_size: int) -> Optional[Placement]:
        """Round-robin over every GPU of every host: the first GPU from the cursor on
        (in host order, each host's GPUs in its order) on a host ``req`` fits on; the
        request's other GPUs are that host's next free ones."""
        slot, index = self._cursor
        st: Optional[_HostState] = None
        first = -1
        if mask >> slot & 1:  # the cursor's host, from the cursor's GPU on
            here = self._order[slot]
            first = _next_free(here, index)
            if first >= 0 and here.fits(req):
                st = here
        if st is None:
            st = self._first(mask, slot + 1, req) or self._first(mask, 0, req)
            if st is None:
                return None
            first = _next_free(st, 0)
        ids = st.host.gpus
        if req.gpus == 1:
            local = [first]
        else:  # its next free ones in the host's order, around to its first
            n, free = len(ids), st.free_gpus
            local = [(first + k) % n for k in range(n) if ids[(first + k) % n] in free][:req.gpus]
        self._cursor = (st.slot, local[-1] + 1)
        return self._take(st, req, tuple(ids[i] for i in local), rank, world_size)

    def _take(self, st: _HostState, req: Resources, gpus: Tuple[int, ...], rank: int,
              world_size: int) -> Placement:
        free = st.free_cpus
        before = len(free)
        if req.cpu_ids is not None:
            cpus = tuple(req.cpu_ids)
            st.free_cpus = free = [c for c in free if c not in cpus]
        else:
            cpus = tuple(free[:req.cpus])
            del free[:req.cpus]
        _flip(self._cpus_ge, st.bit, before, len(free))
        if gpus:
            before = len(st.free_gpus)
            st.free_gpus.difference_update(gpus)
            _flip(self._gpus_ge, st.bit, before, len(st.free_gpus))
        st.free_memory -= req.memory
        return Placement(st.host.name, cpus, gpus, req.memory, rank, world_size, None, st.epoch)

    def allocate_ranks(self, req: Resources,
                       avoid: Collection[str] = ()) -> Optional[List[Placement]]:
        """Place all ``req.ranks`` ranks (block or round-robin over hosts, or each by its
        own request in ``req.per_rank``), or none; on no host named in ``avoid``
        (ranks of their own requests ignore it)."""
        n = req.ranks
        if req.per_rank is not None:
            return self._allocate_each(req.per_rank)
        if n == 1:
            one = self.allocate(req, avoid=avoid)
            return None if one is None else [one]
        mask = self._fitting(req, avoid)
        if self._room(mask, req, n) < n:
            return None  # refused without taking anything (at most n hosts looked at)
        placed: List[Placement] = []
        start = 0
        while len(placed) < n:
            st = self._first(mask, start, req) or self._first(mask, 0, req)
            if st is None:  # round-robin goes around again from the first host
                break
            if req.distribution == "round_robin":
                placed.append(self._take(st, req, self._gpus_for(st, req), len(placed), n))
            else:
                while len(placed) < n and st.fits(req):
                    placed.append(self._take(st, req, self._gpus_for(st, req), len(placed), n))
            if not st.fits(req):
                mask &= ~st.bit
            start = st.slot + 1
        return self._complete(placed, n)

    def _room(self, mask: int, req: Resources, n: int) -> int:
        """How many ranks of ``req`` fit on the hosts of ``mask`` now, counted up to
        ``n`` (each host there holds at least one, so at most ``n`` are looked at)."""
        order = self._order
        total = 0
        while mask and total < n:
            low = _lowest(mask)
            mask ^= 1 << low
            total += order[low].room(req, n - total)
        return total

    def _allocate_each(self, ranks: Sequence[Resources]) -> Optional[List[Placement]]:
        placed: List[Placement] = []
        for r, req in enumerate(ranks):
            p = self.allocate(req, r, len(ranks))
            if p is None:
                break
            placed.append(p)
        return self._complete(placed, len(ranks))

    def _complete(self, placed: List[Placement], n: int) -> Optional[List[Placement]]:
        """All ``n`` ranks placed (their local ranks numbered), or none (the rest given back)."""
        if len(placed) < n:
            for p in placed:
                self.release(p)
            return None
        per_host: Dict[str, int] = {}
        for p in placed:
            p.local_rank = per_host.get(p.host, 0)
            per_host[p.host] = p.local_rank + 1
        return placed

    def release(self, placement: Placement) -> None:
        """Give a placement's cores, GPUs and memory back to its host (if it is still
        here: not if it left since, also if it came back, nor after a :meth:`reset`)."""
        st = self._hosts.get(placement.host)
        if st is None or (placement.epoch and placement.epoch != st.epoch):
            return
        free = st.free_cpus
        before = len(free)
        if len(placement.cpus) == 1:
            bisect.insort(free, placement.cpus[0])
        else:
            free.extend(placement.cpus)
            free.sort()
        _flip(self._cpus_ge, st.bit, before, len(free))
        if placement.gpus:
            before = len(st.free_gpus)
            st.free_gpus.update(placement.gpus)
            _flip(self._gpus_ge, st.bit, before, len(st.free_gpus))
        st.free_memory += placement.memory

    def reset(self) -> None:
        """Free everything at once (its backend's processes were all killed)."""
        self._hosts = {}
        self._index(self.inventory.hosts)

    def idle(self) -> bool:
        """True when nothing is allocated (every core and GPU is free)."""
        return all(len(st.free_cpus) == len(st.host.cpus) and len(st.free_gpus) == len(st.host.gpus)
                   for st in self._order)


def _flip(masks: List[int], bit: int, a: int, b: int) -> None:
    """A host's free count went from ``a`` to ``b`` (or back): flip its ``bit`` in the
    masks of the counts in between (``masks[k]``: the hosts with ``k`` or more free)."""
    low, high = (a, b) if a < b else (b, a)
    if high >= len(masks):
        masks.extend([0] * (high + 1 - len(masks)))
    for k in range(low + 1, high + 1):
        masks[k] ^= bit


def _next_free(st: _HostState, index: int) -> int:
    """The index (in ``st.host.gpus``) of its first free GPU at ``index`` or later; -1: none."""
    ids, free = st.host.gpus, st.free_gpus
    for i in range(index, len(ids)):
        if ids[i] in free:
            return i
    return -1
