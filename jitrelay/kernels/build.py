"""Build the kernels' loops ahead of time into a small extension module, and load it.

Why: a process that loads this module never imports numba. numba with LLVM
costs about 100 MiB resident and half a second at start; the extension module
is under 1 MiB, and its functions are called without numba's dispatcher.

Two builds of the same module, loaded in this order:

- the packaged one, ``jitrelay/kernels/_compiled<EXT_SUFFIX>``, compiled when
  the package is built (``setup.py`` calls ``build_package``) for the
  architecture's generic CPU, so a wheel runs on any machine of its platform.
  It exports ``build_digest()``, a digest of the loops' source, the numba,
  llvmlite and numpy versions and the Python ABI; a module whose digest is not
  this installation's is not loaded.
- the run-time one, built by the first process that finds no usable packaged
  module (an editable install, or numba/numpy upgraded since): numba's
  ``pycc`` and the C compiler run in a child process (so the caller never
  imports numba either), tuned for this CPU, and the result is kept in a cache
  folder under a name derived from the same inputs and the CPU, so a stale
  build is never loaded. Concurrent builders take a lock; the first builds,
  the others load. Scratch folders of interrupted builds are removed.

Both folders hold code the relay runs, so each must pass
``core.folders.check_folder``; an untrusted one raises ``UntrustedFolder``
(the relay refuses to start) rather than ``Unavailable`` (it falls back).

The exported functions trust their arguments: a wrong dtype or layout is not
caught and reads the wrong memory. ``kernels`` checks every argument first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import ModuleType

from jitrelay.core.folders import check_folder

_BYTES = "uint8[::1]"
_INTS = "int64[::1]"
_MASKS = "uint64[:, ::1]"
_CRC_TABLES = "int64[:, ::1]"
_SCAN_ARGS = (
    f"{_BYTES}, int64, int64, int64, int64, int64, {_BYTES}, {_BYTES}, {_INTS}, {_BYTES}, {_INTS}, {_INTS}, "
    f"{_CRC_TABLES}"
)
_ROUTE_ARGS = f"{_MASKS}, {_MASKS}, uint64[::1], int64, {_MASKS}, {_INTS}, {_INTS}, {_INTS}, {_INTS}"
# What the read and poll loops take to give filtered groups their runs: the group count, the route, the targets' groups.
_GROUP_ARGS = f"int64, {_MASKS}, {_MASKS}, uint64[::1], {_MASKS}, {_INTS}, {_INTS}, {_INTS}, {_INTS}, {_INTS}, {_INTS}"
# The cursor table's arrays the read and poll loops read: each slot's mode, position and group; cursors per mode.
_CURSORS = f"int8[::1], {_INTS}, {_INTS}, {_INTS}"

# Every entry point of ``loops`` that ``kernels`` calls, with its one signature.
SIGNATURES: dict[str, str] = {
    "scan": f"UniTuple(int64, 6)({_SCAN_ARGS})",
    "scan_route": f"UniTuple(int64, 7)({_SCAN_ARGS}, {_ROUTE_ARGS})",
    "frame": f"UniTuple(int64, 3)({_BYTES}, int64, int64)",
    "next_message_end": f"int64({_BYTES}, int64, int64)",
    "compact": f"int64({_BYTES}, {_INTS}, int64, {_BYTES})",
    "group_masks": f"void({_BYTES}, {_INTS}, {_BYTES}, int64, {_MASKS}, {_MASKS}, uint64[::1], {_MASKS})",
    "group_runs": f"int64({_INTS}, {_MASKS}, int64, int64, {_INTS}, {_INTS}, {_INTS}, {_INTS})",
    "group_iovecs": (
        f"int64({_INTS}, int64, int64, {_INTS}, {_INTS}, {_INTS}, int64, int64, int64, uint64[::1], int64, {_INTS})"
    ),
    "crc32": f"int64({_BYTES}, int64, int64, int64, {_CRC_TABLES})",
    "message_crc": f"int64({_BYTES}, int64, int64, {_CRC_TABLES})",
    "stamp_batch": f"void({_BYTES}, int64, int64, int64, int64, boolean, {_CRC_TABLES})",
    "log_append": f"int64({_BYTES}, {_INTS}, int64, {_BYTES}, int64, int64, int64)",
}
# The send loop (``send_loop.py``): the one compiled entry point that does I/O.
SEND_SIGNATURES: dict[str, str] = {
    "send_all": f"int64({_INTS}, int64, {_INTS}, {_INTS}, uint64[::1], uint64[::1], {_INTS}, {_INTS})",
}

# The read loop (``read_loop.py``): the read path from scan to fan-out in one call; it calls the send loop.
READ_SIGNATURES: dict[str, str] = {
    "forward_read": (
        f"UniTuple(int64, 7)({_SCAN_ARGS}, {_INTS}, {_INTS}, {_INTS}, {_INTS}, {_INTS}, int64, "
        f"{_INTS}, int64, {_INTS}, {_INTS}, uint64[::1], uint64[::1], {_INTS}, {_INTS}, int64, {_INTS}, "
        f"int64, int64, int64, {_GROUP_ARGS}, {_INTS}, {_CURSORS})"
    ),
}

# The poll loop (``poll_loop.py``): epoll_wait and recv into the log, then the read loop, per wake-up.
POLL_SIGNATURES: dict[str, str] = {
    "read_ready": (
        f"int64(int64, {_BYTES}, {_INTS}, {_INTS}, {_INTS}, {_INTS}, int64[:, ::1], int64, int64[:, ::1], "
        f"{_BYTES}, int64, int64, int64, {_BYTES}, {_BYTES}, {_INTS}, {_BYTES}, {_INTS}, {_INTS}, {_CRC_TABLES}, "
        f"{_INTS}, {_INTS}, {_INTS}, {_INTS}, {_INTS}, {_INTS}, {_INTS}, uint64[::1], uint64[::1], {_INTS}, {_INTS}, "
        f"{_INTS}, {_INTS}, int64, {_GROUP_ARGS}, {_INTS}, {_CURSORS})"
    ),
}

# The typed-record loops (``record_loops.py``), exported under these names.
RECORD_SIGNATURES: dict[str, tuple[str, str]] = {
    "record_gather": (
        "gather",
        f"int64({_BYTES}, int64, int64, int64, {_BYTES}, uint64[::1], uint64[::1], {_BYTES}, {_INTS})",
    ),
    "record_uniform": ("uniform", f"int64({_BYTES}, int64, int64, int64)"),
    "record_scatter": (
        "scatter",
        f"int64({_BYTES}, int64, int64, {_BYTES}, {_BYTES}, int64, {_INTS}, boolean, {_CRC_TABLES})",
    ),
}

BUILD_TIMEOUT = 600.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # numba colours its errors
_PACKAGE = Path(__file__).resolve().parents[1]
_SOURCES = (
    "kernels/loops.py",
    "kernels/send_loop.py",
    "kernels/read_loop.py",
    "kernels/poll_loop.py",
    "kernels/record_loops.py",
    "kernels/constants.py",
    "core/protocol.py",
    "kernels/build.py",
)
PACKAGED_NAME = "_compiled"  # jitrelay/kernels/_compiled<EXT_SUFFIX>, built with the package
_SCRATCH = ".build-"  # <module name>.build-XXXX: a build in progress, or the leftover of an interrupted one


class Unavailable(RuntimeError):
    """The ahead-of-time module could not be built or loaded; the message says why."""


def cache_dir() -> Path:
    """Where built modules are kept: ``$JITRELAY_CACHE_DIR``, else ``jitrelay`` in ``$XDG_CACHE_HOME``/``~/.cache``."""
    if os.environ.get("JITRELAY_CACHE_DIR"):
        return Path(os.environ["JITRELAY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jitrelay"


def _inputs_digest(package: Path) -> hashlib._Hash:
    """A digest of what the compiled code depends on besides the CPU: the loops' source, the tools' versions."""
    digest = hashlib.sha256()
    for source in _SOURCES:
        digest.update((package / source).read_bytes())
    for dist in ("numba", "llvmlite", "numpy"):
        try:
            digest.update(f"{dist}={version(dist)};".encode())
        except PackageNotFoundError:
            digest.update(f"{dist} absent;".encode())
    return digest


def module_name() -> str:
    """The run-time module's name: it changes with the loops' source, the tool versions, Python and the CPU."""
    digest = _inputs_digest(_PACKAGE)
    digest.update(f"{sys.version};{platform.machine()};{_cpu_features()}".encode())
    return f"jitrelay_kernels_{digest.hexdigest()[:20]}"


def packaged_digest(package: Path | None = None) -> int:
    """What the packaged module's ``build_digest()`` must return here: the inputs, the Python ABI, the machine."""
    digest = _inputs_digest(package or _PACKAGE)
    digest.update(
        f"{sys.implementation.cache_tag};{sysconfig.get_config_var('EXT_SUFFIX')};{platform.machine()}".encode()
    )
    return int(digest.hexdigest()[:15], 16)  # 60 bits: an int64 the module can return


