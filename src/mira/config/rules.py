"""The server rules of mira as records: what every layer needs to know of a rule by its name.

One :class:`Rule` per rule, in :data:`RULES` (the order reports and plots list them); the
method list (:data:`mira.config.schema.METHODS`) derives from it. A rule's mixing matrix is
math and lives with the math, keyed by the same name (``mira.core.rules.MIXING``); adding a
rule is one record here and one matrix there (docs/design.md, "Server rules").
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Rule:
    """A server rule, as the config, the graph, the server and the reports see it.

    - ``name``: the value of ``server.method``;
    - ``uses_graph``: it reads the task graph (its edges or its clusters), so a fingerprint
      graph is built and refreshed for it;
    - ``uses_step``: it reads ``server.step`` (the pull's strength, or 'auto');
    - ``global_model``: every client receives one and the same model, so there is no pull
      toward neighbours for ``server.robust`` to bound;
    - ``exchanges``: clients send adapters to the server and receive the rule's result (false
      for a rule under which every client could keep its own adapter: the bytes a report
      counts for it are 0);
    - ``card``: what the rule leaves a client holding, the sentence that ends the model card's
      first paragraph.
    """

    name: str
    uses_graph: bool
    uses_step: bool
    global_model: bool
    card: str
    exchanges: bool = True


_RULES = (
    Rule(
        "mira",
        uses_graph=True,
        uses_step=True,
        global_model=False,
        card="after each round the server pulled every client's adapter toward its task-graph "
        "neighbours' adapters (MIRA's Laplacian regularisation), so each client holds its own.",
    ),
    Rule(
        "fedit",
        uses_graph=False,
        uses_step=False,
        global_model=True,
        card="after each round the server averaged all clients' adapters (FedIT): every client "
        "holds the same global adapter.",
    ),
    Rule(
        "cluster-fedavg",
        uses_graph=True,
        uses_step=False,
        global_model=False,
        card="after each round the server averaged the adapters within each cluster of the task "
        "graph: every client holds its cluster's adapter.",
    ),
    Rule(
        "cluster-merge",
        uses_graph=True,
        uses_step=False,
        global_model=True,
        card="after each round the server merged the clusters' averaged adapters into one: "
        "every client holds the same adapter.",
    ),
    Rule(
        "local",
        uses_graph=False,
        uses_step=False,
        global_model=False,
        card="the clients never communicated: this adapter saw this client's data only.",
        exchanges=False,
    ),
)

RULES: Mapping[str, Rule] = MappingProxyType({rule.name: rule for rule in _RULES})
"""Every server rule by name, in the order reports list them (read-only)."""
