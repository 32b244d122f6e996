"""The bad-input and fault catalogue: every case gets a clear error (or works), nothing is lost or trusted.

Inputs to the codec, configs and presets, crafted and corrupted checkpoints, the CLI, the KV cache.
"""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from vc_quant import (
    EncodedTensor,
    VcConfigError,
    VcCorruptDataError,
    VcInputError,
    VcQuantizationConfig,
    VcQuantizedCache,
    decode_tensor,
    encode_tensor,
)
from vc_quant.cli import main as cli
from vc_quant.codec.record import checksum
from vc_quant.codec.video import frames as fr

KEY = "model.layers.1.mlp.down_proj.weight"


def metadata(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def rewrite(folder, change) -> None:
    """Apply ``change(state_dict)`` to the single shard, keeping its safetensors metadata."""
    shard = folder / "model.safetensors"
    sd, meta = load_file(str(shard)), metadata(shard)
    change(sd)
    save_file(sd, str(shard), metadata=meta)


def set_meta(sd, key, meta, fix_crc=True) -> None:
    """Write ``meta`` into the record of ``key`` (re-computing the CRC, as an attacker would)."""
    enc = EncodedTensor(sd[key], sd[key + "_vc_center"], sd[key + "_vc_step"], meta,
                        col_scale=sd.get(key + "_vc_colscale"))  # fmt: skip
    if fix_crc:
        enc.meta["crc32"] = checksum(enc)
    sd[key + "_vc_meta"] = enc.to_dict()["meta"]


# --- tensors handed to the codec ---------------------------------------------------------------
@pytest.mark.parametrize(
    "tensor,match",
    [
        (torch.tensor([1.0, float("nan")]), "1 NaN"),
        (torch.tensor([[float("inf"), 1.0]]), "1 Inf"),
        (torch.zeros(0, 4), "empty"),
        (torch.zeros(3, 3, dtype=torch.int32), "dtype torch.int32"),
        (torch.tensor([60000.0, 1.0], dtype=torch.float16), "could overflow"),
        (torch.tensor([3e38, -1.0]), "could overflow"),
    ],
)
def test_bad_tensors_are_refused(tensor, match):
    with pytest.raises(VcInputError, match=match):
        encode_tensor(tensor, 3.0, name="w")


@pytest.mark.parametrize("shape", [(), (1,), (7,), (1, 1), (3, 1, 5), (1, 9000)])
def test_odd_shapes_round_trip(shape):
    t = torch.randn(shape) * 0.1
    out = decode_tensor(encode_tensor(t, 4.0))
    assert out.shape == t.shape and torch.isfinite(out).all()


def test_values_near_the_fp16_limit_that_fit_still_decode_finite():
    t = torch.randn(64, 64, dtype=torch.float16) * 1000
    t[0, 0] = 16000.0  # a quarter of fp16's range: accepted, and decodes finite
    out = decode_tensor(encode_tensor(t, 6.0))
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "options,match",
    [
        ({"bits": 0.5}, r"bits=0\.5.*\[1, 8\]"),
        ({"bits": "3"}, "bits='3'"),
        ({"bits": float("nan")}, "bits=nan"),
        ({"bits": 3, "codec": "vp9"}, "codec='vp9'"),
        ({"bits": 3, "preset": "bogus"}, "preset='bogus'"),
        ({"bits": 3, "seed": "x"}, "seed='x'"),
        ({"bits": 3, "tile": "2048"}, "tile='2048'"),
        ({"bits": 3, "codec": "hevc", "encoder_params": "csv=/tmp/x.csv"}, "'csv' is not an allowed hevc parameter"),
        ({"bits": 3, "codec": "hevc", "encoder_params": "rdoq-level=9"}, "rdoq-level='9'"),
        ({"bits": 3, "codec": "rans", "encoder_params": "rdoq-level=2"}, "an option of the video codecs, not of "
         "codec='rans'"),
        ({"bits": 3, "codec": "av1", "encoder_params": "stat-file=/tmp/x"}, "'stat-file' is not an allowed av1"),
    ],
)
def test_bad_codec_options_are_refused_before_any_encode(options, match):
    with pytest.raises(VcConfigError, match=match):
        encode_tensor(torch.ones(16, 16), **options)


