"""Prompts and targets as token ids: raw text, or one turn of the tokenizer's chat template.

An instruct model was tuned on conversations rendered by its chat template; TRL's SFTTrainer
renders them with ``tokenizer.apply_chat_template`` and can put the loss on the assistant's
turn only. With ``data.chat_template`` on (:func:`chat_format`), an example becomes the text

    head + prompt + tail | reply + end

``head`` is what the template writes before the user's text (a default system turn, the user
header), ``tail`` what it writes after it up to and including the generation prompt
(``add_generation_prompt=True``), ``reply`` the target without the leading space the house
convention puts on targets, and ``end`` what the template writes to close the assistant's turn
(``<|im_end|>`` for ChatML; the end-of-text token where it writes nothing). The loss is on
``reply + end`` only. The framing is found once per tokenizer by rendering placeholder turns,
so it is exact for templates that insert a message's text as it is (ChatML, SmolLM2's, Llama
3's up to its trimming of surrounding whitespace). The whole text is tokenised at once and
split by character offsets, so the ids are those of the rendered text, whatever the tokenizer
does at the seams. Off, the prompt and the target are tokenised apart as raw text, the target
followed by the end-of-text token.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from mira.config import ConfigError

# Placeholder turns rendered to find the template's framing; no template changes them.
_USER = "MIRA-USER-TEXT"
_REPLY = "MIRA-REPLY-TEXT"


@dataclass(frozen=True)
class ChatFormat:
    """The framing a chat template puts around one user turn and the assistant's reply."""

    head: str  # before the user's text
    tail: str  # after it, the generation prompt included
    end: str  # closes the assistant's reply; "" = the end-of-text token does
    stop_ids: tuple[int, ...]  # tokens that end a generated reply


def chat_format(tokenizer: Any, setting: str) -> ChatFormat | None:
    """Whether prompts go through ``tokenizer``'s chat template under ``data.chat_template``
    = ``setting``, and its framing if so; None = raw text. Every caller decides here.

    'auto' is on exactly when the tokenizer has a chat template; 'on' without one is an error.
    """
    if setting == "off":
        return None
    if not getattr(tokenizer, "chat_template", None):
        if setting == "on":
            raise ConfigError(
                f"data.chat_template = 'on', but the tokenizer of "
                f"{getattr(tokenizer, 'name_or_path', '') or 'the base model'!r} has no chat "
                "template; set data.chat_template = 'auto' or 'off' to give it raw prompts"
            )
        return None
    head, tail = _around(_render(tokenizer, [_turn("user", _USER)], True), _USER)
    closed = _render(tokenizer, [_turn("user", _USER), _turn("assistant", _REPLY)], False)
    end = _around(closed, _REPLY)[1].rstrip()
    end_ids = tokenizer(end, add_special_tokens=False)["input_ids"] if end else []
    stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if len(end_ids) == 1 and end_ids[0] not in stops:
        stops.append(end_ids[0])
    return ChatFormat(head=head, tail=tail, end=end, stop_ids=tuple(stops))


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _render(tokenizer: Any, turns: list[dict[str, str]], generation_prompt: bool) -> str:
    return str(
        tokenizer.apply_chat_template(
            turns, tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def _around(text: str, placeholder: str) -> tuple[str, str]:
    """The text before and after the one occurrence of ``placeholder``."""
    if text.count(placeholder) != 1:
        raise ConfigError(
            "data.chat_template: the tokenizer's chat template does not write a message's "
            f"text once, as it is (rendered {text!r}); set data.chat_template = 'off'"
        )
    before, after = text.split(placeholder)
    return before, after


def split_tokens(tokenizer: Any, pieces: Sequence[str]) -> list[list[int]]:
    """The token ids of the concatenated ``pieces``, grouped by piece: together they are
    exactly the tokens of the whole text. A token that crosses a seam belongs to the piece
    holding its last character, so a reply keeps its first word whole after a generation
    prompt that ends in a space ("Assistant: "). A tokenizer without offsets (a slow one)
    tokenises each piece apart."""
    if not getattr(tokenizer, "is_fast", False):
        return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in pieces]
    encoded = tokenizer("".join(pieces), add_special_tokens=False, return_offsets_mapping=True)
    ends = list(accumulate(len(p) for p in pieces))
    groups: list[list[int]] = [[] for _ in pieces]
    for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        last = max(start, end - 1)
        groups[min(bisect_right(ends, last), len(pieces) - 1)].append(token)
    return groups


def prompt_parts(
    tokenizer: Any, prompt: str, chat: ChatFormat | None
) -> tuple[list[int], list[int], list[int]]:
    """(framing before, the prompt's own tokens, framing after); no framing without chat."""
    if chat is None:
        return [], tokenizer(prompt, add_special_tokens=False)["input_ids"], []
    head, user, tail = split_tokens(tokenizer, [chat.head, prompt, chat.tail])
    return head, user, tail


def example_parts(
    tokenizer: Any, prompt: str, target: str, chat: ChatFormat | None
) -> tuple[list[int], list[int], list[int], list[int]]:
    """:func:`prompt_parts` and the target's tokens (the reply and its end of turn)."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if chat is None:
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        return [], tokenizer(prompt, add_special_tokens=False)["input_ids"], [], target_ids + eos
    head, user, tail, reply = split_tokens(
        tokenizer, [chat.head, prompt, chat.tail, target.strip() + chat.end]
    )
    return head, user, tail, reply if chat.end else reply + eos


def fit_prompt(head: list[int], user: list[int], tail: list[int], room: int) -> list[int]:
    """The prompt in at most ``room`` (>= 1) tokens, cut from the left: the user's text goes
    first, from its start, and the template's framing stays whole, so the model still reads a
    well-formed turn that ends in the generation prompt; only framing longer than ``room``
    is itself cut from the left. Without framing this is ``user[-room:]``."""
    excess = len(head) + len(user) + len(tail) - room
    kept = [*head, *user[max(0, excess) :], *tail]
    return kept[-room:]


def reply_text(generated: str, chat: ChatFormat | None) -> str:
    """A generated continuation (special tokens already dropped) up to the end of the turn,
    stripped; an end of turn that is not a special token is cut here."""
    if chat is not None and chat.end:
        generated = generated.split(chat.end, 1)[0]
    return generated.strip()
