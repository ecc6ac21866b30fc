"""The harness of the benchmarks that time one job on one fresh nats-server.

`bench_replay` and `bench_import` each start their own server in a temporary folder,
time the phases of one job, print a table of seconds and rates and write the numbers
with the machine they ran on; this is that frame, so the two differ only in the job.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
from nats.aio.client import Client as NATS

from secrets_nats_kv.app.natsserver import NatsServer, NatsServerConfig
from secrets_nats_kv.config import NatsOptions
from secrets_nats_kv.nats.connection import connect

Measure = Callable[[NATS], Awaitable[dict[str, Any]]]


def run_on_a_fresh_server(server_name: str, measure: Measure) -> dict[str, Any]:
    """`measure` on a connection to a nats-server of its own, in a folder removed after."""
    # SIGTERM unwinds like Ctrl-C, so the nats-server this started is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix=f"{server_name}-") as workdir:
        return anyio.run(_on_server, Path(workdir), server_name, measure)


async def _on_server(workdir: Path, server_name: str, measure: Measure) -> dict[str, Any]:
    server = NatsServer(NatsServerConfig.in_dir(workdir / "nats", server_name=server_name))
    server.start()
    try:
        nc = await connect(NatsOptions(servers=(server.url,)), name="bench", persistent=False)
        try:
            return await measure(nc)
        finally:
            await nc.close()
    finally:
        server.stop()


def rate_table(
    heading: str, rows: Sequence[tuple[str, str]], results: dict[str, Any], unit: str, width: int
) -> str:
    """`heading`, then a line per (label, key): the step's seconds and `{unit}_per_s`."""
    lines = [heading, f"{'step':<{width}}{'seconds':>10}{unit + '/s':>12}"]
    for label, key in rows:
        row = results[key]
        rate = row[f"{unit}_per_s"]
        lines.append(f"{label:<{width}}{row['seconds']:>10.2f}{rate:>12,.0f}")
    return "\n".join(lines)


def report(results: dict[str, Any], table: str, output: Path) -> None:
    """Print `table`, and write `results` with the machine they were measured on."""
    results["machine"] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }
    print(table)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {output}")
