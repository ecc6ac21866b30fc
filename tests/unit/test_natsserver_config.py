"""The nats-server configs this project writes fsync every write (README "Durability").

NATS's default fsyncs every 2 minutes, which lost acknowledged writes under power loss in
Jepsen's 2025 analysis of NATS 2.12: `dev`, the test servers and the test clusters all
render `sync_interval: always` inside their `jetstream {}` block.
"""

from __future__ import annotations

import re
from pathlib import Path

from secrets_nats_kv.app import dev
from secrets_nats_kv.app.natsserver import ClusterConfig, NatsServerConfig


def jetstream_block(text: str) -> str:
    match = re.search(r"^jetstream \{\n(.*?)^\}", text, flags=re.M | re.S)
    assert match, text
    return match.group(1)


def test_a_single_server_syncs_every_write(tmp_path: Path) -> None:
    config = NatsServerConfig.in_dir(tmp_path, server_name="one")
    assert "  sync_interval: always\n" in jetstream_block(config.render())


def test_dev_server_syncs_every_write_and_writes_its_pid_file(tmp_path: Path) -> None:
    text = dev.server_config(tmp_path, "127.0.0.1", 4222).render()
    assert "  sync_interval: always\n" in jetstream_block(text)
    assert f'pid_file: "{tmp_path / "nats" / dev.PID_FILE}"' in text


def test_a_cluster_node_syncs_every_write(tmp_path: Path) -> None:
    node = NatsServerConfig.in_dir(
        tmp_path, server_name="n1", cluster=ClusterConfig(name="c", port=6222, routes=())
    )
    assert "  sync_interval: always\n" in jetstream_block(node.render())


def test_the_test_clusters_use_the_default(tmp_path: Path) -> None:
    source = (Path(__file__).parents[1] / "support" / "cluster.py").read_text()
    assert "sync_always" not in source  # nothing there turns it off
