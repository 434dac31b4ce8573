"""Pre-flight: bad configs fail in one clear line before any client process starts."""

from __future__ import annotations

import pytest

from mira.client.errors import ModelError
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
def test_a_model_path_that_does_not_exist_says_no_such_directory(tiny_config, name, reliability):
    """A name that can only be a path is never sent to the hub as a repo id."""
    with pytest.raises(ModelError, match=r"no such directory; name a folder holding a model"):
        check_model(tiny_config(f"model.name='{name}'"))
    reliability.record(
        f"model.name is a path that does not exist ({name})",
        "refused before any client starts: 'no such directory', not a hub repo-id error",
        "0 (not started)",
    )


def test_a_model_path_to_a_file_says_so(tiny_config, tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ModelError, match=r"model.safetensors': is a file, not a model directory"):
        check_model(tiny_config(f"model.name='{weights}'"))


def _no_hub(monkeypatch) -> None:
    """Fail the test if anything asks the hub: a fast failure never gets that far."""
    import transformers

    def asked(*args, **kwargs):
        raise AssertionError("the hub was asked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", asked)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", asked)


def _online(monkeypatch) -> None:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("all_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)


REMEDY = (
    "use 'smollm2-135m-instruct' (packaged, offline), a local model folder, or a Hugging Face "
    "id this machine has cached or can download"
)


def test_a_mistyped_model_name_offline_fails_at_once_with_did_you_mean(
    tiny_config, monkeypatch, reliability
):
    import time

    _no_hub(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(ModelError) as caught:
        check_model(tiny_config("model.name='tiny-random-lama'"))
    elapsed = time.monotonic() - started
    assert str(caught.value) == (
        "model.name = 'tiny-random-lama' is not a packaged model, a local folder or a model in "
        "the Hugging Face cache, and the hub cannot be reached (HF_HUB_OFFLINE is set); did you "
        f"mean 'tiny-random-llama'? Otherwise {REMEDY}"
    )
    assert elapsed < 5.0
    reliability.record(
        "model.name = 'tiny-random-lama' (a typo) with HF_HUB_OFFLINE=1",
        f"refused in {elapsed:.1f} s, before any hub request, in one line: did you mean "
        "'tiny-random-llama'?",
        "0 (not started)",
    )


def test_a_mistyped_model_name_without_network_fails_at_once(tiny_config, monkeypatch):
    import errno
    import socket

    _no_hub(monkeypatch)
    _online(monkeypatch)
    tried = []

    def unreachable(address, timeout=None):
        tried.append((address, timeout))
        raise OSError(errno.ENETUNREACH, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(ModelError) as caught:
        check_model(tiny_config("model.name='smollm2-135m'"))
    assert tried == [(("huggingface.co", 443), 3.0)]
    assert str(caught.value) == (
        "model.name = 'smollm2-135m' is not a packaged model, a local folder or a model in the "
        "Hugging Face cache, and the hub cannot be reached (no connection to huggingface.co: "
        f"Network is unreachable); did you mean 'smollm2-135m-instruct'? Otherwise {REMEDY}"
    )
    # A name close to nothing packaged gets no guess.
    with pytest.raises(ModelError) as far:
        check_model(tiny_config("model.name='some-org/some-model'"))
    assert "did you mean" not in str(far.value) and str(far.value).endswith(REMEDY)


def test_a_cached_hub_model_is_not_refused_offline(tiny_config, tmp_path, monkeypatch):
    """A hub id in the local Hugging Face cache loads offline: no fast failure, the normal
    load decides (here a stub that fails, to show the load was attempted)."""
    import json

    import transformers
    from huggingface_hub import constants

    snapshot = tmp_path / "models--some-org--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "models--some-org--some-model" / "refs").mkdir()
    (tmp_path / "models--some-org--some-model" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def stub(*args, **kwargs):
        raise OSError("stub loader: no tokenizer files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", stub)
    with pytest.raises(ModelError) as caught:
        check_model(tiny_config("model.name='some-org/some-model'"))
    assert str(caught.value) == (
        "model.name = 'some-org/some-model' cannot be loaded (stub loader: no tokenizer files); "
        f"{REMEDY}"
    )
