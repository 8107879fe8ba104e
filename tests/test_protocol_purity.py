"""replika_protocol stays sans-IO: importing it pulls in no event loop, sockets, storage or server code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import WAIT

FORBIDDEN = ("asyncio", "socket", "lmdb", "uvloop", "replika_server", "replika")

_PROBE = """
import json, sys
before = set(sys.modules)
import replika_protocol
import replika_protocol.errors, replika_protocol.framing, replika_protocol.limits, replika_protocol.ops
print(json.dumps({"before": sorted(before), "after": sorted(sys.modules)}))
"""


def run_probe(code: str, cwd: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=WAIT, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def modules(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Module names loaded in a fresh interpreter before and after importing replika_protocol."""
    out = run_probe(_PROBE, tmp_path_factory.mktemp("cwd"))
    result: dict[str, list[str]] = json.loads(out)
    return result


@pytest.mark.parametrize("name", FORBIDDEN)
def test_import_pulls_in_no_io_or_server_modules(modules: dict[str, list[str]], name: str) -> None:
    loaded = [m for m in modules["after"] if m == name or m.startswith(name + ".")]
    assert not loaded, f"importing replika_protocol loaded {loaded}"


def test_import_uses_only_stdlib_and_msgpack(modules: dict[str, list[str]]) -> None:
    new = {m.split(".")[0] for m in set(modules["after"]) - set(modules["before"])}
    third_party = {m for m in new - set(sys.stdlib_module_names) if not m.startswith("_")}
    assert third_party <= {"msgpack", "replika_protocol", "cython_runtime"}, third_party


def test_no_top_level_protocol_package_is_installed(tmp_path: Path) -> None:
    # Run outside the repository, so that the repo root on sys.path cannot make ``protocol/`` importable.
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('protocol')\n"
        "print('none' if spec is None else spec.origin)\n"
    )
    assert run_probe(code, tmp_path).strip() == "none"


def test_replika_protocol_is_the_protocol_directory(tmp_path: Path) -> None:
    code = "import replika_protocol, pathlib; print(pathlib.Path(replika_protocol.__file__).parent.name)"
    assert run_probe(code, tmp_path).strip() == "protocol"
