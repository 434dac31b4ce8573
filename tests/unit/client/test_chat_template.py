"""data.chat_template: prompts as one user turn of the tokenizer's chat template, the loss on
the assistant's reply only; 'auto' on a tokenizer without a template is exactly raw text."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import tomli_w
import torch

from mira.client import learner
from mira.client.base import model_source
from mira.client.chat import chat_format, fit_prompt, prompt_parts, reply_text, split_tokens
from mira.config import ConfigError, check_resumable, load_run_config
from mira.data import Example, load_client_data
from mira.federation.preflight import check_lengths
from mira.results.schema import RunLayout

# A ChatML-like template, as SmolLM2's without its default system turn.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The same framing with the tiny tokenizer's own <s> and </s>, so the tiny model can read it.
IN_VOCAB = CHATML.replace("<|im_start|>", "<s>").replace("<|im_end|>", "</s>")
# No end-of-turn marker, and a generation prompt that ends in a space.
PLAIN = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
IM_START, IM_END, EOS = 384, 385, 2  # the tiny vocabulary has 384 tokens; </s> is 2


@pytest.fixture(scope="module")
def cfg(tiny_config):
    return tiny_config()


@pytest.fixture(scope="module")
def raw_tokenizer(cfg):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_source(cfg.model))


@pytest.fixture(scope="module")
def model(cfg):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_source(cfg.model)).eval()


def templated(tokenizer, template: str, specials: bool = False):
    """A copy of ``tokenizer`` with ``template`` (and ChatML's two special tokens)."""
    copied = copy.deepcopy(tokenizer)
    if specials:
        copied.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    copied.chat_template = template
    return copied


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def old_encode(tokenizer, example: Example, max_length: int) -> learner.Encoded:
    """learner.encode as it was before chat templates, written out."""
    prompt_ids = ids(tokenizer, example.prompt)
    target_ids = [*ids(tokenizer, example.target), tokenizer.eos_token_id][: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(target_ids)) :]
    return learner.Encoded(prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids)


def test_the_key_defaults_to_auto_and_takes_three_values(tiny_config) -> None:
    assert tiny_config().data.chat_template == "auto"
    assert tiny_config("data.chat_template=off").data.chat_template == "off"
    with pytest.raises(ConfigError, match=r"data.chat_template = 'yes' .* auto, on, off"):
        tiny_config("data.chat_template=yes")


def test_auto_without_a_template_is_raw_text_exactly(cfg, raw_tokenizer, model) -> None:
    assert raw_tokenizer.chat_template is None
    assert chat_format(raw_tokenizer, "auto") is None
    assert chat_format(raw_tokenizer, "off") is None
    examples = load_client_data(cfg, 0).train
    for max_length in (32, 9):  # 9 cuts every prompt
        chat = chat_format(raw_tokenizer, "auto")
        got = [learner.encode(raw_tokenizer, e, max_length, chat) for e in examples]
        assert got == [old_encode(raw_tokenizer, e, max_length) for e in examples]
    # The task metrics of 'auto' and 'off' are the same numbers, to the last bit.
    data = load_client_data(cfg, 0)
    auto = learner.task_metrics(model, raw_tokenizer, data.task, data.eval, cfg)
    off = learner.task_metrics(
        model,
        raw_tokenizer,
        data.task,
        data.eval,
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, chat_template="off")),
    )
    assert auto == off and set(auto) == {"accuracy"}
    raw = learner.generate(model, raw_tokenizer, ["the film was good"], 32, 5, 4)
    prompt = torch.tensor([ids(raw_tokenizer, "the film was good")])
    reference = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=5,
        do_sample=False,
        pad_token_id=raw_tokenizer.pad_token_id,
        eos_token_id=EOS,
    )
    new_tokens = reference[0, prompt.shape[1] :]
    assert raw == [raw_tokenizer.decode(new_tokens, skip_special_tokens=True).strip()]


def test_on_without_a_template_is_refused_in_one_clear_line(raw_tokenizer, tiny_config) -> None:
    clear = (
        r"data.chat_template = 'on', but the tokenizer .* has no chat template; set "
        r"data.chat_template = 'auto' or 'off'"
    )
    with pytest.raises(ConfigError, match=clear):
        chat_format(raw_tokenizer, "on")
    cfg = tiny_config("data.chat_template=on")
    with pytest.raises(ConfigError, match="has no chat template"):
        check_lengths(cfg, raw_tokenizer)  # mira run refuses it before any client starts


def test_the_framing_is_read_off_the_template(raw_tokenizer) -> None:
    chat = chat_format(templated(raw_tokenizer, CHATML, specials=True), "auto")
    assert chat is not None
    assert (chat.head, chat.tail) == ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n")
    assert chat.end == "<|im_end|>"
    assert chat.stop_ids == (EOS, IM_END)
    plain = chat_format(templated(raw_tokenizer, PLAIN), "on")
    assert plain is not None
    assert (plain.head, plain.tail, plain.end, plain.stop_ids) == (
        "user: ",
        "\nassistant: ",
        "",
        (EOS,),
    )


