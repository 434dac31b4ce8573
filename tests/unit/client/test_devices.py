"""Devices and precision, on the CPU (no test assumes a GPU): what model.device and model.dtype
resolve to, the errors for a device the machine lacks, and mixed precision: base weights in
bfloat16 or float16, LoRA weights, gradients and the adapters that leave the client float32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mira.client import learner
from mira.client.devices import resolve_device
from mira.client.errors import ModelError
from mira.client.lora import lora_model
from mira.config import ConfigError, ModelConfig, apply_overrides, config_from_dict
from mira.data import load_client_data
from mira.errors import MiraError
from mira.federation.simulation import check_gpu_share

no_accelerator = pytest.mark.skipif(
    torch.cuda.device_count() > 0 or torch.backends.mps.is_available(),
    reason="checks what the CPU-only machines resolve to",
)


@no_accelerator
def test_auto_is_the_cpu_in_float32_here() -> None:
    assert resolve_device(ModelConfig()) == ("cpu", "float32")
    assert resolve_device(ModelConfig(device="cpu")) == ("cpu", "float32")
    assert resolve_device(ModelConfig(dtype="bfloat16")) == ("cpu", "bfloat16")
    assert resolve_device(ModelConfig(device="cpu", dtype="float16")) == ("cpu", "float16")


@no_accelerator
@pytest.mark.parametrize("device", ["cuda", "cuda:1", "mps"])
def test_a_device_the_machine_lacks_is_a_clear_error(device: str) -> None:
    with pytest.raises(ModelError, match=rf"model\.device = '{device}'") as error:
        resolve_device(ModelConfig(device=device))
    assert isinstance(error.value, MiraError)


def test_resolving_the_device_creates_no_cuda_context(monkeypatch) -> None:
    """The server process asks resolve_device what its clients will use; that must never
    initialise CUDA there (every torch.cuda call that does goes through _lazy_init)."""

    def refuse() -> None:
        raise AssertionError("resolve_device initialised CUDA")

    monkeypatch.setattr(torch.cuda, "_lazy_init", refuse)
    for device in ("auto", "cpu"):
        for dtype in ("auto", "bfloat16"):
            resolve_device(ModelConfig(device=device, dtype=dtype))
    assert not torch.cuda.is_initialized()


RAW = {"tasks": [{"name": "a", "clients": 2}]}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.device='gpu'", r"model\.device = 'gpu' is not allowed; .*cuda:N"),
        ("model.device='cuda:x'", r"model\.device = 'cuda:x' is not allowed"),
        ("model.dtype='float8'", r"model\.dtype = 'float8' is not allowed"),
        ("federation.gpus_per_client=1.5", r"federation\.gpus_per_client must be a fraction"),
        ("federation.gpus_per_client=-0.5", r"federation\.gpus_per_client must be a fraction"),
        ("train.grad_accum=0", r"train\.grad_accum must be > 0"),
        ("train.max_grad_norm=-1.0", r"train\.max_grad_norm must be >= 0"),
        ("train.lr_schedule='step'", r"train\.lr_schedule = 'step' is not allowed"),
        ("train.warmup_steps=15", r"train\.warmup_steps = 15 must be >= 0 and below .* = 15"),
        ("lora.target_modules=['all-linear', 'q_proj']", r"'all-linear' stands alone"),
    ],
)
def test_config_refuses_bad_device_precision_and_training_values(override, message) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(apply_overrides(RAW, [override]))


def test_new_keys_accept_their_allowed_values() -> None:
    cfg = config_from_dict(
        apply_overrides(
            RAW,
            [
                "model.device='cuda:1'",
                "model.dtype='bfloat16'",
                "federation.gpus_per_client=0.25",
                "train.lr_schedule='cosine'",
                "train.warmup_steps=14",
                "lora.target_modules=['all-linear']",
            ],
        )
    )
    assert (cfg.model.device, cfg.model.dtype) == ("cuda:1", "bfloat16")
    assert cfg.federation.gpus_per_client == 0.25
    assert config_from_dict(apply_overrides(RAW, ["federation.gpus_per_client=2"]))


def test_a_gpu_share_needs_clients_on_cuda() -> None:
    cfg = config_from_dict(apply_overrides(RAW, ["federation.gpus_per_client=0.5"]))
    with pytest.raises(ConfigError, match=r"gpus_per_client = 0\.5 .* train on 'cpu'"):
        check_gpu_share(cfg, "cpu")
    check_gpu_share(cfg, "cuda")
    check_gpu_share(config_from_dict(RAW), "cpu")  # no share: nothing to check


def trained(cfg):
    """Client 0 trained from the shared init: (model, adapter name, adapter, loss, eval)."""
    model = lora_model(cfg.model)
    init = model.shared_init(cfg.lora, cfg.lora.rank, cfg.federation.seed)
    name = model.activate(cfg.lora, cfg.lora.rank)
    data = load_client_data(cfg, 0)
    tok = model.tokenizer
    train = [learner.encode(tok, e, cfg.model.max_length) for e in data.train]
    evaluation = [learner.encode(tok, e, cfg.model.max_length) for e in data.eval]
    loss = learner.train_steps(
        model.peft, model.lora_parameters(name), train, cfg, tok.pad_token_id, seed=5
    )
    return model, name, init, loss, evaluation


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_base_trains_float32_lora_and_sends_float32(tiny_config, dtype) -> None:
    cfg = tiny_config("model.device=cpu", f"model.dtype={dtype}", "federation.local_steps=3")
    model, name, init, loss, evaluation = trained(cfg)
    assert model.base.dtype == dtype
    frozen = {p.dtype for p in model.peft.parameters() if not p.requires_grad}
    assert frozen == {getattr(torch, dtype)}
    assert {p.dtype for p in model.lora_parameters(name)} == {torch.float32}
    adapter = model.get_adapter(name)
    assert {v.dtype for v in adapter.values()} == {np.dtype(np.float32)}
    assert any(not np.array_equal(adapter[k], init[k]) for k in adapter)  # it trained
    model.set_adapter(name, adapter)
    assert all(np.array_equal(model.get_adapter(name)[k], adapter[k]) for k in adapter)

    # Against the float32 model: the same training and the same adapter's eval loss agree
    # to half precision's accuracy.
    full, full_name, _, full_loss, _ = trained(
        tiny_config("model.device=cpu", "federation.local_steps=3")
    )
    assert loss == pytest.approx(full_loss, abs=2e-3)
    pad = model.tokenizer.pad_token_id
    half_eval = learner.eval_loss(model.peft, evaluation, 8, pad)
    full.set_adapter(full_name, adapter)
    assert half_eval == pytest.approx(learner.eval_loss(full.peft, evaluation, 8, pad), abs=2e-3)
