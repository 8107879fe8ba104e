"""README.md's Python blocks, run as pasted against a live broker (only its URL changed to the test's).

Every fenced ``python`` block must be claimed by one of these tests (the first test checks that), so an example
added to the README without a test, or changed so that it no longer runs, fails the suite.
"""

from __future__ import annotations

import ast
import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trustme

import replika
from tests.conftest import WAIT, RunningServer, serving
from tests.tokens import ADMIN

README = Path(__file__).resolve().parent.parent / "README.md"
DEFAULT_URL = "replika://127.0.0.1:8777"


def blocks() -> list[tuple[str | None, str]]:
    """Each ``python`` block of the README as (the file name it is labelled with, ``name.py``: on the line
    before it, else None; its code)."""
    found = []
    label = None
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
            if line.strip() == "```python":
                found.append((label, "\n".join(lines[i + 1 : end]) + "\n"))
            i, label = end + 1, None
            continue
        if line.strip():
            m = re.fullmatch(r"`([\w.]+\.py)`:", line.strip())
            label = m.group(1) if m else None
        i += 1
    return found


def shell_line(after: str, prefix: str) -> str:
    """The first line starting with ``prefix`` in the README's first ``sh`` block after the block labelled
    ``after`` (the commands a reader runs with that file)."""
    text = README.read_text()
    start = text.index(f"`{after}`:")
    sh = text.index("```sh", start)
    body = text[sh : text.index("```", sh + 5)]
    return next(line for line in body.splitlines() if line.startswith(prefix))


def programs() -> list[str]:
    return [c for label, c in blocks() if label is None and ("asyncio.run(" in c or "replika.Client(" in c)]


def fragments() -> list[str]:
    return [code for label, code in blocks() if label is None and _awaits_at_top_level(code)]


def _awaits_at_top_level(code: str) -> bool:
    try:
        ast.parse(code)
    except SyntaxError:
        return False
    try:
        compile(code, "<readme>", "exec")
    except SyntaxError:
        return True
    return False


def tls_block() -> str:
    [code] = [code for label, code in blocks() if "replikas://" in code and "load_cert_chain" in code]
    return code


def test_every_python_block_is_run_by_a_test() -> None:
    every = blocks()
    claimed = [c for label, c in every if label] + programs() + fragments() + [tls_block()]
    assert len(every) >= 10
    assert [c for _, c in every if c not in claimed] == []


async def run(code: str, url: str, cwd: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run ``code`` (README's URL replaced by ``url``) as a script in ``cwd``; bounded."""
    script = cwd / "snippet.py"
    script.write_text(code.replace(DEFAULT_URL, url))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), *args, cwd=cwd, env=_env(cwd), stdout=-1, stderr=-1
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin), WAIT * 2)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def _env(cwd: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(cwd))


async def _until(what: str, check: Any) -> None:
    """Poll ``check()`` (a coroutine function) until it is true: another process acts, with nothing to await."""
    deadline = time.monotonic() + WAIT
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------------------------- the SDK's examples
async def test_the_async_example_consumes_until_interrupted(server: RunningServer, tmp_path: Path) -> None:
    [code] = [c for c in programs() if "client.consume(" in c and "AsyncClient" in c]
    script = tmp_path / "example.py"
    script.write_text(code.replace(DEFAULT_URL, server.url))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), cwd=tmp_path, env=_env(tmp_path), stdout=-1, stderr=-1
    )
    try:
        assert proc.stdout is not None
        sent = [await asyncio.wait_for(proc.stdout.readline(), WAIT) for _ in range(4)]
        assert sent == [
            b'sending b\'{"to": "ada@example.com"}\'\n',
            b"sending b'a'\n",
            b"sending b'b'\n",
            b"sending b'c'\n",
        ]
        async with replika.AsyncClient(server.url) as client:

            async def all_acked() -> bool:
                return (await client.stats("emails"))["total"] == 0

            await _until("the example's acks", all_acked)
        proc.send_signal(signal.SIGINT)  # the README says: the loop runs for ever, Ctrl-C ends it
        _, err = await asyncio.wait_for(proc.communicate(), WAIT)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert err.decode().splitlines()[-1] == "KeyboardInterrupt"  # Python's own way out of asyncio.run()


async def test_the_blocking_example_runs(server: RunningServer, tmp_path: Path) -> None:
    [code] = [c for c in programs() if "replika.Client(" in c]
    rc, out, err = await run(code, server.url, tmp_path)
    assert rc == 0, err
    assert out.splitlines()[0] == "resizing b'resize:42'"
    assert "'total': 0" in out.splitlines()[1]