def packaged_path() -> Path:
    """Where the module built with the package lives (it is absent from a source checkout)."""
    return Path(__file__).with_name(PACKAGED_NAME + sysconfig.get_config_var("EXT_SUFFIX"))


def load_packaged() -> ModuleType:
    """The module built with the package, when it was built from these loops for these versions.

    ``Unavailable`` says why not (absent, damaged, stale); ``UntrustedFolder``
    when its folder can be written by another user.
    """
    path = packaged_path()
    if not path.exists():
        raise Unavailable(f"{path.name} was not built with the package (an editable install or a source checkout)")
    check_folder(path.parent, "kernel module folder")
    try:
        module = _import(path, f"{__package__}.{PACKAGED_NAME}")
    except ImportError as error:
        raise Unavailable(f"{path} does not load ({error})") from error
    try:
        built = int(module.build_digest())
    except (AttributeError, TypeError, ValueError):
        built = -1
    if built != packaged_digest():
        raise Unavailable(f"{path} was built from other loops or for other numba/numpy versions than these")
    return module


def _cpu_features() -> str:
    """The CPU's model and flags: the module is compiled for this CPU."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        return "".join(line for line in cpuinfo if line.startswith(("model name", "flags")))[:4096]
    return platform.processor()


def module_path(folder: Path | None = None) -> Path:
    """The file the module is (or will be) built into."""
    return (folder or cache_dir()) / (module_name() + sysconfig.get_config_var("EXT_SUFFIX"))


def load(
    folder: Path | None = None, *, build: bool = True, announce: Callable[[Path], None] | None = None
) -> ModuleType:
    """The run-time module, building it first if needed (and ``build``); raises ``Unavailable`` with the reason.

    ``announce(path)`` is called just before a build begins, so that a caller
    can say what it waits for before the wait rather than after it.
    ``UntrustedFolder`` when the cache folder can be written by another user.
    """
    path = module_path(folder)
    _trusted_cache(path.parent)
    if not path.exists():
        if not build:
            raise Unavailable(f"{path} has not been built")
        with _locked(path):
            if not path.exists():
                if announce is not None:
                    announce(path)
                _build(path)
    try:
        return _import(path)
    except ImportError as error:
        raise Unavailable(f"{path} does not load ({error}); remove it to rebuild") from error


def _trusted_cache(folder: Path) -> None:
    """Make the cache folder (0700) if it is missing, check that no one else can write it, clear leftover scratch."""
    if not os.path.lexists(folder):
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise Unavailable(f"cannot use the cache folder {folder}: {error}") from error
    elif not folder.is_dir():
        raise Unavailable(f"cannot use the cache folder {folder}: it is not a folder")
    check_folder(folder, "kernel cache folder")
    remove_leftovers(folder)


def remove_leftovers(folder: Path) -> list[Path]:
    """Remove scratch folders of builds that no longer run (their lock is free); return what was removed.

    An interrupted build (the process killed, the machine stopped) leaves its
    scratch folder behind; a build that still runs holds its module's lock.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            name, scratch, _ = entry.name.partition(_SCRATCH)
            legacy = entry.name.startswith("build-")  # scratch folders of earlier versions, without a lock to ask
            if not (scratch and name) and not legacy:
                continue
            if legacy and time.time() - entry.lstat().st_mtime < BUILD_TIMEOUT:
                continue
            if not legacy and not _lock_is_free(folder / f"{name}.lock"):
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _lock_is_free(lock_path: Path) -> bool:
    try:
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True  # no lock file to hold: no build can be running under it
    return True


