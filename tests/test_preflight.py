"""Pre-flight: bad configs fail in one clear line before any client process starts."""

from __future__ import annotations

import pytest

from mira.client.model import ModelError
from mira.config import ConfigError
from mira.federation.preflight import check_lengths, check_model


def test_max_length_must_leave_room_for_prompt_and_target(tiny_config, reliability):
    cfg = tiny_config("model.max_length=1")
    tokenizer = check_model(cfg)
    with pytest.raises(ConfigError, match=r"model.max_length = 1 leaves no room .* at least"):
        check_lengths(cfg, tokenizer)
    check_lengths(tiny_config(), tokenizer)  # the tiny config fits
    reliability.record(
        "model.max_length = 1",
        "refused before any client starts: names the task, its longest target and the length "
        "needed",
        "0 (not started)",
    )


def test_a_model_that_cannot_be_loaded_is_one_line(tiny_config, tmp_path, reliability):
    missing = tmp_path / "no-model-here"
    missing.mkdir()
    cfg = tiny_config(f"model.name='{missing}'")
    with pytest.raises(ModelError) as caught:
        check_model(cfg)
    message = str(caught.value)
    assert "\n" not in message and str(missing) in message and "cannot be loaded" in message
    reliability.record(
        "model.name names a folder without a model",
        "refused before any client starts, in one line naming the model and what to use",
        "0 (not started)",
    )


@pytest.mark.parametrize("name", ["./models/mine", "~/no-such-model-dir", "a/b/c", "/abs/missing"])
def test_a_model_path_that_does_not_exist_says_no_such_directory(tiny_config, name):
    """A name that can only be a path is never sent to the hub as a repo id."""
    with pytest.raises(ModelError, match=r"no such directory; name a folder holding a model"):
        check_model(tiny_config(f"model.name='{name}'"))


def test_a_model_path_to_a_file_says_so(tiny_config, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelError, match=r"model.safetensors': is a file, not a model directory"):
        check_model(tiny_config(f"model.name='{weights}'"))
