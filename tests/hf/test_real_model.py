"""One short real-model check: SmolLM2-135M quantized on load, saved, reloaded."""

import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM

import vc_quant


@pytest.mark.slow
def test_smollm2_quantize_save_reload(smollm2_dir, tmp_path):
    # quantize only layers 0-9 to keep CI short (~25 s); the rest stays fp16
    cfg = vc_quant.VcQuantizationConfig(
        bits=3.0, allocation="uniform", overrides={r"model\.layers\.([1-2][0-9])\..*": 0}
    )
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, quantization_config=cfg, dtype=torch.float16)
    report = model.vc_quant_report
    assert report.tensors == 70
    assert abs(report.bits_per_weight - 3.0) <= 0.03
    assert all(abs(t["bpw"] - 3.0) <= 0.03 for t in report.per_tensor.values())
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    model.save_pretrained(tmp_path)
    torch.save(logits, tmp_path / "ref.pt")
    code = textwrap.dedent(f"""
        import torch, vc_quant
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, dtype=torch.float16)
        with torch.no_grad():
            out = m(torch.tensor({ids.tolist()})).logits
        print((out - torch.load({str(tmp_path / "ref.pt")!r})).abs().max().item())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(proc.stdout.strip().splitlines()[-1]) == 0.0
