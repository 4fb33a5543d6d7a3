"""The ahead-of-time kernel module: built once, keyed to its sources, loaded without numba, refused when unusable.

The kernel tests themselves run against every build of the loops (see
``scripts/test.sh``); these tests are about building, caching, falling back
and the argument checks that keep a compiled module from reading stray memory.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jitrelay import kernels
from jitrelay.core import protocol as p
from jitrelay.core.domains import logic_for
from jitrelay.kernels import build


def _child_env(cache: Path, **env: str) -> dict[str, str]:
    """This environment with that cache folder, and neither a forced build nor NUMBA_DISABLE_JIT."""
    environ = {k: v for k, v in os.environ.items() if k not in ("NUMBA_DISABLE_JIT", "JITRELAY_KERNELS")}
    return {**environ, "JITRELAY_CACHE_DIR": str(cache), **env}


def _in_child(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this cache folder."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_child_env(cache, **env), timeout=300
    )


_REPORT = (
    "import sys; from jitrelay import kernels; b = kernels.backend(); "
    "print(b['name'], b['path'], 'numba' in sys.modules, 'llvmlite' in sys.modules)"
)


@pytest.mark.kernels
def test_the_requested_build_of_the_loops_is_the_one_running() -> None:
    """No silent fallback in the test suite: each pass of the kernel tests runs the build it names."""
    wanted = os.environ.get("JITRELAY_KERNELS", "aot")
    if os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"):
        wanted = "python"
    assert kernels.backend()["name"] == wanted


def test_concurrent_first_loads_build_one_module_and_never_import_numba(tmp_path: Path) -> None:
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _REPORT],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_child_env(tmp_path),
        )
        for _ in range(3)
    ]
    reports = [child.communicate(timeout=300) for child in children]
    built = sorted(path.name for path in tmp_path.iterdir() if path.suffix == ".so")

    assert [child.returncode for child in children] == [0, 0, 0], reports
    assert len(built) == 1 and built[0] == build.module_path(tmp_path).name
    for out, err in reports:
        assert out.split() == ["aot", str(build.module_path(tmp_path)), "False", "False"]
        assert "ahead-of-time" not in err
    assert not [path for path in tmp_path.iterdir() if path.name.startswith("build-")]  # scratch folders removed

    again = _in_child("from jitrelay.cli import main; raise SystemExit(main(['kernels']))", tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"aot {build.module_path(tmp_path)} (ready in ")
    assert sorted(path.name for path in tmp_path.iterdir() if path.suffix == ".so") == built


def test_an_unbuilt_module_is_not_built_when_asked_not_to(tmp_path: Path) -> None:
    with pytest.raises(build.Unavailable, match="has not been built"):
        build.load(tmp_path, build=False)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_module_is_refused_with_its_path(tmp_path: Path) -> None:
    path = build.module_path(tmp_path)
    path.write_bytes(b"\x7fELF not really")
    done = _in_child(_REPORT, tmp_path)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[0] == "jit"
    assert f"{path} does not load" in done.stderr and "remove it to rebuild" in done.stderr


def test_a_failed_build_falls_back_to_the_jit_and_says_why(tmp_path: Path) -> None:
    done = _in_child(_REPORT, tmp_path, CC="false")

    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[:3] == ["jit", str(Path(kernels.__file__).with_name("loops.py")), "True"]
    assert "no ahead-of-time build of the kernels (building " in done.stderr and "failed (exit 1)" in done.stderr
    assert not [path for path in tmp_path.iterdir() if path.suffix == ".so"]

    command = _in_child("from jitrelay.cli import main; raise SystemExit(main(['kernels']))", tmp_path, CC="false")
    assert command.returncode == 1
    assert command.stdout.startswith("jit ")
    assert "jitrelay kernels: no ahead-of-time build of the kernels (building " in command.stderr


def test_a_cache_folder_that_cannot_be_made_falls_back_to_the_jit(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    done = _in_child(_REPORT, blocker / "cache")

    assert done.stdout.split()[0] == "jit"
    assert f"cannot use the cache folder {blocker / 'cache'}" in done.stderr


def test_the_module_name_follows_the_loops_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = Path(build.__file__).resolve().parents[1]
    for source in build._SOURCES:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(package / source, tmp_path / source)
    monkeypatch.setattr(build, "_PACKAGE", tmp_path)
    same = build.module_name()
    with open(tmp_path / "kernels" / "loops.py", "a") as loops:
        loops.write("\n# changed\n")
    changed = build.module_name()

    monkeypatch.undo()
    assert same == build.module_name()
    assert changed != same and changed.startswith("jitrelay_kernels_")


def test_unknown_backend_is_refused() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from jitrelay import kernels; kernels.backend()"],
        capture_output=True,
        text=True,
        env={**os.environ, "JITRELAY_KERNELS": "fast"},
        timeout=60,
    )
    assert done.returncode != 0
    assert "JITRELAY_KERNELS must be one of aot, jit, not 'fast'" in done.stderr


def test_the_relay_process_runs_the_module_without_numba(start_relay) -> None:
    relay = start_relay("market_data")
    with open(f"/proc/{relay.pid}/maps") as maps:
        mapped = maps.read()

    assert any("kernels ready in" in line and f"(aot: {build.module_path()})" in line for line in relay.lines)
    assert "libllvmlite" not in mapped
    assert build.module_path().name in mapped


# Argument checks: the compiled module trusts its arguments, so each public function checks them first.

MESSAGE = np.frombuffer(bytearray(p.build_message(p.MARKET_DATA, [(1, b"x" * 8)]) * 2), dtype=np.uint8)
TABLES = kernels.tables_for(logic_for("market_data"))


@pytest.mark.kernels
@pytest.mark.parametrize(
    "bad",
    [MESSAGE.astype(np.int64), MESSAGE.copy()[::2], MESSAGE.reshape(2, -1), list(MESSAGE), bytes(MESSAGE)],
    ids=["int64", "strided", "2-D", "list", "bytes"],
)
def test_every_kernel_refuses_a_buffer_that_is_not_contiguous_uint8(bad: object) -> None:
    out = kernels.ScanBuffers(len(MESSAGE))
    groups = kernels.group_tables([(frozenset({1}), None)])
    calls = [
        lambda: kernels.scan_into(bad, 0, 8, TABLES, out),
        lambda: kernels.scan(bad, TABLES, 0, 8),
        lambda: kernels.frame(bad),
        lambda: kernels.compact(bad, out.runs, 0),
        lambda: kernels.message_crc(bad),
        lambda: kernels.stamp_batch(bad, len(MESSAGE) // 2, 0, 0),
        lambda: kernels.scan_and_route(bad, 0, 8, TABLES, out, groups, kernels.RouteBuffers(len(MESSAGE), 1)),
        lambda: kernels.route(bad, out, 0, groups, kernels.RouteBuffers(len(MESSAGE), 1)),
    ]
    for call in calls:
        with pytest.raises(TypeError, match="contiguous one-dimensional uint8"):
            call()


@pytest.mark.kernels
def test_kernels_refuse_ranges_and_companions_that_would_reach_outside_their_arrays() -> None:
    out = kernels.ScanBuffers(len(MESSAGE))
    with pytest.raises(ValueError, match="outside a buffer"):
        kernels.scan_into(MESSAGE, 0, len(MESSAGE) + 1, TABLES, out)
    with pytest.raises(ValueError, match="outside a buffer"):
        kernels.frame(MESSAGE, 5, 4)
    with pytest.raises(ValueError, match="outside a buffer"):
        kernels.message_crc(MESSAGE, len(MESSAGE) + 1)
    with pytest.raises(TypeError, match="counts must be"):
        kernels.scan_into(MESSAGE, 0, len(MESSAGE), TABLES, out, np.zeros(len(p.VERDICT_NAMES), np.int32))
    with pytest.raises(ValueError, match="256 entries"):
        kernels.scan_into(MESSAGE, 0, len(MESSAGE), TABLES._replace(type_allowed=np.ones(8, np.uint8)), out)
    with pytest.raises(ValueError, match="read-only"):
        kernels.stamp_batch(np.frombuffer(bytes(MESSAGE), np.uint8), len(MESSAGE) // 2, 0, 0)

    result = kernels.scan_into(MESSAGE, 0, len(MESSAGE), TABLES, out)
    with pytest.raises(ValueError, match="runs reach outside"):
        kernels.compact(MESSAGE[:10], out.runs, result.runs)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.compact(MESSAGE, out.runs, len(out.runs))
    with pytest.raises(TypeError, match="runs must be"):
        kernels.compact(MESSAGE, out.runs.astype(np.int32), result.runs)
    with pytest.raises(ValueError, match="were not scanned from this buffer"):
        kernels.route(MESSAGE[:10], out, result.count, kernels.group_tables([(None, None)]), None)

    groups = kernels.group_tables([(frozenset({1}), None)])
    routed = kernels.RouteBuffers(len(MESSAGE), 1)
    with pytest.raises(ValueError, match="type_groups must be 256 rows"):
        kernels.route(MESSAGE, out, result.count, groups._replace(type_groups=groups.type_groups[:10].copy()), routed)
    with pytest.raises(ValueError, match="groups do not fit"):
        kernels.scan_and_route(MESSAGE, 0, len(MESSAGE), TABLES, out, groups._replace(groups=65), routed)
    with pytest.raises(TypeError, match="untyped must be"):
        kernels.route(MESSAGE, out, result.count, groups._replace(untyped=groups.untyped.astype(np.int64)), routed)


def test_scratch_folders_of_builds_that_no_longer_run_are_removed(tmp_path: Path) -> None:
    import fcntl
    import time

    dead = tmp_path / "jitrelay_kernels_dead.build-x1"
    running = tmp_path / "jitrelay_kernels_live.build-x2"
    old_style, recent_style = tmp_path / "build-old", tmp_path / "build-recent"
    for folder in (dead, running, old_style, recent_style):
        folder.mkdir()
        (folder / "half.o").write_bytes(b"half a build")
    an_hour_ago = time.time() - 3600
    os.utime(old_style, (an_hour_ago, an_hour_ago))
    with open(tmp_path / "jitrelay_kernels_live.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a build of that module is under way
        with pytest.raises(build.Unavailable, match="has not been built"):
            build.load(tmp_path, build=False)

    assert not dead.exists() and not old_style.exists()
    assert running.exists() and recent_style.exists()


def test_an_interrupted_build_leaves_nothing_behind_at_the_next_start(tmp_path: Path) -> None:
    import signal
    import time

    code = f"from pathlib import Path; from jitrelay.kernels import build; build.load(Path({str(tmp_path)!r}))"
    child = subprocess.Popen([sys.executable, "-c", code], env=_child_env(tmp_path), start_new_session=True)
    deadline = time.monotonic() + 60
    while not [path for path in tmp_path.iterdir() if build._SCRATCH in path.name]:
        assert child.poll() is None and time.monotonic() < deadline, "no build started"
        time.sleep(0.01)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait(10)
    assert [path for path in tmp_path.iterdir() if build._SCRATCH in path.name]  # what the kill left

    with pytest.raises(build.Unavailable, match="has not been built"):
        build.load(tmp_path, build=False)
    assert not [path for path in tmp_path.iterdir() if build._SCRATCH in path.name]


def test_a_checkout_has_no_packaged_module_and_says_so() -> None:
    if build.packaged_path().exists():
        pytest.skip("this installation was built with its module")
    with pytest.raises(build.Unavailable, match="was not built with the package"):
        build.load_packaged()


def test_the_packaged_digest_follows_the_loops_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = Path(build.__file__).resolve().parents[1]
    for source in build._SOURCES:
        (tmp_path / source).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(package / source, tmp_path / source)
    same = build.packaged_digest(tmp_path)
    with open(tmp_path / "kernels" / "loops.py", "a") as loops:
        loops.write("\n# changed\n")

    assert same == build.packaged_digest() and 0 < same < 2**63
    assert build.packaged_digest(tmp_path) != same
