"""The model card (README.md) of a shared adapter or merged model: pure text, no I/O.

A card is a :class:`huggingface_hub.ModelCard`: its metadata a
:class:`huggingface_hub.ModelCardData` (``base_model``, ``library_name``, ``pipeline_tag``,
``tags``), then what the weights are: the client and its task, the base model and where its
weights came from, the LoRA layout, the server rule and task graph, the round, the client's
**personalised** metrics of that round (its own adapter on its own held-out split), how to
load it, and the MIRA paper to cite. ``base_model`` is only ever a model the hub holds
(:func:`hub_id`): a base mira builds itself (``tiny-random-*``) or a local folder is named in
the text instead, with what resolves it. :meth:`mira.results.rundir.RunWriter.append_round`
writes one into every ``adapters/<client>/`` after each round; ``mira export`` writes the card
of the exported folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mira.config import RULES, TASK_METRICS, Config
from mira.results.document import fmt
from mira.results.schema import OK, AdapterFiles, ClientRow

LOCALLY_BUILT = "tiny-random-"
"""Names of the models mira builds itself from a seed (``mira.client.tiny.TINY_RANDOM``):
valid hub ids in form, but on no hub."""
HUB = "https://huggingface.co"

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

EVAL_LOSS_NAME = "eval loss (mean over target tokens)"
METRIC_NAMES = {
    "accuracy": "accuracy",
    "rouge_l": "ROUGE-L",
    "exact_match": "exact match",
    "token_f1": "token F1",
}


def looks_local(name: str) -> bool:
    """Whether a base model name can only be a local folder (as
    ``mira.client.base.looks_like_path`` decides: absolute, ``.`` or ``~`` first, a backslash,
    two slashes or more, or an existing folder)."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") >= 2
        or Path(name).expanduser().is_dir()
    )


