"""``mira export``'s folders load in a fresh interpreter with the hub offline (seconds: a new
process imports torch, transformers and peft). The exports themselves, in this process:
tests/unit/app/test_export.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from peft import PeftModel
from transformers import AutoTokenizer

from mira.config import Config
from mira.export import export_client
from mira.results.schema import RunLayout
from test_export import PROMPT, RANKS, base, logits, write_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tiny_config, tmp_path_factory) -> tuple[Config, Path, dict]:
    cfg = tiny_config(f"lora.ranks={RANKS}")
    folder = tmp_path_factory.mktemp("run")
    return cfg, folder, write_run(cfg, folder)


OFFLINE_LOAD = """
import json, sys
from pathlib import Path
import numpy as np, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

adapter, merged, prompt, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
tokenizer = AutoTokenizer.from_pretrained(adapter)
ids = tokenizer(prompt, return_tensors="pt").input_ids
reference = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
base = AutoModelForCausalLM.from_pretrained(adapter / reference, dtype=torch.float32)
model = PeftModel.from_pretrained(base, adapter).eval()
whole = AutoModelForCausalLM.from_pretrained(merged).eval()
with torch.no_grad():
    np.savez(out, adapter=model(ids).logits.numpy(), merged=whole(ids).logits.numpy())
"""


def test_exported_folders_load_offline_with_peft_and_transformers(run, tmp_path: Path) -> None:
    """No hub, nothing to download: a fresh interpreter with HF_HUB_OFFLINE=1 loads the
    adapter export (base from the path its config names, relative to the folder) and the
    merged export, and both give the logits of the run's adapter on its base."""
    cfg, folder, _ = run
    client = cfg.client_ids[1]
    adapter = export_client(folder, client, tmp_path / "adapter")
    merged = export_client(folder, client, tmp_path / "merged", merge=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MIRA_CACHE", None)  # the folder alone says where the base is
    result = tmp_path / "logits.npz"
    done = subprocess.run(
        [sys.executable, "-c", OFFLINE_LOAD, str(adapter), str(merged), PROMPT, str(result)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = np.load(result)
    tokenizer = AutoTokenizer.from_pretrained(RunLayout(folder).adapter(client).dir)
    expected = logits(
        PeftModel.from_pretrained(base(cfg), str(RunLayout(folder).adapter(client).dir)), tokenizer
    ).numpy()
    np.testing.assert_allclose(loaded["adapter"], expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(loaded["merged"], expected, rtol=0, atol=1e-5)