# --- configs and presets -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"modules_to_not_convert": "mlp"}, r"write \['mlp'\]"),
        ({"seed": "x"}, "seed='x'"),
        ({"preset": "bogus"}, "preset='bogus'"),
        ({"tile": "2048"}, "tile='2048'"),
        ({"bits": 9}, r"bits=9.*\[1, 8\]"),
        ({"overrides": {"x": "3"}}, r"overrides\['x'\]"),
        ({"codec": "hevc", "encoder_params": "csv=/any/path"}, "'csv' is not an allowed"),
        ({"codec": "hevc", "encoder_params": "analysis-save=/tmp/a"}, "'analysis-save' is not an allowed"),
        ({"codec": "hevc", "encoder_params": "frobnicate=1"}, "'frobnicate' is not an allowed"),
        ({"codec": "rans", "encoder_params": "rdoq-level=2"}, "an option of the video codecs"),
        ({"codec": "rans", "quantizer": "tcq"}, "quantizer='tcq'"),
        ({"codec": "rans", "preset": "slow"}, "preset='slow' is an option of the video codecs"),
        ({"resident": "fp4"}, "resident='fp4'"),
        ({"prefetch": -1}, "prefetch=-1"),
        ({"min_numel": 1.5}, "min_numel=1.5"),
        ({"save_id": "../../etc"}, "save_id="),
        ({"quant_method": "gptq"}, "quant_method='gptq'"),
    ],
)
def test_config_holes_are_closed(kwargs, match):
    with pytest.raises(VcConfigError, match=match):
        VcQuantizationConfig(**kwargs)


def test_a_decoder_that_cannot_decode_the_checkpoints_codec_is_refused_at_load(tiny_quantized):
    # a loading config does not know the checkpoint's codec: the check runs once they are merged
    config = VcQuantizationConfig(decode_backend="triton")  # tiny_quantized holds HEVC records
    with pytest.raises(VcConfigError, match="does not decode codec='hevc'; its GPU decoder is 'nvdec'"):
        AutoModelForCausalLM.from_pretrained(tiny_quantized[0], quantization_config=config)


def test_a_missing_calibration_file_fails_before_loading(tiny_src, tmp_path):
    config = VcQuantizationConfig(calibration=str(tmp_path / "nope.txt"))
    with pytest.raises(VcConfigError, match="no such file"):
        AutoModelForCausalLM.from_pretrained(tiny_src, quantization_config=config)


@pytest.mark.parametrize("text,match", [("{bits: [", "not valid yaml"), ("- 1\n- 2", "mapping")])
def test_broken_presets_are_refused(tmp_path, text, match):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(VcConfigError, match=match):
        VcQuantizationConfig.from_file(path)


def test_a_model_without_linear_layers_is_refused_with_a_reason(tmp_path):
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=128)).save_pretrained(tmp_path)
    with pytest.raises(VcConfigError, match="Conv1D"):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=VcQuantizationConfig(bits=3))


# --- crafted and corrupted checkpoints ---------------------------------------------------------
def test_decompression_bomb_is_refused_before_decoding(tiny_quantized, copy_dir):
    folder = copy_dir(tiny_quantized[0])

    def bomb(sd):
        meta = json.loads(bytes(sd[KEY + "_vc_meta"].numpy()))
        big = fr.FrameLayout(meta["layout"]["rows"], meta["layout"]["cols"], 1, 1, 1, 8192, 8192, 64)
        meta["layout"] = big.to_dict()
        meta["frame_bytes"] = [sd[KEY].numel()] + [1] * 63
        sd[KEY] = torch.cat([sd[KEY], torch.zeros(63, dtype=torch.uint8)])
        set_meta(sd, KEY, meta)

    rewrite(folder, bomb)
    with pytest.raises(VcCorruptDataError, match="not the one the encoder plans"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert cli(["verify", str(folder)]) == 1


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda m: m.pop("layout"), "'layout' is missing"),
        (lambda m: m.update(format=99), "format version 99"),
        (lambda m: m.update(shape=[512, -1]), r"positive integers|does not match the model"),
        (lambda m: m.update(frame_bytes=m["frame_bytes"] + [5]), "frame sizes"),
        (lambda m: m.update(codec="vp9"), "planned|codec"),
    ],
)
def test_crafted_metadata_is_refused_with_a_readable_message(tiny_quantized, copy_dir, edit, match):
    folder = copy_dir(tiny_quantized[0])

    def craft(sd):
        meta = json.loads(bytes(sd[KEY + "_vc_meta"].numpy()))
        edit(meta)
        set_meta(sd, KEY, meta)

    rewrite(folder, craft)
    with pytest.raises((VcCorruptDataError, VcConfigError), match=match):
        AutoModelForCausalLM.from_pretrained(folder)
    assert cli(["verify", str(folder)]) == 1


