#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz targets into fuzz/corpus/<target>/seed_*.

The committed corpus is these seeds plus what fuzz/run.sh's fuzzing found and merged
(files named by their SHA-1). Run from anywhere: python3 fuzz/make_seeds.py
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def out(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode("utf-8")
    with open(os.path.join(d, "seed_" + name), "wb") as f:
        f.write(data)


def st_file(entries, metadata=None, pad=True, header_len=None, data_extra=b""):
    """entries: list of (name, dtype, shape, raw bytes)."""
    h, data = {}, b""
    if metadata is not None:
        h["__metadata__"] = metadata
    for name, dt, shape, raw in entries:
        h[name] = {"dtype": dt, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(h, separators=(",", ":")).encode()
    if pad:
        text += b" " * ((8 - (8 + len(text)) % 8) % 8)
    n = len(text) if header_len is None else header_len
    return struct.pack("<Q", n) + text + data + data_extra


# ---- safetensors ----------------------------------------------------------------------------
f32 = struct.pack("<4f", 1, 2, 3, 4)
valid = st_file([("w", "F32", [2, 2], f32), ("b", "BF16", [2], b"\x80\x3f\x00\x40"),
                 ("i", "I64", [2], struct.pack("<2q", 7, -1)), ("m", "BOOL", [3], b"\x01\x00\x01"),
                 ("h", "F16", [1], b"\x00\x3c"), ("u", "U8", [1, 1], b"\x05"), ("d", "F64", [1], struct.pack("<d", 0.5)),
                 ("q", "F4", [2], b"\x12"), ("e", "F32", [0, 3], b""), ("s", "I32", [], struct.pack("<i", 3))],
                metadata={"format": "pt"})
out("safetensors", "valid.safetensors", valid)
out("safetensors", "empty_header.safetensors", st_file([]))
out("safetensors", "truncated.safetensors", valid[:-5])
out("safetensors", "len_past_end.safetensors", st_file([("w", "F32", [2, 2], f32)], header_len=10**6))
out("safetensors", "huge_len.safetensors", struct.pack("<Q", 2**64 - 1) + b"{}")
out("safetensors", "overlap.safetensors",
    struct.pack("<Q", 96) + json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
                                       separators=(",", ":")).encode().ljust(96) + b"\0" * 12)
out("safetensors", "big_shape.safetensors",
    st_file([("w", "F32", [4294967296, 4294967296, 0], b"")]))
out("safetensors", "zero_then_big.safetensors", st_file([("w", "F32", [0, 2**62, 2**62], b"")]))
out("safetensors", "header.json",
    '{"__metadata__":{"a":"b"},"t":{"dtype":"F8_E4M3","shape":[3,1],"data_offsets":[0,3]},'
    '"u":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[3,6]}}')
out("safetensors", "dup.json", '{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
    '"t":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}')
out("safetensors", "neg.json", '{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}')
out("safetensors", "float_offsets.json", '{"t":{"dtype":"F32","shape":[1],"data_offsets":[0.0,4.5]}}')

# ---- index ----------------------------------------------------------------------------------
def index(wm, **extra):
    j = {"metadata": {"total_size": 28}, "weight_map": wm}
    j.update(extra)
    return json.dumps(j, indent=2)

out("index", "valid.json", index({"x": "a.safetensors", "y": "a.safetensors", "z": "b.safetensors"}))
out("index", "missing_shard.json", index({"x": "a.safetensors", "y": "a.safetensors", "z": "c.safetensors"}))
out("index", "wrong_shard.json", index({"x": "b.safetensors", "y": "a.safetensors", "z": "b.safetensors"}))
out("index", "not_stored.json", index({"x": "a.safetensors", "w": "a.safetensors"}))
out("index", "bad_name.json", index({"x": "../a.safetensors", "y": "/etc/passwd", "z": ".."}))
out("index", "nul_name.json", index({"x": "a.safetensors\u0000.txt"}))
out("index", "not_st.json", index({"x": "notes.txt"}))
out("index", "self.json", index({"x": "model.safetensors.index.json"}))
out("index", "no_map.json", '{"metadata":{}}')
out("index", "list.json", '[1,2,3]')

# ---- config ---------------------------------------------------------------------------------
for comp, fname in [("text_encoder", "config.json"), ("transformer", "config.json"), ("vae", "config.json"),
                    ("scheduler", "scheduler_config.json")]:
    with open(os.path.join(ROOT, "models", "tiny-zimage", comp, fname), "rb") as f:
        out("config", comp + ".json", f.read())
out("config", "turbo_transformer.json", json.dumps({
    "_class_name": "ZImageTransformer2DModel", "all_f_patch_size": [1], "all_patch_size": [2],
    "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "cap_feat_dim": 2560, "dim": 3840,
    "in_channels": 16, "n_heads": 30, "n_kv_heads": 30, "n_layers": 30, "n_refiner_layers": 2,
    "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0, "t_scale": 1000.0}))
out("config", "turbo_scheduler.json", json.dumps({
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True, "time_shift_type": "linear", "shift_terminal": 0.1}))
out("config", "qwen_rope_old.json", json.dumps({
    "hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "intermediate_size": 9728, "vocab_size": 151936, "rope_theta": 1000000.0,
    "rope_scaling": None, "rms_norm_eps": 1e-6}))
out("config", "big_numbers.json", '{"dim": 1e300, "n_heads": 2147483648, "hidden_size": -0.5, '
    '"block_out_channels": [32, 4294967296], "num_train_timesteps": 1e18, "shift": 1e308}')

# ---- tokenizer.json -------------------------------------------------------------------------
def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}

bu = bytes_to_unicode()
vocab = {bu[b]: i for i, b in enumerate(range(256))}
merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("l", "l"), ("e", "ll"), ("h", "ell"), ("hell", "o"), ("Ġ", "Ġ")]
for a, b in merges:
    vocab.setdefault(a + b, len(vocab))
qwen_split = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
              "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")

def tokenizer(merge_form="pairs", normalizer={"type": "NFC"}, pre=None, added=True, **model_extra):
    model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
             "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
             "vocab": vocab,
             "merges": [list(m) for m in merges] if merge_form == "pairs" else [a + " " + b for a, b in merges]}
    model.update(model_extra)
    if pre is None:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": qwen_split}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    j = {"version": "1.0", "truncation": None, "padding": None,
         "added_tokens": [{"id": len(vocab) + k, "content": c, "special": True} for k, c in
                          enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])] if added else [],
         "normalizer": normalizer, "pre_tokenizer": pre, "model": model}
    return json.dumps(j, ensure_ascii=False)

