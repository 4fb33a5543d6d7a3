"""The ``limit`` relay: ``c_forwarder.c`` (beside this module) built with the system C compiler when the bench runs.

A compiled forwarder of raw bytes (epoll, one buffer, a blocking ``send`` to
every other connection) is the most any user-space relay can do on this
machine; the bench reports it beside the Python ceiling (``raw``) and pyzmq.
It is built once per source and compiler into the kernels' cache folder
(``$JITRELAY_CACHE_DIR/bench``), keyed by their hash. The compiler is ``$CC``
when set, else the first of ``cc``, ``gcc`` and ``clang`` on the PATH; with
none, the bench says so in one line and runs without the limit.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("c_forwarder.c")
FLAGS = ("-O2", "-std=gnu11", "-Wall")
READY_MARKER = "limit forwarder listening on"
BUILD_SECONDS = 120.0


def cache_folder() -> Path:
    """Where the built forwarder goes: ``bench`` in the kernels' cache folder (``kernels.build.cache_dir``).

    Worked out here rather than imported: importing ``jitrelay.kernels`` loads
    the kernels, which the bench's own process must not do before its relays
    have built them.
    """
    if os.environ.get("JITRELAY_CACHE_DIR"):
        return Path(os.environ["JITRELAY_CACHE_DIR"]) / "bench"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jitrelay" / "bench"


class NoCompiler(RuntimeError):
    """The forwarder cannot be built: no C compiler, or the compiler failed; the message says which."""


def compiler() -> list[str] | None:
    """The C compiler's command: ``$CC`` when set (None when it names nothing runnable), else cc, gcc or clang."""
    chosen = os.environ.get("CC", "").strip()
    if chosen:
        words = shlex.split(chosen)
        found = shutil.which(words[0])
        return [found, *words[1:]] if found else None
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    return None


def _no_compiler() -> str:
    """Why there is no compiler: ``$CC`` names nothing runnable, or none of the usual ones is on the PATH."""
    named = os.environ.get("CC")
    return f"CC={named!r} names no compiler on the PATH" if named else "no C compiler (cc, gcc or clang) on the PATH"


def build(folder: Path | None = None) -> Path:
    """The built forwarder, compiled now unless this source and compiler already built it; raises ``NoCompiler``."""
    cc = compiler()
    if cc is None:
        raise NoCompiler(_no_compiler())
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + "\0".join([*cc, *FLAGS]).encode()).hexdigest()[:16]
    folder = folder or cache_folder()
    binary = folder / f"c_forwarder-{key}"
    if binary.is_file():
        return binary
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as scratch:
        built = Path(scratch) / binary.name
        command = [*cc, *FLAGS, "-o", str(built), str(SOURCE)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_SECONDS)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise NoCompiler(f"{shlex.join(command)} failed: {exc}") from exc
        if done.returncode != 0:
            raise NoCompiler(f"{shlex.join(command)} exited with {done.returncode}: {done.stderr.strip()[-500:]}")
        os.replace(built, binary)  # whole or absent: a concurrent bench sees no half-written file
    return binary


def limit_built() -> bool:
    """Build the forwarder for this bench run; False, after one line on stderr saying why, when it cannot be built."""
    try:
        build()
    except NoCompiler as exc:
        print(f"jitrelay bench: no limit column: {exc} (apt-get install gcc, or set CC)", file=sys.stderr)
        return False
    return True


def limit_command(path: str) -> list[str]:
    """The command line of the limit relay listening on ``path``, building it first; raises ``NoCompiler``."""
    return [str(build()), path]
