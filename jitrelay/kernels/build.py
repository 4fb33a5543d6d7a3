"""Build the kernels' loops ahead of time into a small extension module, and load it.

Why: a process that loads this module never imports numba. numba with LLVM
costs about 100 MiB resident and half a second at start; the extension module
is under 1 MiB, and its functions are called without numba's dispatcher.

The build runs numba's ``pycc`` and the C compiler in a child process (so the
caller never imports numba either), once for each version of the loops, of
numba, numpy and Python, and for each CPU; the result is kept in a cache
folder under a name derived from all of these, so a stale build is never
loaded. Concurrent builders take a lock; the first builds, the others load.

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
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

_BYTES = "uint8[::1]"
_INTS = "int64[::1]"
_MASKS = "uint64[:, ::1]"
_CRC_TABLES = "int64[:, ::1]"
_SCAN_ARGS = (
    f"{_BYTES}, int64, int64, int64, int64, boolean, {_BYTES}, {_INTS}, {_BYTES}, {_INTS}, {_INTS}, {_CRC_TABLES}"
)
_ROUTE_ARGS = f"{_MASKS}, {_MASKS}, uint64[::1], int64, {_MASKS}, {_INTS}, {_INTS}, {_INTS}, {_INTS}"

# Every entry point of ``loops`` that ``kernels`` calls, with its one signature.
SIGNATURES: dict[str, str] = {
    "scan": f"UniTuple(int64, 6)({_SCAN_ARGS})",
    "scan_route": f"UniTuple(int64, 7)({_SCAN_ARGS}, {_ROUTE_ARGS})",
    "frame": f"UniTuple(int64, 3)({_BYTES}, int64, int64)",
    "next_message_end": f"int64({_BYTES}, int64, int64)",
    "compact": f"int64({_BYTES}, {_INTS}, int64, {_BYTES})",
    "group_masks": f"void({_BYTES}, {_INTS}, {_BYTES}, int64, {_MASKS}, {_MASKS}, uint64[::1], {_MASKS})",
    "group_runs": f"int64({_INTS}, {_MASKS}, int64, int64, {_INTS}, {_INTS}, {_INTS}, {_INTS})",
    "crc32": f"int64({_BYTES}, int64, int64, int64, {_CRC_TABLES})",
    "message_crc": f"int64({_BYTES}, int64, int64, {_CRC_TABLES})",
    "stamp_batch": f"void({_BYTES}, int64, int64, int64, int64, boolean, {_CRC_TABLES})",
    "log_append": f"int64({_BYTES}, {_INTS}, int64, {_BYTES}, int64, int64, int64)",
}
# The send loop (``send_loop.py``): the one compiled entry point that does I/O.
SEND_SIGNATURES: dict[str, str] = {
    "send_all": f"void({_INTS}, int64, {_INTS}, {_INTS}, uint64[::1], uint64[::1], {_INTS})",
}

BUILD_TIMEOUT = 600.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # numba colours its errors
_PACKAGE = Path(__file__).resolve().parents[1]
_SOURCES = ("kernels/loops.py", "kernels/send_loop.py", "core/protocol.py", "kernels/build.py")


class Unavailable(RuntimeError):
    """The ahead-of-time module could not be built or loaded; the message says why."""


def cache_dir() -> Path:
    """Where built modules are kept: ``$JITRELAY_CACHE_DIR``, else ``jitrelay`` in ``$XDG_CACHE_HOME``/``~/.cache``."""
    if os.environ.get("JITRELAY_CACHE_DIR"):
        return Path(os.environ["JITRELAY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jitrelay"


def module_name() -> str:
    """The module's name: it changes with the loops' source, the tool versions, Python and the CPU."""
    digest = hashlib.sha256()
    for source in _SOURCES:
        digest.update((_PACKAGE / source).read_bytes())
    for dist in ("numba", "llvmlite", "numpy"):
        digest.update(f"{dist}={version(dist)};".encode())
    digest.update(f"{sys.version};{platform.machine()};{_cpu_features()}".encode())
    return f"jitrelay_kernels_{digest.hexdigest()[:20]}"


def _cpu_features() -> str:
    """The CPU's model and flags: the module is compiled for this CPU."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        return "".join(line for line in cpuinfo if line.startswith(("model name", "flags")))[:4096]
    return platform.processor()


def module_path(folder: Path | None = None) -> Path:
    """The file the module is (or will be) built into."""
    return (folder or cache_dir()) / (module_name() + sysconfig.get_config_var("EXT_SUFFIX"))


def load(folder: Path | None = None, *, build: bool = True) -> ModuleType:
    """The built module, building it first if needed (and ``build``); raises ``Unavailable`` with the reason."""
    path = module_path(folder)
    if not path.exists():
        if not build:
            raise Unavailable(f"{path} has not been built")
        with _locked(path):
            if not path.exists():
                _build(path)
    try:
        return _import(path)
    except ImportError as error:
        raise Unavailable(f"{path} does not load ({error}); remove it to rebuild") from error


def _import(path: Path) -> ModuleType:
    name = path.name.split(".", 1)[0]
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
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / (path.name.split(".", 1)[0] + ".lock"), "w")  # noqa: SIM115 - held for the whole block
    except OSError as error:
        raise Unavailable(f"cannot use the cache folder {path.parent}: {error}") from error
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build(path: Path) -> None:
    """Build the module into ``path`` in a child process."""
    with tempfile.TemporaryDirectory(prefix="build-", dir=path.parent) as scratch:
        command = [sys.executable, "-m", "jitrelay.kernels.build", scratch, path.name.split(".", 1)[0]]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        except subprocess.TimeoutExpired as error:
            raise Unavailable(f"building {path.name} took more than {BUILD_TIMEOUT:.0f} s") from error
        built = Path(scratch) / path.name
        if done.returncode != 0 or not built.exists():
            lines = _ANSI.sub("", done.stderr or done.stdout).strip().splitlines()
            tail = " | ".join(line.strip() for line in lines[-3:])
            raise Unavailable(f"building {path.name} failed (exit {done.returncode}): {tail}")
        os.replace(built, path)


def build_into(folder: str, name: str) -> None:
    """Compile every entry point of ``loops`` into ``folder/name``: the child process's work."""
    import warnings

    import llvmlite.binding as llvm
    from numba.core.errors import NumbaPendingDeprecationWarning

    warnings.simplefilter("ignore", NumbaPendingDeprecationWarning)  # pycc's notice; it is still maintained
    from numba.pycc import CC

    from jitrelay.kernels import loops, send_loop

    class LinkedCC(CC):
        """pycc, linking zlib too: the loops call its ``crc32``."""

        def _get_extra_ldflags(self) -> list[str]:
            return [*super()._get_extra_ldflags(), "-Wl,--no-as-needed", f"-l:{loops.zlib_library()}"]

    cc = LinkedCC(name)
    cc.output_dir = folder
    cc.use_nrt = False  # the loops never allocate
    cc.target_cpu = llvm.get_host_cpu_name()
    for export, signature in SIGNATURES.items():
        cc.export(export, signature)(getattr(loops, export).py_func)
    for export, signature in SEND_SIGNATURES.items():
        cc.export(export, signature)(getattr(send_loop, export).py_func)
    cc.compile()


if __name__ == "__main__":
    build_into(sys.argv[1], sys.argv[2])