out("tokenizer_json", "qwen_like.json", tokenizer())
out("tokenizer_json", "string_merges.json", tokenizer(merge_form="strings", normalizer=None, added=False))
out("tokenizer_json", "gpt2_bytelevel.json",
    tokenizer(pre={"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, ignore_merges=True,
              normalizer={"type": "Sequence", "normalizers": [{"type": "NFC"}]}))
out("tokenizer_json", "no_pretok.json", tokenizer(pre=None and {}, normalizer=None).replace(
    '"pre_tokenizer": {"type": "Sequence"', '"pre_tokenizer": {"type": "Sequence"'))
out("tokenizer_json", "null_pretok.json", json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": []},
                                                      "pre_tokenizer": None, "normalizer": None}, ensure_ascii=False))
out("tokenizer_json", "empty_match_regex.json", tokenizer(pre={
    "type": "Split", "pattern": {"Regex": "a*"}, "behavior": "Isolated", "invert": False}))
out("tokenizer_json", "bad_regex.json", tokenizer(pre={
    "type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated", "invert": False}))
out("tokenizer_json", "sparse_ids.json", json.dumps(
    {"model": {"type": "BPE", "vocab": {**vocab, "zz": 70000}, "merges": []},
     "added_tokens": [{"id": 99999, "content": "<x>"}]}, ensure_ascii=False))
out("tokenizer_json", "missing_byte.json", json.dumps(
    {"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a a"]}}))

# ---- tokenize -------------------------------------------------------------------------------
for name, text in [
    ("ascii", "a red fox standing in fresh snow, watercolor"),
    ("chat", "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"),
    ("cjk", "一只猫坐在窗台上，阳光明媚。"),
    ("emoji", "🦊🦊 and 👩‍👩‍👧 ok"),
    ("combining", "cafe\u0301 A\u030a \u1e9b\u0323 \uac00\u11a8"),
    ("numbers", "3.14159 1,000,000 ２０２４"),
    ("spaces", "   leading\t\ttabs\r\n\r\n  trailing   "),
    ("contractions", "I'M you'RE they'll it's we'd"),
    ("specials_partial", "<|im_sta <|endoftext|><|im_end|x"),
    ("mongolian_vs", "a\u180eb \u00a0c\u2028d"),
]:
    out("tokenize", name + ".txt", text)
out("tokenize", "invalid_utf8.bin", b"ok \xff\xfe \xc3\x28 \xed\xa0\x80 \xf4\x90\x80\x80 end")
out("tokenize", "truncated_utf8.bin", b"abc \xe4\xb8")
out("tokenize", "long_word.txt", "x" * 2000)
out("tokenize", "nul.bin", b"a\x00b\x00\x00c")

# ---- layout (single-file checkpoints) ---------------------------------------------------------
def f32s(n, v=0.5):
    return struct.pack("<%df" % n, *([v] * n))


def bf16s(n):
    return b"\x80\x3f" * n


out("layout", "comfy_transformer.safetensors", st_file([
    ("layers.0.attention.qkv.weight", "BF16", [6, 2], bf16s(12)),
    ("layers.0.attention.out.weight", "BF16", [2, 2], bf16s(4)),
    ("layers.0.attention.q_norm.weight", "F32", [2], f32s(2)),
    ("x_embedder.weight", "F32", [2, 4], f32s(8)),
    ("cap_embedder.1.weight", "F32", [2, 3], f32s(6)),
    ("norm_final.weight", "F32", [2], f32s(2))]))
