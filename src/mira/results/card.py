"""The model card (README.md) of a shared adapter or merged model: pure text, no I/O.

A card opens with YAML metadata as Hugging Face's hub and peft's ``save_pretrained`` write it
(``base_model``, ``library_name``, ``tags``), then says what the weights are: the client and
its task, the base model and where its weights came from, the LoRA layout, the server rule
and task graph, the round, the client's **personalised** metrics of that round (its own
adapter on its own held-out split), how to load it, and the MIRA paper to cite.
:meth:`mira.results.rundir.RunWriter.append_round` writes one into every ``adapters/<client>/``
after each round; ``mira export`` copies it or writes the merged variant.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from mira.config import TASK_METRICS, Config
from mira.results.document import fmt

CITATION = """\
@article{elbakary2025mira,
  title   = {{MIRA}: A Method of Federated Multi-Task Learning for Large Language Models},
  author  = {Elbakary and Ben Issaid and ElBatt and Seddik and Bennis},
  note    = {arXiv:2410.15524},
  journal = {IEEE Networking Letters},
  volume  = {7},
  number  = {3},
  year    = {2025}
}"""

METRIC_NAMES = {
    "eval_loss": "eval loss (mean over target tokens)",
    "accuracy": "accuracy",
    "rouge_l": "ROUGE-L",
    "exact_match": "exact match",
    "token_f1": "token F1",
}

# What each server rule leaves a client holding (the README's "Why MIRA is not averaging").
RULES = {
    "mira": "after each round the server pulled every client's adapter toward its task-graph "
    "neighbours' adapters (MIRA's Laplacian regularisation), so each client holds its own.",
    "fedit": "after each round the server averaged all clients' adapters (FedIT): every client "
    "holds the same global adapter.",
    "cluster-fedavg": "after each round the server averaged the adapters within each cluster of "
    "the task graph: every client holds its cluster's adapter.",
    "cluster-merge": "after each round the server merged the clusters' averaged adapters into "
    "one: every client holds the same adapter.",
    "local": "the clients never communicated: this adapter saw this client's data only.",
}


def front_matter(fields: Mapping[str, str | Sequence[str]]) -> str:
    """YAML metadata between ``---`` lines; strings written as JSON strings (valid YAML)."""
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, str):
            lines.append(f"{key}: {json.dumps(value)}")
        else:
            lines.append(f"{key}:")
            lines += [f"- {json.dumps(item)}" for item in value]
    return "\n".join([*lines, "---"])


def model_card(
    cfg: Config,
    row: Mapping[str, Any],
    adapter_config: Mapping[str, Any],
    graph_source: str,
    base_note: str = "",
    merged: bool = False,
) -> str:
    """README.md for one client's adapter after round ``row["round"]``.

    ``row`` is the client's metrics.jsonl row of that round; ``adapter_config`` the adapter's
    peft ``adapter_config.json`` (its ``base_model_name_or_path`` is the portable name of the
    base); ``base_note`` says where the base weights came from when that matters (mira's
    dequantised GGUF copy, a locally built random model). ``merged``: the card of a model
    whose base weights have the LoRA update merged in (``mira export --merge``).
    """
    base = str(adapter_config.get("base_model_name_or_path") or cfg.model.name)
    client, task, server_round = str(row["client"]), str(row["task"]), int(row["round"])
    rank = int(adapter_config.get("r", row.get("rank", 0)))
    meta: dict[str, str | list[str]] = {"base_model": base}
    if merged:
        meta |= {"base_model_relation": "finetune", "library_name": "transformers"}
        tags = ["mira", "federated-learning", "lora", "transformers"]
        what = (
            f"The personalised model of client `{client}` (its LoRA adapter merged into the base)"
        )
    else:
        meta |= {"library_name": "peft"}
        tags = [
            f"base_model:adapter:{base}",
            "mira",
            "federated-learning",
            "lora",
            "peft",
            "transformers",
        ]
        what = f"The personalised LoRA adapter of client `{client}`"
    meta |= {"pipeline_tag": "text-generation", "tags": tags}
    modules = adapter_config.get("target_modules") or cfg.lora.target_modules
    modules = [modules] if isinstance(modules, str) else sorted(modules)
    scaling = "alpha / sqrt(r) (rsLoRA)" if cfg.lora.rslora else "alpha / r"
    rule = cfg.server.method
    if rule == "mira":
        rule += f", server.step = {cfg.server.step}"
    lines = [
        front_matter(meta),
        "",
        f"# {client}: {task}, personalised by federated multi-task learning (mira)",
        "",
        f"{what}, after round {server_round} of "
        f"{cfg.federation.rounds} of a federated run of mira with {cfg.num_clients} clients "
        f"(tasks {', '.join(sorted(set(cfg.client_tasks)))}). Every client fine-tuned a LoRA "
        f"adapter on its own data, which the server never saw; {RULES[cfg.server.method]}",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | `{base}` |",
    ]
    if base_note:
        lines.append(f"| base weights | {base_note} |")
    lines += [
        f"| task | `{task}` |",
        f"| LoRA | rank {rank}, alpha {cfg.lora.alpha:g} (scale {scaling}), dropout "
        f"{cfg.lora.dropout:g}, on {', '.join(f'`{m}`' for m in modules)} |",
        f"| server rule | {rule} |",
        f"| task graph | `{graph_source}` |",
        f"| round | {server_round} of {cfg.federation.rounds} "
        f"({cfg.federation.local_steps} local steps per round) |",
        f"| training examples | {cfg.data.train_size} of this client's |",
        "",
        f"## Personalised evaluation, round {server_round}",
        "",
        f"This client's adapter after the server rule of round {server_round}, on this "
        f"client's own held-out split ({cfg.data.eval_size} examples, never trained on):",
        "",
        "| metric | personalised value |",
        "| --- | --- |",
    ]
    measured = [m for m in ("eval_loss", *TASK_METRICS) if row.get(m) is not None]
    lines += [f"| {METRIC_NAMES[m]} | {fmt(row[m])} |" for m in measured]
    if row.get("mix_weight") is not None:
        lines.append(f"| mix weight (share taken from its neighbours) | {fmt(row['mix_weight'])} |")
    if not any(m in measured for m in TASK_METRICS):
        lines += [
            "",
            f"Task metrics were not measured in round {server_round}: mira measures them every "
            f"{cfg.federation.metrics_every} rounds (federation.metrics_every) and after the "
            "last.",
        ]
    if row.get("status", "ok") != "ok":
        lines += [
            "",
            f"In round {server_round} this client's update was not used ({row['status']}: "
            f"{row.get('reason', '')}); it kept its adapter.",
        ]
    lines += ["", "## How to load", "", "```python"]
    if merged:
        lines += [
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")',
        ]
    else:
        lines += [
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})",
            'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")',
        ]
    lines += ["```", ""]
    if not merged:
        lines += [
            '`AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")` also works: '
            "transformers reads `base_model_name_or_path` from `adapter_config.json`, loads "
            "that base and adds the adapter. To load the exact base the run trained on (mira's "
            "cached copy), or to get one standalone model, use "
            "`mira export RUN_DIR CLIENT --out DIR [--merge]`.",
            "",
        ]
    lines += [
        "## Citation",
        "",
        "Elbakary, Ben Issaid, ElBatt, Seddik, Bennis, *MIRA: A Method of Federated Multi-Task "
        "Learning for Large Language Models*, IEEE Networking Letters 7(3), 2025.",
        "",
        "```bibtex",
        CITATION,
        "```",
        "",
    ]
    return "\n".join(lines)