def test_a_chat_example_is_the_rendered_conversation_with_loss_on_the_reply(
    raw_tokenizer,
) -> None:
    tokenizer = templated(raw_tokenizer, CHATML, specials=True)
    chat = chat_format(tokenizer, "on")
    example = Example(prompt="the film was good", target=" positive")
    encoded = learner.encode(tokenizer, example, 64, chat)

    turns = [
        {"role": "user", "content": "the film was good"},
        {"role": "assistant", "content": "positive"},
    ]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    assert rendered == (
        "<|im_start|>user\nthe film was good<|im_end|>\n<|im_start|>assistant\npositive<|im_end|>\n"
    )
    # The rendered text's tokens, up to the reply's end of turn (the newline after it is not
    # part of the reply).
    assert encoded.input_ids == ids(tokenizer, rendered)[:-1]
    prompt = ids(
        tokenizer, "<|im_start|>user\nthe film was good<|im_end|>\n<|im_start|>assistant\n"
    )
    reply = ids(tokenizer, "positive")
    assert reply == [269, 332, 274]
    assert encoded.input_ids == [*prompt, *reply, IM_END]
    assert prompt[0] == IM_START and prompt.count(IM_START) == 2 and prompt.count(IM_END) == 1
    # Loss on the reply and its end of turn, nowhere else.
    assert encoded.labels == [-100] * len(prompt) + [269, 332, 274, IM_END]
    assert [i for i, label in enumerate(encoded.labels) if label != -100] == list(
        range(len(prompt), len(prompt) + 4)
    )


def test_a_template_without_end_of_turn_ends_the_reply_with_eos(raw_tokenizer) -> None:
    tokenizer = templated(raw_tokenizer, PLAIN)
    chat = chat_format(tokenizer, "on")
    encoded = learner.encode(tokenizer, Example("the film was good", " positive"), 64, chat)
    text = "user: the film was good\nassistant: positive"
    assert encoded.input_ids == [*ids(tokenizer, text), EOS]
    # " positive" crosses the seam after "assistant:"; it is the reply's, whole.
    reply = ids(tokenizer, " positive")
    assert reply == [376, 274]
    assert encoded.labels == [-100] * (len(encoded.input_ids) - 3) + [*reply, EOS]


def test_the_generation_prompt_ends_the_prompt(raw_tokenizer) -> None:
    tokenizer = templated(raw_tokenizer, CHATML, specials=True)
    chat = chat_format(tokenizer, "on")
    head, user, tail = prompt_parts(tokenizer, "an article about the goal", chat)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "an article about the goal"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert fit_prompt(head, user, tail, 100) == ids(tokenizer, rendered)
    generation_prompt = ids(tokenizer, "<|im_start|>assistant\n")
    assert generation_prompt[0] == IM_START and len(generation_prompt) > 1
    assert tail[-len(generation_prompt) :] == generation_prompt
    assert tail == [IM_END, *ids(tokenizer, "\n"), *generation_prompt]
    assert head == [IM_START, *ids(tokenizer, "user\n")]
    assert user == ids(tokenizer, "an article about the goal")


def test_a_left_cut_takes_the_user_text_and_keeps_the_framing(raw_tokenizer) -> None:
    tokenizer = templated(raw_tokenizer, CHATML, specials=True)
    chat = chat_format(tokenizer, "on")
    text = "the movie was great and i loved it, the movie was great and i loved it"
    head, user, tail = prompt_parts(tokenizer, text, chat)
    target = [*ids(tokenizer, "positive"), IM_END]
    room = 6
    encoded = learner.encode(tokenizer, Example(text, " positive"), len(target) + room, chat)
    assert room < len(user)
    # max_length budgets the user's text and the reply; the framing comes on top, whole.
    assert encoded.input_ids == [*head, *user[-room:], *tail, *target]
    assert encoded.input_ids[0] == IM_START  # the turn still opens with its header
    assert encoded.labels == [-100] * (len(head) + room + len(tail)) + target
    # Raw text would have cut the same prompt's header away: the cut is on the user text.
    off = learner.encode(tokenizer, Example(text, " positive"), len(target) + room)
    assert off.input_ids[0] != IM_START
    # The same examples keep the same user tokens on and off.
    raw = learner.encode(raw_tokenizer, Example(text, " positive"), 12)
    framed = learner.encode(tokenizer, Example(text, " positive"), 12, chat)
    raw_reply = len([t for t in raw.labels if t != -100])
    assert raw.input_ids[: 12 - raw_reply][-3:] == user[-(12 - len(target)) :][-3:]
    assert len(framed.input_ids) == 12 + len(head) + len(tail)
    # fit_prompt itself: framing longer than the room goes from the left, after the user text.
    assert fit_prompt(head, user, tail, 3) == (head + tail)[-3:]
    kept = 20 - len(head) - len(tail)
    assert fit_prompt(head, user, tail, 20) == [*head, *user[-kept:], *tail]