def test_oversized_metadata_is_refused_before_it_is_parsed(tiny_quantized, copy_dir):
    folder = copy_dir(tiny_quantized[0])
    rewrite(folder, lambda sd: sd.update({KEY + "_vc_meta": torch.full((2 << 20,), 32, dtype=torch.uint8)}))
    with pytest.raises(VcCorruptDataError, match="metadata entry"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_swapped_records_of_same_shape_tensors_are_detected(tiny_quantized, copy_dir):
    folder = copy_dir(tiny_quantized[0])
    a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.o_proj.weight"

    def swap(sd):
        for suffix in ("", "_vc_center", "_vc_step", "_vc_meta", "_vc_colscale"):
            sd[a + suffix], sd[b + suffix] = sd[b + suffix], sd[a + suffix]

    rewrite(folder, swap)
    with pytest.raises(VcCorruptDataError, match="written for"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert cli(["verify", str(folder)]) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupted_bitstreams_are_detected(tiny_quantized, copy_dir, damage):
    folder = copy_dir(tiny_quantized[0])

    def hurt(sd):
        if damage == "flip":
            sd[KEY] = sd[KEY].clone()
            sd[KEY][len(sd[KEY]) // 2] ^= 0x10
        else:
            sd[KEY] = sd[KEY][:-9].clone()

    rewrite(folder, hurt)
    with pytest.raises(VcCorruptDataError, match=r"checksum|truncated"):
        AutoModelForCausalLM.from_pretrained(folder)


def test_a_corrupted_plain_tensor_is_caught_on_load_and_by_verify(tiny_quantized, copy_dir, capsys):
    folder = copy_dir(tiny_quantized[0])

    def flip_exponent(sd):
        t = sd["model.embed_tokens.weight"].clone()
        t.view(-1).view(torch.uint8)[403] ^= 0x40  # an exponent bit of one fp32 value
        sd["model.embed_tokens.weight"] = t

    rewrite(folder, flip_exponent)
    with pytest.raises(VcCorruptDataError, match=r"model\.embed_tokens\.weight: checksum mismatch"):
        AutoModelForCausalLM.from_pretrained(folder)
    assert cli(["verify", str(folder)]) == 1
    assert "FAIL model.embed_tokens.weight: checksum mismatch" in capsys.readouterr().err


@pytest.mark.parametrize(
    "edit,match",
    [({"codec": "vp9"}, "codec='vp9'"), ({"format_version": 99}, "format_version=99"), ({"tile": "x"}, "tile='x'")],
)
def test_an_edited_quantization_config_is_refused(tiny_quantized, copy_dir, edit, match):
    folder = copy_dir(tiny_quantized[0])
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(VcConfigError, match=match):
        AutoModelForCausalLM.from_pretrained(folder)
    assert cli(["verify", str(folder)]) == 1


def test_a_missing_shard_is_named(tiny_src, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_src, quantization_config=VcQuantizationConfig(bits=3))
    model.save_pretrained(tmp_path, max_shard_size="300KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    assert cli(["verify", str(tmp_path)]) == 2  # cannot even be opened: exit 2 with the reason
    with pytest.raises((VcCorruptDataError, OSError), match=r"missing|No such file|not found"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_a_damaged_shard_header_gives_a_readable_error(tiny_quantized, copy_dir, capsys):
    folder = copy_dir(tiny_quantized[0])
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:20] = b"\xff" * 12  # inside the JSON header
    shard.write_bytes(bytes(data))
    assert cli(["verify", str(folder)]) == 2
    assert "not a readable safetensors file" in capsys.readouterr().err


def test_records_split_across_shards_are_all_verified(tiny_src, tmp_path, capsys):
    model = AutoModelForCausalLM.from_pretrained(tiny_src, quantization_config=VcQuantizationConfig(bits=3))
    model.save_pretrained(tmp_path, max_shard_size="40KB")  # entries of one record land in different shards
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    split = [k for k in index if k + "_vc_meta" in index and index[k] != index[k + "_vc_meta"]]
    assert split, "the test needs a record whose entries are in different shards"
    assert cli(["verify", str(tmp_path)]) == 0
    assert "verified 14 compressed" in capsys.readouterr().out


def test_verify_explains_an_uncompressed_model(tiny_src, capsys):
    assert cli(["verify", str(tiny_src)]) == 1
    assert "not a vc_quant checkpoint" in capsys.readouterr().err


# --- the CLI -----------------------------------------------------------------------------------
def test_compress_refuses_to_overwrite_its_source(tiny_src, capsys):
    assert cli(["compress", str(tiny_src), str(tiny_src), "--overwrite"]) == 2
    assert "destroy the source" in capsys.readouterr().err
    assert (tiny_src / "model.safetensors").exists()


def test_compress_cli_errors_are_clean(tiny_src, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli(["compress", str(tiny_src), str(tmp_path / "file"), "--overwrite"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert cli(["compress", str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli(["compress", str(tiny_src), str(tmp_path / "out"), "--dtype", "float8"])
    assert exit_.value.code == 2 and "invalid choice: 'float8'" in capsys.readouterr().err


def test_killed_compress_leaves_the_previous_checkpoint_and_a_rerun_cleans_up(tiny_src, tmp_path):
    dst = tmp_path / "dst"
    fast = ["--allocation", "uniform", "--scaling", "none"]
    assert cli(["compress", str(tiny_src), str(dst), "--bits", "3", *fast]) == 0
    before = load_file(str(dst / "model.safetensors"))
    code = textwrap.dedent(f"""
        import os, transformers.modeling_utils as mu
        from vc_quant.cli import main
        def die(*args, **kwargs):
            os._exit(9)  # as kill -9 while the new checkpoint is being written
        mu.safe_save_file = die
        main(["compress", {str(tiny_src)!r}, {str(dst)!r}, "--bits", "4", *{fast!r}, "--overwrite"])
    """)
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 9
    after = load_file(str(dst / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert cli(["compress", str(tiny_src), str(dst), "--bits", "4", *fast, "--overwrite"]) == 0
    assert not (tmp_path / "dst.partial").exists()


# --- the KV cache ------------------------------------------------------------------------------
def test_bad_kv_cache_options_fail_at_construction(tiny_src):
    config = AutoModelForCausalLM.from_pretrained(tiny_src).config
    with pytest.raises(VcConfigError, match="preset='turbo'"):
        VcQuantizedCache(config, preset="turbo")
    with pytest.raises(VcConfigError, match="'csv' is not an allowed"):
        VcQuantizedCache(config, codec="hevc", encoder_params="csv=/tmp/x")


def test_beam_search_runs_past_block_flushes(tiny_src):
    model = AutoModelForCausalLM.from_pretrained(tiny_src)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    cache = VcQuantizedCache(model.config, bits=4.0, residual_length=8, block_tokens=8, sink_tokens=2)
    out = model.generate(ids, cache=cache, num_beams=3, max_new_tokens=40, do_sample=False, min_new_tokens=40)
    assert out.shape[1] == ids.shape[1] + 40
    assert cache.layers[0].compressed_tokens() >= 32  # several blocks were flushed while beams reordered


def test_kv_cache_rate_lands_on_the_target(tiny_src):
    model = AutoModelForCausalLM.from_pretrained(tiny_src)
    cache = VcQuantizedCache(model.config, bits=2.5, residual_length=64, block_tokens=64)
    ids = torch.randint(1, 250, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for chunk in ids.split(64, dim=1):
            model(chunk, cache=cache, use_cache=True)
    rate = cache.compressed_bits_per_element()
    assert math.isfinite(rate) and abs(rate - 2.5) < 0.25, rate
