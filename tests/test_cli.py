import subprocess
import sys

import torch
from safetensors.torch import load_file, save_file

from vc_quant.cli import main


def shard_metadata(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_compress_inspect_verify(tiny_src, tmp_path, capsys):
    dst = tmp_path / "q"
    assert main(["compress", str(tiny_src), str(dst), "--bits", "3", "--config", "configs/fast.yaml"]) == 0
    assert (dst / "config.json").exists() and not (tmp_path / "q.partial").exists()
    assert main(["inspect", str(dst)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.0.mlp.down_proj.weight" in out and "quantized: 14 tensors" in out
    assert main(["verify", str(dst)]) == 0
    assert "verified 14 compressed and 6 plain tensors in 1 shard(s): ok" in capsys.readouterr().out


def test_compress_refuses_to_overwrite(tiny_src, tmp_path, capsys):
    (tmp_path / "q").mkdir()
    assert main(["compress", str(tiny_src), str(tmp_path / "q")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_verify_reports_corruption(tiny_quantized, copy_dir, capsys):
    path = copy_dir(tiny_quantized[0])
    sd, metadata = load_file(str(path / "model.safetensors")), shard_metadata(path / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    sd[key] = sd[key][:-7].clone()
    save_file(sd, str(path / "model.safetensors"), metadata=metadata)
    assert main(["verify", str(path)]) == 1
    captured = capsys.readouterr()
    assert f"FAIL {key}" in captured.err and "truncated" in captured.err


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "vc_quant.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "compress" in proc.stdout
    assert torch.__version__  # the CLI imports torch lazily enough to print help