out("layout", "aio_prefixes.safetensors", st_file([
    ("model.diffusion_model.layers.0.attention.qkv.weight", "F32", [3, 1], f32s(3)),
    ("text_encoders.qwen3_4b.transformer.model.embed_tokens.weight", "F32", [4, 2], f32s(8)),
    ("text_encoders.qwen3_4b.transformer.model.layers.0.self_attn.q_norm.weight", "F32", [2], f32s(2)),
    ("first_stage_model.decoder.mid.attn_1.q.weight", "F32", [2, 2, 1, 1], f32s(4)),
    ("first_stage_model.decoder.up.0.block.0.conv2.weight", "F32", [2, 2, 1, 1], f32s(4)),
    ("first_stage_model.decoder.conv_in.weight", "F32", [2, 1, 1, 1], f32s(2)),
    ("stray", "U8", [1], b"\x01")]))
out("layout", "qkv_not_multiple_of_3.safetensors", st_file([("layers.0.attention.qkv.weight", "F32", [4, 1], f32s(4))]))
out("layout", "qkv_and_to_k.safetensors", st_file([
    ("layers.0.attention.qkv.weight", "F32", [3, 1], f32s(3)), ("layers.0.attention.to_k.weight", "F32", [1, 1], f32s(1))]))
out("layout", "qkv_scalar.safetensors", st_file([("layers.0.attention.qkv.weight", "F32", [], f32s(1))]))
out("layout", "vae_reversed_blocks.safetensors", st_file([
    ("decoder.up.7.block.0.conv1.weight", "F32", [1, 1, 1, 1], f32s(1)),
    ("decoder.up.0.upsample.conv.bias", "F32", [1], f32s(1)),
    ("encoder.down.99999999.block.0.nin_shortcut.weight", "F32", [1], f32s(1))]))

# ---- lora (adapter files) ---------------------------------------------------------------------
out("lora", "peft.safetensors", st_file([
    ("transformer.layers.0.attention.to_q.lora_A.weight", "F32", [1, 2], f32s(2)),
    ("transformer.layers.0.attention.to_q.lora_B.weight", "F32", [2, 1], f32s(2))]))
out("lora", "kohya_alpha.safetensors", st_file([
    ("lora_unet_layers_0_attention_to_out_0.lora_down.weight", "F16", [1, 2], b"\x00\x3c" * 2),
    ("lora_unet_layers_0_attention_to_out_0.lora_up.weight", "F16", [2, 1], b"\x00\x3c" * 2),
    ("lora_unet_layers_0_attention_to_out_0.alpha", "F32", [], f32s(1))]))
out("lora", "comfy_qkv.safetensors", st_file([
    ("diffusion_model.layers.0.attention.qkv.lora_A.weight", "F32", [1, 2], f32s(2)),
    ("diffusion_model.layers.0.attention.qkv.lora_B.weight", "F32", [6, 1], f32s(6))]))
out("lora", "loha.safetensors", st_file([
    ("lora_unet_layers_0_attention_to_q.hada_w1_a", "F32", [2, 1], f32s(2)),
    ("lora_unet_layers_0_attention_to_q.hada_w1_b", "F32", [1, 2], f32s(2)),
    ("lora_unet_layers_0_attention_to_q.hada_w2_a", "F32", [2, 1], f32s(2)),
    ("lora_unet_layers_0_attention_to_q.hada_w2_b", "F32", [1, 2], f32s(2)),
    ("lora_unet_layers_0_attention_to_q.alpha", "F32", [], f32s(1))]))
out("lora", "lokr.safetensors", st_file([
    ("lycoris_layers_0_attention_qkv.lokr_w1", "F32", [3, 1], f32s(3)),
    ("lycoris_layers_0_attention_qkv.lokr_w2_a", "F32", [2, 1], f32s(2)),
    ("lycoris_layers_0_attention_qkv.lokr_w2_b", "F32", [1, 2], f32s(2)),
    ("lycoris_layers_0_attention_qkv.alpha", "F32", [], f32s(1))]))
out("lora", "nan_alpha.safetensors", st_file([
    ("lora_unet_layers_0_attention_to_q.lora_down.weight", "F32", [1, 2], f32s(2)),
    ("lora_unet_layers_0_attention_to_q.lora_up.weight", "F32", [2, 1], f32s(2)),
    ("lora_unet_layers_0_attention_to_q.alpha", "F32", [], struct.pack("<f", float("nan")))]))
out("lora", "rank_mismatch.safetensors", st_file([
    ("transformer.layers.0.attention.to_q.lora_A.weight", "F32", [2, 2], f32s(4)),
    ("transformer.layers.0.attention.to_q.lora_B.weight", "F32", [2, 1], f32s(2))]))
out("lora", "loha_rank_mismatch.safetensors", st_file([
    ("x.hada_w1_a", "F32", [2, 1], f32s(2)), ("x.hada_w1_b", "F32", [2, 2], f32s(4)),
    ("x.hada_w2_a", "F32", [2, 1], f32s(2)), ("x.hada_w2_b", "F32", [1, 2], f32s(2))]))