def hub_id(name: str) -> str | None:
    """``name`` when it names a model the Hugging Face hub can hold: a valid repo id
    (``huggingface_hub.utils.validate_repo_id``) that is no local folder and no model mira
    builds itself; else None (the card then names no ``base_model``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if not name or name.startswith(LOCALLY_BUILT) or looks_local(name):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def card_data(base: str | None, merged: bool) -> Any:
    """The card's metadata: ``base`` (a hub id, or None) as ``base_model``, with peft's
    ``base_model:adapter:<id>`` tag for an adapter, ``base_model_relation: finetune`` for a
    merged model."""
    from huggingface_hub import ModelCardData

    tags = ["mira", "federated-learning", "lora", "transformers"]
    if merged:
        return ModelCardData(
            base_model=base,
            library_name="transformers",
            pipeline_tag="text-generation",
            tags=tags,
            base_model_relation="finetune" if base else None,  # None: left out
        )
    adapter_tag = [f"base_model:adapter:{base}"] if base else []
    return ModelCardData(
        base_model=base,
        library_name="peft",
        pipeline_tag="text-generation",
        tags=[*adapter_tag, *tags[:3], "peft", "transformers"],
    )


def model_card(
    cfg: Config,
    row: ClientRow,
    adapter_config: Mapping[str, Any],
    graph_source: str,
    base_note: str = "",
    merged: bool = False,
    relative_base: bool = False,
) -> str:
    """README.md for one client's adapter after round ``row.round``.

    ``row`` is the client's metrics.jsonl row of that round; ``adapter_config`` the adapter's
    peft ``adapter_config.json`` (its ``base_model_name_or_path`` is the portable name of the
    base); ``base_note`` says where the base weights came from when that matters (mira's
    dequantised GGUF copy, a locally built random model, a local folder). ``merged``: the card
    of a model whose base weights have the LoRA update merged in (``mira export --merge``).
    ``relative_base``: ``base_model_name_or_path`` is a path relative to the card's folder
    (``mira export`` of a base that is a local folder).
    """
    base = str(adapter_config.get("base_model_name_or_path") or cfg.model.name)
    on_hub = hub_id(base)
    client, task, server_round = row.client, row.task, row.round
    rank = int(adapter_config.get("r", row.rank))
    if merged:
        what = (
            f"The personalised model of client `{client}` (its LoRA adapter merged into the base)"
        )
    else:
        what = f"The personalised LoRA adapter of client `{client}`"
    modules = adapter_config.get("target_modules") or cfg.lora.target_modules
    modules = [modules] if isinstance(modules, str) else sorted(modules)
    scaling = "alpha / sqrt(r) (rsLoRA)" if cfg.lora.rslora else "alpha / r"
    rule = RULES[cfg.server.method]
    rule_text = rule.name
    if rule.uses_step:
        rule_text += f", server.step = {cfg.server.step}"
    if on_hub:
        named = f"[`{base}`]({HUB}/{base})"
    elif relative_base:
        named = f"the local folder `{base}`, relative to this folder (on no hub)"
    else:
        named = f"`{base}` (on no hub: the metadata names no `base_model`)"
    lines = [
        f"# {client}: {task}, personalised by federated multi-task learning (mira)",
        "",
        f"{what}, after round {server_round} of "
        f"{cfg.federation.rounds} of a federated run of mira with {cfg.num_clients} clients "
        f"(tasks {', '.join(sorted(set(cfg.client_tasks)))}). Every client fine-tuned a LoRA "
        f"adapter on its own data, which the server never saw; {rule.card}",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model | {named} |",
    ]
    if base_note:
        lines.append(f"| base weights | {base_note} |")
    lines += [
        f"| task | `{task}` |",
        f"| LoRA | rank {rank}, alpha {cfg.lora.alpha:g} (scale {scaling}), dropout "
        f"{cfg.lora.dropout:g}, on {', '.join(f'`{m}`' for m in modules)} |",
        f"| server rule | {rule_text} |",
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
    measured = [(EVAL_LOSS_NAME, _finite(row.eval_loss))]
    measured += [(METRIC_NAMES[m], _finite(row.metrics.get(m))) for m in TASK_METRICS]
    lines += [f"| {name} | {fmt(value)} |" for name, value in measured if value is not None]
    if _finite(row.mix_weight) is not None:
        lines.append(f"| mix weight (share taken from its neighbours) | {fmt(row.mix_weight)} |")
    if all(value is None for _, value in measured[1:]):
        lines += [
            "",
            f"Task metrics were not measured in round {server_round}: mira measures them every "
            f"{cfg.federation.metrics_every} rounds (federation.metrics_every) and after the "
            "last.",
        ]
    if row.status != OK:
        lines += [
            "",
            f"In round {server_round} this client's update was not used ({row.status}: "
            f"{row.reason or ''}); it kept its adapter.",
        ]
    lines += ["", "## How to load", "", *_how_to_load(base, on_hub, merged, relative_base)]
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
    from huggingface_hub import ModelCard

    yaml = card_data(on_hub, merged).to_yaml()
    return str(ModelCard(f"---\n{yaml}\n---\n\n" + "\n".join(lines)))


def _how_to_load(base: str, on_hub: str | None, merged: bool, relative_base: bool) -> list[str]:
    """The code that loads the folder, and what else does, for the way the base is named."""
    folder = '"PATH/TO/THIS/FOLDER"'
    if merged:
        return [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f"model = AutoModelForCausalLM.from_pretrained({folder})",
            f"tokenizer = AutoTokenizer.from_pretrained({folder})",
            "```",
            "",
        ]
    if relative_base:
        imports = ["from pathlib import Path", ""]
        load_base = [
            f"folder = Path({folder})",
            f"base = AutoModelForCausalLM.from_pretrained(folder / {json.dumps(base)})",
        ]
    else:
        imports = []
        load_base = [f"base = AutoModelForCausalLM.from_pretrained({json.dumps(base)})"]
    code = [
        "```python",
        *imports,
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        *load_base,
        f"model = PeftModel.from_pretrained(base, {'folder' if relative_base else folder})",
        f"tokenizer = AutoTokenizer.from_pretrained({'folder' if relative_base else folder})",
        "```",
        "",
    ]
    exact = (
        "To load the exact base the run trained on (mira's cached copy), or to get one "
        "standalone model, use `mira export RUN_DIR CLIENT --out DIR [--merge]`."
    )
    settings = AdapterFiles(Path()).config.name
    if on_hub:
        auto = (
            f"`AutoModelForCausalLM.from_pretrained({folder})` also works: transformers reads "
            f"`base_model_name_or_path` from `{settings}`, loads that base and adds the "
            f"adapter. {exact}"
        )
    elif relative_base:
        auto = (
            f"`{settings}` names the base by the same relative path, and transformers "
            'resolves it from the current directory: `AutoModelForCausalLM.from_pretrained(".")` '
            "run inside this folder loads the base and adds the adapter. Moved elsewhere, set "
            "`base_model_name_or_path` to where the base is, or load it as above."
        )
    elif base.startswith(LOCALLY_BUILT):
        auto = (
            f"`{base}` is built by mira from a fixed seed and names no hub model, so "
            f"`AutoModelForCausalLM.from_pretrained({folder})` cannot find the base: "
            "`mira export RUN_DIR CLIENT --out DIR` writes a folder that names its local copy, "
            "`--merge` one standalone model."
        )
    else:
        auto = (
            f"`{base}` is a local folder, as the run's config names it (a relative path counts "
            "from where the run was started); `AutoModelForCausalLM.from_pretrained("
            f"{folder})` loads the base and adds the adapter where that path resolves. {exact}"
        )
    return [*code, auto, ""]


def _finite(value: float | None) -> float | None:
    """A number the card shows: None for one not measured, or not finite (written as null)."""
    return value if value is not None and math.isfinite(value) else None
