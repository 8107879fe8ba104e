"""The admin API against its own OpenAPI document: schemathesis (``st run --checks all``) fuzzes a live sidecar of
a real broker with --auth, with a fixed seed, and finds nothing. Every status, content type, header and body the
server answers must be documented, every request the schema allows must be accepted, every one it forbids
refused, and nothing may be a 5xx. Two deliberately broken sidecars show that the run does fail."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from replika_server.admin import errors, ops
from tests.conftest import WAIT, RunningServer, serving
from tests.tokens import ADMIN

#: Test cases per operation and phase: the whole run takes about 40 s on two cores.
MAX_EXAMPLES = 20
SEED = 1
#: Seconds the whole schemathesis run may take before the test fails.
RUN_LIMIT = 240.0

#: schemathesis.toml for these runs.
CONFIG = r"""
# One request at a time: with a fixed seed, the same cases in the same order, against one broker's state.
workers = 1
# The live feed never ends: the 'history' event and the first 'sample' are enough to check its events.
max-stream-events = 2

[parameters]
# A fetch may long-poll up to 60 s; fuzzing the wait would spend the run waiting.
"query.wait" = 0

# These create the queue they name (SPEC.md: publish and fetch create a missing queue; a redrive creates the
# queues it moves into). schemathesis counts only a POST to a deleted path, or to one of its prefixes, as making it
# again, so a publish to /api/queues/q/publish after DELETE /api/queues/q, followed by a read of q, reads to it as
# a deleted resource still being served. They take no part in the stateful scenarios; coverage and fuzzing keep
# testing them with every check.
[[operations]]
include-path-regex = '^/api/queues/\{queue\}/(publish|publish-batch|fetch|redrive)$'
phases.stateful.enabled = false
"""


async def schemathesis(srv: RunningServer, tmp_path: Path, *args: str) -> tuple[int, str]:
    """Run ``st run`` against ``srv``'s sidecar as the admin token; its exit code and output."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run"]
    cmd += [f"http://127.0.0.1:{srv.server.admin_port}/openapi.json", "--checks", "all", "--seed", str(SEED)]
    cmd += ["--header", f"Authorization: Bearer {ADMIN}", "--generation-database", "none"]
    cmd += ["--request-timeout", str(WAIT / 3), *args]
    # A child process: the broker serves it from this test's event loop meanwhile.
    proc = await asyncio.create_subprocess_exec(
        *cmd, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_LIMIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def test_the_admin_api_does_what_its_openapi_document_says(tmp_path: Path, auth_file: Path) -> None:
    async with serving(tmp_path / "d", admin_port=0, auth=auth_file) as srv:
        code, out = await schemathesis(srv, tmp_path, "--max-examples", str(MAX_EXAMPLES))
    tail = out[-6000:]
    assert code == 0, tail
    assert " passed" in tail and "Tested: 2" in tail, tail  # it did test the operations (21 today)


def _starlette_allow(request: Any) -> set[str]:
    return {"GET"}  # the methods of the path's first route only, as Starlette says by itself


def _broken_info(self: ops.Ops) -> Any:
    raise RuntimeError("deliberately broken")


@pytest.mark.parametrize(
    ("broken", "where", "path", "finding"),
    [
        (errors, "_methods", "/api/queues/{queue}", "Allow header mismatch"),
        (ops.Ops, "info", "/api/info", "Server error"),
    ],
)
async def test_a_deliberately_broken_sidecar_fails_the_run(
    tmp_path: Path, auth_file: Path, monkeypatch: pytest.MonkeyPatch, broken: Any, where: str, path: str, finding: str
) -> None:
    monkeypatch.setattr(broken, where, _starlette_allow if where == "_methods" else _broken_info)
    async with serving(tmp_path / "d", admin_port=0, auth=auth_file) as srv:
        code, out = await schemathesis(srv, tmp_path, "--max-examples", "5", "--include-path", path)
    assert code != 0 and finding in out, out[-6000:]
