"""A node's claim to hold a client is bound to its key (mira.federation.identity and the
server's first contact, mira.federation.server.identify).

Flower binds a node id to the key the SuperNode signs its requests with and reports that key
to the ServerApp (``NodeInfo.public_key``); the client table says which key holds which
partition-id. Here the keys are made with ``cryptography`` and the Grid is a stand-in that
answers as the ClientApp does, so every message each node received can be checked.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import Message
from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=E0611
from flwr.supercore.primitives.asymmetric import public_key_to_bytes
from flwr.supercore.task_identity import TaskIdentity

from mira.config import ConfigError
from mira.federation import codec
from mira.federation.identity import canonical_key, client_table, read_client_table
from mira.federation.messages import Identity, client_view
from mira.federation.progress import Progress
from mira.federation.server import Link, identify


def make_key() -> ec.EllipticCurvePublicKey:
    """A SuperNode's key, as `ssh-keygen -t ecdsa -b 384` makes it."""
    return ec.generate_private_key(ec.SECP384R1()).public_key()


def openssh(key: ec.EllipticCurvePublicKey) -> str:
    """The key's .pub text."""
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode()


def stored(key: ec.EllipticCurvePublicKey) -> bytes:
    """The key as the SuperLink stores it and the Grid reports it (Flower's own encoding)."""
    return public_key_to_bytes(key)


def write_table(folder: Path, entries: dict[str, str]) -> Path:
    path = folder / "node_keys.toml"
    path.write_text("".join(f"{name} = {json.dumps(value)}\n" for name, value in entries.items()))
    return path


@pytest.fixture
def keys() -> list[ec.EllipticCurvePublicKey]:
    return [make_key() for _ in range(3)]


