"""Which SuperNode may hold which client: the client table of ``federation.node_keys``.

A node says which client it holds by its ``partition-id``; nothing in that claim proves it.
What Flower does prove is the node's key: on the Deployment Engine every request a SuperNode
makes is signed with its private key, the SuperLink serves a node id's messages only to the
holder of the key registered for that id, and the ServerApp's Grid reports each node id's
public key (``NodeInfo.public_key``). The client table names, for every partition-id, the
public key of the SuperNode that holds it (the ``.pub`` file registered with
``flwr supernode register``). The server accepts a node's claim only when the node's key is the
one the table gives for the partition it claims, before anything of that client's config is
sent to it (docs/design.md, "Faults and trust").

The Simulation Engine's nodes carry no key (random bytes stand in): there is nothing to bind,
and nothing changes.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from mira.config import Config, ConfigError

TABLE_KEY = "federation.node_keys"
HOW_TO_BIND = (
    f"bind them with {TABLE_KEY} = a TOML file of partition-id = the SuperNode's public key "
    "file (README, 'Many machines')"
)
_KEY_TEXT = ("ecdsa-", "ssh-", "-----BEGIN")  # how an OpenSSH or a PEM public key starts


def canonical_key(data: bytes) -> bytes | None:
    """An EC public key (OpenSSH text, as ssh-keygen writes the ``.pub`` file, or PEM) in the
    form the SuperLink stores it (PEM SubjectPublicKeyInfo); None when ``data`` is no EC
    public key (a Simulation Engine node's random bytes)."""
    text = data.strip()
    try:
        if text.startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(text)
        else:
            key = serialization.load_ssh_public_key(text)
    except (ValueError, UnsupportedAlgorithm):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return None
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def node_has_key(public_key: bytes) -> bool:
    """Whether the SuperLink knows a node by a public key (the Deployment Engine)."""
    return canonical_key(public_key) is not None


@dataclass(frozen=True)
class ClientTable:
    """partition-id -> the public key of the SuperNode that holds it (canonical form)."""

    source: Path
    keys: dict[int, bytes]

    def claim_problem(self, partition: int, public_key: bytes) -> str | None:
        """Why a node the SuperLink knows by ``public_key`` may not hold client ``partition``,
        or None when the table binds that key to that partition."""
        key = canonical_key(public_key)
        if key is None:
            return (
                "the SuperLink knows no public key for it (Simulation Engine nodes have none; "
                f"{TABLE_KEY} is for the Deployment Engine)"
            )
        if self.keys.get(partition) == key:
            return None
        bound = [p for p, k in self.keys.items() if k == key]
        if bound:
            return (
                f"its key is the one {self.source} binds to partition-id {bound[0]}, "
                f"not to {partition}"
            )
        return f"its key is not in {self.source}"


def _read_key(value: object, partition: str, table: Path) -> bytes:
    """One entry's public key: its text, or the file it names (relative to the table's
    folder)."""
    where = f"{table}: partition-id {partition}"
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where} must be a public key file or its text, got {value!r}")
    if value.strip().startswith(_KEY_TEXT):
        data, what = value.encode(), "its text"
    else:
        path = (table.parent / value).expanduser()
        try:
            data, what = path.read_bytes(), str(path)
        except OSError as err:
            raise ConfigError(
                f"{where}: cannot read the public key file {path} ({err.strerror}); give the "
                "path of the .pub file registered with `flwr supernode register` (relative to "
                "the table's folder) or the key's text"
            ) from err
    key = canonical_key(data)
    if key is None:
        raise ConfigError(
            f"{where}: {what} is not an EC public key (make one with "
            '`ssh-keygen -t ecdsa -b 384 -N "" -C "" -f keys/supernode-0` and give the .pub file)'
        )
    return key


def read_client_table(path: str | Path, num_clients: int) -> ClientTable:
    """The client table at ``path``: one entry per partition-id 0..num_clients - 1, each the
    path of the SuperNode's public key file (relative to the table's folder) or its text::

        0 = "keys/supernode-0.pub"
        1 = "ecdsa-sha2-nistp384 AAAAE2VjZHNh..."

    Every error names the table, the entry and what to do.
    """
    table = Path(path).expanduser()
    try:
        raw = tomllib.loads(table.read_text())
    except OSError as err:
        raise ConfigError(
            f"{TABLE_KEY} = {str(path)!r}: cannot read it ({err.strerror}); give a TOML file "
            "of partition-id = the SuperNode's public key file (relative paths from the folder "
            "the server runs in)"
        ) from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{TABLE_KEY} = {str(path)!r} is not valid TOML: {err}") from err
    keys: dict[int, bytes] = {}
    for name, value in raw.items():
        if not name.isdigit() or int(name) >= num_clients:
            raise ConfigError(
                f"{table}: {name!r} is not a partition-id of this config's {num_clients} "
                f"clients (0..{num_clients - 1})"
            )
        keys[int(name)] = _read_key(value, name, table)
    missing = [p for p in range(num_clients) if p not in keys]
    if missing:
        raise ConfigError(
            f"{table} binds no key to partition-id {', '.join(map(str, missing))}: every client "
            "of the config needs its SuperNode's public key"
        )
    holders: dict[bytes, int] = {}
    for partition, key in sorted(keys.items()):
        if key in holders:
            raise ConfigError(
                f"{table} gives partition-id {holders[key]} and {partition} the same key: each "
                "SuperNode holds one client and has its own key"
            )
        holders[key] = partition
    return ClientTable(table, keys)


def client_table(cfg: Config) -> ClientTable | None:
    """The client table ``federation.node_keys`` names (a path on the server, relative to the
    folder the server runs in), or None when it names none."""
    if not cfg.federation.node_keys:
        return None
    return read_client_table(cfg.federation.node_keys, cfg.num_clients)