def _import(path: Path, name: str | None = None) -> ModuleType:
    name = name or path.name.split(".", 1)[0]
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    sys.modules[name] = module
    return module


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the build lock of ``path``: concurrent starts build once."""
    try:
        lock = open(path.parent / (path.name.split(".", 1)[0] + ".lock"), "w")  # noqa: SIM115 - held for the whole block
    except OSError as error:
        raise Unavailable(f"cannot use the cache folder {path.parent}: {error}") from error
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build(path: Path) -> None:
    """Build the module into ``path`` in a child process.

    The child compiles with a numba cache of its own, in the scratch folder:
    loops the JIT cached on disk were compiled with numba's reference counting,
    and pycc would link them as they are (the module would then not load for
    want of ``NRT_MemInfo_call_dtor``).
    """
    name = path.name.split(".", 1)[0]
    with tempfile.TemporaryDirectory(prefix=name + _SCRATCH, dir=path.parent) as scratch:
        command = [sys.executable, "-m", "jitrelay.kernels.build", scratch, name]
        env = {**os.environ, "NUMBA_CACHE_DIR": os.path.join(scratch, "numba-cache")}
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT, env=env)
        except subprocess.TimeoutExpired as error:
            raise Unavailable(f"building {path.name} took more than {BUILD_TIMEOUT:.0f} s") from error
        built = Path(scratch) / path.name
        if done.returncode != 0 or not built.exists():
            lines = _ANSI.sub("", done.stderr or done.stdout).strip().splitlines()
            tail = " | ".join(line.strip() for line in lines[-3:])
            raise Unavailable(f"building {path.name} failed (exit {done.returncode}): {tail}")
        os.replace(built, path)


def build_package(folder: Path, source: Path) -> Path:
    """Compile the packaged module into ``folder`` from the package at ``source``, in a child process; its path.

    ``setup.py`` calls this while the package is built; the child imports
    jitrelay from ``source`` (the tree being built). Raises ``Unavailable``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "jitrelay.kernels.build", "--package", str(folder)]
    path = os.pathsep.join(filter(None, [str(source), os.environ.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="jitrelay-numba-cache-") as numba_cache:  # not into the package
        env = {**os.environ, "PYTHONPATH": path, "NUMBA_CACHE_DIR": numba_cache}
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT, env=env, cwd=source)
    built = folder / (PACKAGED_NAME + sysconfig.get_config_var("EXT_SUFFIX"))
    if done.returncode != 0 or not built.exists():
        raise Unavailable(f"building {built.name} failed (exit {done.returncode}):\n{_ANSI.sub('', done.stderr)}")
    return built


def _digest_function(value: int) -> Callable[[], int]:
    """A function of no arguments returning ``value``, for pycc to compile in as a constant."""
    namespace: dict = {}
    exec(f"def build_digest():\n    return {value}\n", namespace)
    return namespace["build_digest"]


def build_into(folder: str, name: str, *, portable: bool = False) -> None:
    """Compile every entry point of ``loops`` into ``folder/name``: the child process's work.

    ``portable``: for the architecture's generic CPU, with ``build_digest``
    exported (the packaged module); otherwise tuned for this CPU.
    """
    import warnings

    import llvmlite.binding as llvm
    from numba.core.errors import NumbaPendingDeprecationWarning

    warnings.simplefilter("ignore", NumbaPendingDeprecationWarning)  # pycc's notice; it is still maintained
    from numba.pycc import CC

    from jitrelay.kernels import loops, poll_loop, read_loop, record_loops, send_loop

    class LinkedCC(CC):
        """pycc, linking zlib too: the loops call its ``crc32``."""

        def _get_extra_ldflags(self) -> list[str]:
            return [*super()._get_extra_ldflags(), "-Wl,--no-as-needed", f"-l:{loops.zlib_library()}"]

    cc = LinkedCC(name)
    cc.output_dir = folder
    cc.use_nrt = False  # the loops never allocate
    cc.target_cpu = "" if portable else llvm.get_host_cpu_name()  # "": LLVM's generic model of the architecture
    for export, signature in SIGNATURES.items():
        cc.export(export, signature)(getattr(loops, export).py_func)
    for export, signature in SEND_SIGNATURES.items():
        cc.export(export, signature)(getattr(send_loop, export).py_func)
    for export, signature in READ_SIGNATURES.items():
        cc.export(export, signature)(getattr(read_loop, export).py_func)
    for export, signature in POLL_SIGNATURES.items():
        cc.export(export, signature)(getattr(poll_loop, export).py_func)
    for export, (function, signature) in RECORD_SIGNATURES.items():
        cc.export(export, signature)(getattr(record_loops, function).py_func)
    if portable:
        cc.export("build_digest", "int64()")(_digest_function(packaged_digest()))
    cc.compile()


if __name__ == "__main__":
    if sys.argv[1] == "--package":
        build_into(sys.argv[2], PACKAGED_NAME, portable=True)
    else:
        build_into(sys.argv[1], sys.argv[2])