async def test_the_fragments_run_in_order_on_one_client(
    server: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    async with replika.AsyncClient(server.url) as client:
        await client.publish_many("jobs", [b"job-%d" % i for i in range(15)])  # for the settling and batch loops
        namespaces = []
        for code in fragments():
            namespace: dict[str, Any] = {"client": client, "replika": replika}
            compiled = compile(code, "<README.md>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
            result = eval(compiled, namespace)
            if asyncio.iscoroutine(result):
                await asyncio.wait_for(result, WAIT)
            namespaces.append(namespace)
        options = next(ns for ns in namespaces if "mid" in ns)
        assert (options["first"].payload, options["second"].payload) == (b"ping-customer", b"charge:42")
        assert "charge:42" in capsys.readouterr().out  # the peek of billing.dlq showed the rejected one
        assert (await client.stats("jobs"))["total"] == 0  # the loops fetched and acked every job
        assert (await client.stats("billing.dlq"))["total"] == 0  # redriven
        assert (await client.stats("audit"))["total"] == 1 and (await client.stats("eu-orders"))["total"] == 1


async def test_the_tls_example_connects_to_a_tls_broker_with_a_token(tmp_path: Path, auth_file: Path) -> None:
    ca = trustme.CA()
    server_cert = ca.issue_cert("localhost")
    client_cert = ca.issue_cert("worker@example.com")
    server_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    client_cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    config = {
        "tls_cert": tmp_path / "server.pem",
        "tls_key": tmp_path / "server.pem",
        "tls_client_ca": tmp_path / "ca.pem",
    }
    async with serving(tmp_path / "data", auth=auth_file, **config) as srv:
        code = tls_block().replace("broker.internal:8777", f"localhost:{srv.port}")
        code += "\n\nasync def main() -> None:\n    async with client:\n        print(await client.ping())\n\n"
        code += "asyncio.run(main())\n"
        code = "import asyncio\n" + code
        script = tmp_path / "tls.py"
        script.write_text(code)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            cwd=tmp_path,
            env=dict(_env(tmp_path), REPLIKA_TOKEN=ADMIN),
            stdout=-1,
            stderr=-1,
        )
        out, err = await asyncio.wait_for(proc.communicate(), WAIT)
    assert proc.returncode == 0, err.decode()
    assert out.strip()


# ----------------------------------------------------------------------------------------------- the frameworks' files
def write_files(tmp_path: Path, url: str) -> None:
    for label, code in blocks():
        if label:
            (tmp_path / label).write_text(code.replace(DEFAULT_URL, url))


async def _python_c(tmp_path: Path, line: str) -> None:
    """Run a README ``python -c '...'`` line in ``tmp_path``."""
    m = re.fullmatch(r"python -c '(.*)'", line.split("  #")[0].strip())
    assert m, line
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", m.group(1), cwd=tmp_path, env=_env(tmp_path), stdout=-1, stderr=-1
    )
    _, err = await asyncio.wait_for(proc.communicate(), WAIT * 2)
    assert proc.returncode == 0, err.decode()


async def _counts(url: str, queue: str) -> tuple[int, int]:
    async with replika.AsyncClient(url) as client:
        stats = await client.stats(queue)
    return stats["total"], stats["delayed"]


async def test_the_celery_demo_sends_its_tasks(server: RunningServer, tmp_path: Path) -> None:
    write_files(tmp_path, server.url)
    await _python_c(tmp_path, shell_line("celery_demo.py", "python -c"))
    assert await _counts(server.url, "celery") == (3, 1)  # one with a countdown of a minute


async def test_the_dramatiq_demo_sends_its_messages(server: RunningServer, tmp_path: Path) -> None:
    write_files(tmp_path, server.url)
    await _python_c(tmp_path, shell_line("dramatiq_demo.py", "python -c"))
    assert await _counts(server.url, "default") == (3, 1)


async def test_the_taskiq_sender_runs(server: RunningServer, tmp_path: Path) -> None:
    write_files(tmp_path, server.url)
    assert shell_line("taskiq_send.py", "python ") == "python taskiq_send.py"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "taskiq_send.py", cwd=tmp_path, env=_env(tmp_path), stdout=-1, stderr=-1
    )
    _, err = await asyncio.wait_for(proc.communicate(), WAIT * 2)
    assert proc.returncode == 0, err.decode()
    assert await _counts(server.url, "taskiq") == (3, 1)
