"""The local cluster's layout and broker configuration (no JVM needed)."""

from __future__ import annotations

import pytest

from infra.localkafka import BrokerState, LocalKafka


def test_a_single_broker_keeps_its_layout_and_replication_one(tmp_path):
    broker = LocalKafka(tmp_path, 35092, 35093)
    [node] = broker.nodes()
    assert (node.node_id, node.port, node.controller_port, node.data_dir) == (1, 35092, 35093, broker.data_dir)
    props = broker._render_properties(node).read_text()
    assert "node.id=1\n" in props and "controller.quorum.voters=1@127.0.0.1:35093\n" in props
    assert "min.insync.replicas=1\n" in props and "default.replication.factor=1\n" in props
    assert "broker.session.timeout.ms" not in props
    assert broker.replication == 1


def test_three_brokers_form_one_quorum_with_replication_three_and_two_in_sync(tmp_path):
    cluster = LocalKafka(tmp_path, 35094, 35095, brokers=3)
    nodes = cluster.nodes()
    assert [(n.node_id, n.port, n.controller_port) for n in nodes] == [
        (1, 35094, 35095), (2, 35096, 35097), (3, 35098, 35099)]
    assert len({n.data_dir for n in nodes}) == 3
    for node in nodes:
        props = cluster._render_properties(node).read_text()
        assert f"node.id={node.node_id}\n" in props
        assert "controller.quorum.voters=1@127.0.0.1:35095,2@127.0.0.1:35097,3@127.0.0.1:35099\n" in props
        assert f"listeners=PLAINTEXT://127.0.0.1:{node.port},CONTROLLER://127.0.0.1:{node.controller_port}" in props
        for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                    "default.replication.factor"):
            assert f"{key}=3\n" in props
        assert "min.insync.replicas=2\n" in props and "transaction.state.log.min.isr=2\n" in props
    assert cluster.replication == 3
    assert cluster.node_of_port(35096) == 2


def test_the_node_count_comes_back_from_the_state_file(tmp_path):
    cluster = LocalKafka(tmp_path, 35094, 35095, brokers=3)
    cluster._write_state(BrokerState("apache", 11, "127.0.0.1:35094", "3.9.1", 0.0,
                                     [{"node_id": i, "pid": 10 + i, "port": 35092 + 2 * i,
                                       "controller_port": 35093 + 2 * i} for i in (1, 2, 3)]))
    assert LocalKafka(tmp_path, 35094, 35095).brokers == 3  # e.g. the chaos system, started without --brokers
    assert not LocalKafka(tmp_path, 35094, 35095).status().running


def test_invalid_cluster_requests_are_refused(tmp_path):
    with pytest.raises(ValueError, match="brokers=0"):
        LocalKafka(tmp_path, brokers=0)


def test_cluster_ids_never_start_with_a_dash():
    """StorageTool would read ``-t -abc...`` as an option and refuse to format (1 id in 64 did)."""
    from infra.localkafka import _cluster_id

    ids = [_cluster_id() for _ in range(3000)]
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == len(ids)
