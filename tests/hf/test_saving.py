"""Saving: edits are written (re-encoded), saves have an identity, atomic saves, the model card."""

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import vc_quant
from vc_quant import VcCorruptDataError, VcQuantizationConfig
from vc_quant.cli import main as cli

IDS = torch.tensor([[1, 2, 3, 4, 5]])
Q = "model.layers.0.self_attn.q_proj.weight"


def load(path, resident="dense"):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=VcQuantizationConfig(resident=resident))


@pytest.mark.parametrize("resident", ["dense", "int8"])
def test_weight_edits_are_saved_not_lost(tiny_quantized, tmp_path, caplog, resident):
    path, _ = tiny_quantized
    model = load(path, resident)
    with torch.no_grad():
        if resident == "dense":
            model.model.layers[0].self_attn.q_proj.weight.zero_()
        else:  # int8 samples: a pruning of the first rows
            model.model.layers[0].self_attn.q_proj.weight[:64].zero_()
    with caplog.at_level(logging.INFO, logger="vc_quant"):
        model.save_pretrained(tmp_path / "edited")
    assert f"{Q} changed since it was loaded; re-encoding" in caplog.text
    old, new = load_file(str(path / "model.safetensors")), load_file(str(tmp_path / "edited" / "model.safetensors"))
    assert not torch.equal(old[Q], new[Q])
    unchanged = [k for k in old if not k.startswith(Q)]
    assert all(torch.equal(old[k], new[k]) for k in unchanged)  # untouched weights: byte-identical
    reloaded = load(tmp_path / "edited").model.layers[0].self_attn.q_proj.weight
    edited = model.model.layers[0].self_attn.q_proj.dequantize_weight()
    stale = load(path).model.layers[0].self_attn.q_proj.weight
    assert (reloaded - edited).norm() < (reloaded - stale).norm()  # the edit came back (q_proj is at ~1 bit here)
    if resident == "dense":
        assert reloaded.abs().max() < 1e-6  # zeros re-encode to zeros
    # saving again without further edits reuses the new record byte for byte (no second re-encode)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vc_quant"):
        model.save_pretrained(tmp_path / "again")
    assert "re-encoding" not in caplog.text
    assert torch.equal(load_file(str(tmp_path / "again" / "model.safetensors"))[Q], new[Q])


def test_every_save_has_an_identity(tiny_quantized, tmp_path):
    path, _ = tiny_quantized
    model = load(path)
    model.save_pretrained(tmp_path / "a")
    model.save_pretrained(tmp_path / "b")
    ids = [load(tmp_path / n).config.quantization_config.save_id for n in ("a", "b")]
    assert all(ids) and ids[0] != ids[1]


def test_interrupted_resave_is_refused_on_load_and_by_verify(tiny_src, tmp_path):
    """A save killed after its first shard, into a folder holding an older checkpoint with the same shards."""
    folder = tmp_path / "ckpt"
    old = AutoModelForCausalLM.from_pretrained(
        tiny_src, quantization_config=VcQuantizationConfig(bits=3, allocation="uniform", scaling="none"))  # fmt: skip
    old.save_pretrained(folder, max_shard_size="400KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    code = textwrap.dedent(f"""
        import os, torch, vc_quant, transformers.modeling_utils as mu
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tiny_src)!r},
            quantization_config=vc_quant.VcQuantizationConfig(bits=3, seed=1, allocation="uniform", scaling="none"))
        real = mu.safe_save_file
        def first_then_die(*args, **kwargs):
            real(*args, **kwargs)
            os._exit(9)  # as kill -9 after the first shard
        mu.safe_save_file = first_then_die
        m.save_pretrained({str(folder)!r}, max_shard_size="400KB")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 9, proc.stderr[-2000:]
    with pytest.raises(VcCorruptDataError, match="interrupted re-save"):
        load(folder)
    assert cli(["verify", str(folder)]) == 1


def test_save_atomic_keeps_the_old_checkpoint_until_the_new_one_is_complete(tiny_quantized, tmp_path, monkeypatch):
    path, ref = tiny_quantized
    dst = tmp_path / "dst"
    model = load(path)
    vc_quant.save_atomic(model, dst)
    before = load_file(str(dst / "model.safetensors"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        vc_quant.save_atomic(model, dst)
    after = load_file(str(dst / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    monkeypatch.undo()
    vc_quant.save_atomic(model, dst)  # a rerun replaces the leftover .partial
    assert not (tmp_path / "dst.partial").exists() and not (tmp_path / "dst.old").exists()
    with torch.no_grad():
        assert (load(dst)(IDS).logits - ref).abs().max() < 1e-5


def test_save_writes_a_model_card_but_keeps_the_users(tiny_quantized, tmp_path):
    path, _ = tiny_quantized
    model = load(path)
    model.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert "vc_quant" in card and "HEVC" in card and "bits per weight" in card and "pip install vc_quant" in card
    # (the tiny_quantized fixture is an HEVC checkpoint; rANS checkpoints name their codec as such)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("my card")
    model.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "my card"
