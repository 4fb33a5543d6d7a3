"""A wheel built here installs into another virtualenv and runs its relay at once, with no compiler and no cache.

What a new user or a deployment gets from ``pip install``: the wheel carries
the kernel module compiled when it was built, so the relay in the new
environment loads it with ``CC=false`` (no C compiler), an empty home (no
cache folder) and never maps numba or LLVM. A module that is not this
installation's (the loops changed since) is refused, and the fallback says why.

Slow (a wheel build and a virtualenv install, about 30 s): one module-scoped
installation serves every test here.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIRST_MESSAGE = REPO / "scripts" / "first_message.py"


class Installed:
    """A virtualenv with the wheel installed, and an empty home for its processes."""

    def __init__(self, root: Path, wheel: Path) -> None:
        self.root = root
        self.wheel = wheel
        self.python = root / "venv" / "bin" / "python"
        self.home = root / "home"

    def env(self, **extra: str) -> dict[str, str]:
        """No compiler, an empty home, no cache folder, nothing of this checkout or of the test session."""
        dropped = ("JITRELAY_", "NUMBA_", "PYTHONPATH", "XDG_CACHE_HOME", "VIRTUAL_ENV", "COV_CORE", "COVERAGE")
        kept = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
        return {**kept, "CC": "false", "HOME": str(self.home), **extra}

    def run(self, *args: str, **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.python), *args], capture_output=True, text=True, env=self.env(**extra), cwd=self.root, timeout=180
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("wheel")
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(REPO), "--no-deps", "-w", str(wheels)], check=True, timeout=600)
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=120)
    (wheel,) = wheels.glob("jitrelay-*.whl")
    venv_pip = [str(root / "venv" / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*venv_pip, "install", str(wheel)], check=True, timeout=600, cwd=root)
    made = Installed(root, wheel)
    made.home.mkdir()
    yield made


@pytest.mark.timeout(900)
def test_the_wheel_is_tagged_for_its_platform_and_carries_the_module(installed: Installed) -> None:
    wheel = installed.wheel
    assert not wheel.name.endswith("-none-any.whl") and f"-cp{sys.version_info[0]}{sys.version_info[1]}-" in wheel.name
    done = installed.run("-c", "from jitrelay.kernels import build; print(build.packaged_path())")
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).is_file() and str(installed.root / "venv") in done.stdout


@pytest.mark.timeout(900)
def test_the_installed_relay_serves_at_once_without_compiler_cache_or_numba(installed: Installed) -> None:
    done = installed.run(str(FIRST_MESSAGE), "market_data")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)

    assert f"(aot: {installed.root / 'venv'}" in report["kernels"] and "_compiled" in report["kernels"], report
    assert report["numba_mapped"] is False, report
    assert report["warnings"] == [], report
    assert report["seconds_to_first_message"] < 5.0, report  # 0.2 s on an idle 2-core machine
    assert report["rss_mib"] < 60, report
    assert list(installed.home.iterdir()) == []  # no cache folder made

    code = "import json, sys; from jitrelay import kernels; kernels.backend(); print(json.dumps(sorted(sys.modules)))"
    modules = installed.run("-c", code)
    assert modules.returncode == 0, modules.stderr
    assert not [name for name in json.loads(modules.stdout) if name.split(".")[0] in ("numba", "llvmlite")]


@pytest.mark.timeout(900)
def test_a_packaged_module_built_from_other_loops_is_refused_and_the_fallback_says_why(installed: Installed) -> None:
    find = installed.run("-c", "from jitrelay.kernels import loops; print(loops.__file__)", NUMBA_DISABLE_JIT="1")
    loops = Path(find.stdout.strip())
    original = loops.read_text()
    try:
        loops.write_text(original + "\n# changed after the wheel was built\n")
        done = installed.run("-m", "jitrelay", "kernels")
    finally:
        loops.write_text(original)

    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith("jit ")
    assert "was built from other loops or for other numba/numpy versions than these" in done.stderr
    assert "building the kernels now with numba and the C compiler" in done.stderr  # announced, then it failed
    assert "compiling them with numba in this process instead" in done.stderr and "MiB more resident" in done.stderr


@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("objdump") is None or platform.machine() != "x86_64", reason="needs objdump, x86_64")
def test_the_packaged_module_uses_no_instructions_beyond_the_baseline_cpu(installed: Installed) -> None:
    """Built for LLVM's generic x86-64, not the build host: no AVX registers, which older hosts lack."""
    done = installed.run("-c", "from jitrelay.kernels import build; print(build.packaged_path())")
    code = subprocess.run(["objdump", "-d", done.stdout.strip()], capture_output=True, text=True, check=True).stdout
    assert "_compiled" in done.stdout and code.count("\n") > 1000
    assert not re.search(r"%[yz]mm\d", code), "AVX/AVX-512 registers in a module meant for any x86-64 host"