def test_a_reply_ends_at_its_end_of_turn(raw_tokenizer) -> None:
    chat = chat_format(templated(raw_tokenizer, CHATML), "on")  # <|im_end|> is plain text here
    assert chat is not None and chat.stop_ids == (EOS,)
    assert reply_text(" sport<|im_end|>\n<|im_start|>user", chat) == "sport"
    assert reply_text(" sport<|im_end|>", None) == "sport<|im_end|>"


def test_split_tokens_are_the_whole_texts_tokens(raw_tokenizer) -> None:
    pieces = ["<s>user\n", "an article about the coach", "</s>\n<s>assistant\n", "sport</s>"]
    groups = split_tokens(raw_tokenizer, pieces)
    assert [t for g in groups for t in g] == ids(raw_tokenizer, "".join(pieces))
    assert [len(g) for g in groups] == [len(ids(raw_tokenizer, p)) for p in pieces]


def test_generation_and_label_scores_read_the_rendered_turn(raw_tokenizer, model) -> None:
    """Against a hand-written greedy loop and hand-summed log-likelihoods on the rendered
    text, with a template the tiny model's vocabulary holds (end of turn = </s>)."""
    tokenizer = templated(raw_tokenizer, IN_VOCAB)
    chat = chat_format(tokenizer, "on")
    assert chat is not None and chat.end == "</s>" and chat.stop_ids == (EOS,)
    prompts = ["the film was good", "an article about the goal and the team"]
    got = learner.generate(model, tokenizer, prompts, 64, 6, 1, chat)
    verbalisers = (" positive", " negative")
    scores = learner.label_scores(
        model, tokenizer, [Example(p, "") for p in prompts], verbalisers, 64, 3, chat
    )
    expected_scores = np.zeros((len(prompts), len(verbalisers)))
    for row, prompt in enumerate(prompts):
        rendered = f"<s>user\n{prompt}</s>\n<s>assistant\n"
        context = ids(tokenizer, rendered)
        tokens: list[int] = []
        with torch.no_grad():
            for _ in range(6):
                logits = model(input_ids=torch.tensor([context + tokens])).logits[0, -1]
                tokens.append(int(logits.argmax()))
                if tokens[-1] == EOS:
                    break
            assert got[row] == tokenizer.decode(tokens, skip_special_tokens=True).strip()
            for column, verbaliser in enumerate(verbalisers):
                reply = [*ids(tokenizer, verbaliser.strip()), EOS]
                full = torch.tensor([context + reply])
                logprobs = model(input_ids=full).logits[0].log_softmax(-1)
                expected_scores[row, column] = sum(
                    float(logprobs[len(context) - 1 + i, token]) for i, token in enumerate(reply)
                )
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-4)


def test_check_lengths_leaves_the_framing_on_top(tiny_config, raw_tokenizer) -> None:
    tokenizer = templated(raw_tokenizer, CHATML, specials=True)
    # The longest verbaliser of the tiny tasks with its end of turn, and one prompt token.
    longest = max(len(ids(tokenizer, w)) + 1 for w in ("positive", "negative", "sport", "science"))
    check_lengths(
        tiny_config(f"model.max_length={longest + 1}", "data.chat_template=on"), tokenizer
    )
    message = rf"target of {longest} tokens .*; set model.max_length to at least {longest + 1}"
    with pytest.raises(ConfigError, match=message):
        check_lengths(
            tiny_config(f"model.max_length={longest}", "data.chat_template=on"), tokenizer
        )
    raw = max(
        len(ids(tokenizer, f" {w}")) + 1 for w in ("positive", "negative", "sport", "science")
    )
    check_lengths(tiny_config(f"model.max_length={raw + 1}", "data.chat_template=off"), tokenizer)


def test_a_run_from_before_the_key_resumes_with_raw_prompts_only(tiny_config, tmp_path) -> None:
    stored = tiny_config().to_dict()
    del stored["data"]["chat_template"]  # a config.toml written before the key existed
    path = RunLayout(tmp_path).config
    path.write_text(tomli_w.dumps(stored))
    old = load_run_config(path)
    assert old.data.chat_template == "off"
    check_resumable(old, tiny_config("data.chat_template=off"))
    with pytest.raises(ConfigError, match=r"data.chat_template differ"):
        check_resumable(old, tiny_config())
    with pytest.raises(ConfigError, match=r"data.chat_template differ"):
        check_resumable(tiny_config("data.chat_template=on"), tiny_config())