@pytest.fixture
def table_path(tmp_path: Path, keys) -> Path:
    """Partition 0 by its .pub file (relative to the table), partition 1 by the key's text."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "supernode-0.pub").write_text(openssh(keys[0]) + "\n")
    return write_table(tmp_path, {"0": "keys/supernode-0.pub", "1": openssh(keys[1])})


# ---------------------------------------------------------------------------- the table


def test_the_table_holds_each_key_as_the_superlink_stores_it(table_path, keys):
    table = read_client_table(table_path, 2)
    assert table.keys == {0: stored(keys[0]), 1: stored(keys[1])}
    assert canonical_key(openssh(keys[2]).encode()) == stored(keys[2])
    assert canonical_key(stored(keys[2])) == stored(keys[2])


def test_a_nodes_own_key_claiming_its_own_partition_is_accepted(table_path, keys):
    table = read_client_table(table_path, 2)
    assert table.claim_problem(0, stored(keys[0])) is None
    assert table.claim_problem(1, stored(keys[1])) is None


def test_a_valid_key_claiming_another_partition_is_refused(table_path, keys):
    table = read_client_table(table_path, 2)
    problem = table.claim_problem(1, stored(keys[0]))
    assert problem == f"its key is the one {table_path} binds to partition-id 0, not to 1"
    assert table.claim_problem(0, stored(keys[1])) is not None


def test_a_registered_key_outside_the_table_is_refused(table_path, keys):
    table = read_client_table(table_path, 2)
    assert table.claim_problem(0, stored(keys[2])) == f"its key is not in {table_path}"


def test_a_node_without_a_key_is_refused(table_path):
    # The Simulation Engine registers its nodes with random bytes for a key.
    problem = read_client_table(table_path, 2).claim_problem(0, secrets.token_bytes(32))
    assert problem is not None and "knows no public key" in problem


@pytest.mark.parametrize(
    ("entries", "says"),
    [
        ({"0": "keys/supernode-0.pub"}, "binds no key to partition-id 1"),
        ({"0": "keys/supernode-0.pub", "1": "keys/supernode-0.pub"}, "the same key"),
        ({"0": "keys/supernode-0.pub", "1": "keys/missing.pub"}, "cannot read the public key"),
        ({"0": "keys/supernode-0.pub", "1": "ssh-rsa AAAAB3Nza"}, "is not an EC public key"),
        ({"0": "keys/supernode-0.pub", "1": "keys/supernode-0.pub", "2": "x"}, "not a partition"),
        ({"zero": "keys/supernode-0.pub"}, "'zero' is not a partition-id"),
    ],
)
def test_a_bad_table_is_one_error_naming_the_entry(tmp_path, table_path, entries, says):
    bad = write_table(tmp_path, entries)
    with pytest.raises(ConfigError, match=says):
        read_client_table(bad, 2)


def test_a_missing_or_broken_table_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"federation\.node_keys = .*cannot read it"):
        read_client_table(tmp_path / "nowhere.toml", 2)
    (tmp_path / "broken.toml").write_text("0 = \n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        read_client_table(tmp_path / "broken.toml", 2)


def test_the_table_is_the_servers_and_never_reaches_a_client(tiny_config, table_path):
    cfg = tiny_config(f"federation.node_keys={table_path}", clients=1)
    assert client_table(cfg) is not None
    assert json.loads(client_view(cfg, 0))["federation"]["node_keys"] == ""
    assert client_table(tiny_config(clients=1)) is None


# ---------------------------------------------------------------------------- first contact


@pytest.fixture(autouse=True)
def server_task(monkeypatch):
    """The identity of a ServerApp's task, which Flower stamps on every message it makes."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class Nodes:
    """A Grid whose nodes answer as the ClientApp does: the partition-id they claim, then,
    given a config view, their identity. Records every message each node received."""

    def __init__(self, nodes: dict[int, tuple[bytes, int]]):
        self.nodes = nodes  # node id -> (the key the SuperLink knows it by, its partition-id)
        self.received: dict[int, list[Message]] = defaultdict(list)
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def get_nodes(self) -> list[NodeInfo]:
        return [NodeInfo(node_id=n, public_key=key) for n, (key, _) in self.nodes.items()]

    def push_messages(self, messages: list[Message]) -> list[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            node = message.metadata.dst_node_id
            self.received[node].append(message)
            self.replies[message.metadata.message_id] = self.answer(node, message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: list[str]) -> list[Message]:
        return [self.replies.pop(mid) for mid in message_ids if mid in self.replies]

    def answer(self, node: int, message: Message) -> Message:
        request = codec.decode_identify(message)
        if request is None:
            return codec.encode_who_reply(message, self.nodes[node][1])
        return codec.encode_identity(
            message, Identity(client_id=f"client-{request.partition}", node_id=node)
        )

    def views(self, node: int) -> list[int]:
        """The partition-ids whose config view the node was sent."""
        return [v[1] for m in self.received[node] if (v := codec.request_view(m)) is not None]


def first_contact(cfg, grid: Nodes, table_path: Path | None):
    lines: list[str] = []
    table = None if table_path is None else read_client_table(table_path, cfg.num_clients)
    link = Link(grid, cfg, Progress(write=lines.append, heartbeat=None), table)  # type: ignore[arg-type]
    found, problems = identify(link, cfg, sorted(grid.nodes), False, "identify")
    return link, found, problems, lines


def test_a_node_claiming_another_nodes_partition_is_refused_and_sent_no_config(
    tiny_config, table_path, keys
):
    cfg = tiny_config(clients=1)  # 2 clients: polarity-0, subject-0
    # Node 30 holds a registered key of its own and says it holds partition-id 0.
    grid = Nodes({10: (stored(keys[0]), 0), 20: (stored(keys[1]), 1), 30: (stored(keys[2]), 0)})
    _, found, problems, lines = first_contact(cfg, grid, table_path)

    assert sorted(found) == [10, 20]
    assert grid.views(10) == [0] and grid.views(20) == [1]
    assert len(grid.received[30]) == 1 and grid.views(30) == []  # the "who" query only
    refusal = (
        f"node 30 claims partition-id 0 (client polarity-0), but its key is not in "
        f"{table_path}; refused: it gets no config and no adapter"
    )
    assert lines == [refusal]
    assert problems[30].status == "rejected" and problems[30].reason == refusal


def test_a_node_swapping_partitions_with_its_key_is_refused(tiny_config, table_path, keys):
    cfg = tiny_config(clients=1)
    grid = Nodes({10: (stored(keys[0]), 1), 20: (stored(keys[1]), 1)})
    _, found, problems, lines = first_contact(cfg, grid, table_path)
    assert sorted(found) == [20] and grid.views(10) == []
    assert list(problems) == [10]
    assert lines == [
        f"node 10 claims partition-id 1 (client subject-0), but its key is the one "
        f"{table_path} binds to partition-id 0, not to 1; refused: it gets no config and no "
        "adapter"
    ]


def test_without_a_table_claims_stand_and_deployment_warns_once(tiny_config, keys):
    cfg = tiny_config(clients=1)
    grid = Nodes({10: (stored(keys[0]), 0), 20: (stored(keys[1]), 1), 30: (stored(keys[2]), 0)})
    link, found, problems, lines = first_contact(cfg, grid, None)
    assert sorted(found) == [10, 20, 30] and not problems  # today's behaviour
    assert len(lines) == 1
    assert lines[0].startswith("warning: client identities are not bound to SuperNode keys")
    assert "federation.node_keys" in lines[0]
    identify(link, cfg, [30], False, "identify newcomers")
    assert len(lines) == 1  # said once per run


def test_simulation_nodes_have_no_keys_and_nothing_changes(tiny_config, table_path):
    cfg = tiny_config(clients=1)
    grid = Nodes({10: (secrets.token_bytes(32), 0), 20: (secrets.token_bytes(32), 1)})
    _, found, problems, lines = first_contact(cfg, grid, None)
    assert sorted(found) == [10, 20] and not problems and lines == []
    # A table in simulation is one clear error, not a refusal of every node.
    with pytest.raises(ConfigError, match=r"leave federation\.node_keys empty in simulation"):
        first_contact(cfg, grid, table_path)


def test_mira_run_refuses_a_client_table_before_loading_anything(tiny_config, monkeypatch):
    from mira.federation import simulation

    def refuse(*args, **kwargs):
        raise AssertionError("data or model loaded")

    monkeypatch.setattr(simulation, "load_client_data", refuse)
    monkeypatch.setattr(simulation, "check_model", refuse)
    with pytest.raises(ConfigError, match=r"federation\.node_keys = 'keys\.toml' binds") as err:
        simulation.preflight(tiny_config("federation.node_keys=keys.toml"))
    assert "leave it empty for `mira run`" in str(err.value)


def test_a_replacement_key_put_in_the_table_while_the_run_goes_on_is_accepted(
    tiny_config, table_path, keys
):
    cfg = tiny_config(clients=1)
    grid = Nodes({10: (stored(keys[0]), 0), 20: (stored(keys[1]), 1)})
    link, found, _, _ = first_contact(cfg, grid, table_path)
    assert sorted(found) == [10, 20]
    # Client 1's machine died; its replacement has a new key, put in the table before it starts.
    write_table(table_path.parent, {"0": "keys/supernode-0.pub", "1": openssh(keys[2])})
    grid.nodes[30] = (stored(keys[2]), 1)
    found, problems = identify(link, cfg, [30], False, "identify newcomers")
    assert list(found) == [30] and not problems and grid.views(30) == [1]
    # A table that no longer reads leaves the last good one in force, and the run says so.
    table_path.write_text("0 = \n")
    grid.nodes[40] = (stored(keys[1]), 1)  # the old key: no longer bound
    lines: list[str] = []
    link.progress = Progress(write=lines.append, heartbeat=None)
    found, problems = identify(link, cfg, [40], False, "identify newcomers")
    assert not found and list(problems) == [40] and grid.views(40) == []
    assert "is not valid TOML" in lines[0] and "read before stays in force" in lines[0]
    assert lines[1].startswith("node 40 claims partition-id 1 (client subject-0), but its key")
