"""GGUF interop: read a llama.cpp model file into our checkpoint format.

``earlyexit convert gguf-import MODEL.gguf DST`` (and ``earlyexit.load("MODEL.gguf")``):

- **Weights** are read with the ``gguf`` package (``GGUFReader``) and dequantized with its
  ``gguf.quants.dequantize`` to fp32 (or the requested dtype): F32, F16, BF16, Q8_0, Q4_0,
  Q4_1, Q5_0, Q5_1, Q4_K, Q5_K and Q6_K. Other types are refused by name, before anything
  is written.
- **Names** map llama.cpp's (``blk.N.attn_q.weight``, ``ffn_gate``, ``token_embd``, ...) onto
  our plan (q/k/v fused into ``wqkv``, gate/up into ``w13``). llama.cpp's converter permutes
  the rows of q and k of ``llama`` models to its interleaved RoPE layout; we undo that
  permutation, so the rotate-half RoPE of our decoder (and of ``transformers``) applies.
  ``qwen2`` files are not permuted (llama.cpp runs them with NeoX RoPE, our layout).
- **Config** comes from the ``{arch}.*`` metadata; an absent ``output.weight`` means a tied head.
- **Tokenizer and chat template**: the vocabulary, merges and pre-tokenizer in the metadata
  are turned into a ``tokenizer.json`` by ``transformers``' GGUF tokenizer converter (a
  well-kept implementation of every llama.cpp pre-tokenizer; we do not write our own), and
  ``tokenizer.chat_template`` goes into ``tokenizer_config.json`` with the special tokens.

Parity with ``transformers``' own GGUF loading of the same file is tested in
``tests/test_gguf.py`` on small files the test writes with ``gguf.GGUFWriter``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from earlyexit.config import ModelConfig, RopeScaling, SharingConfig
from earlyexit.errors import CheckpointError, ConfigError
from earlyexit.io.checkpoint import build_model, save_checkpoint
from earlyexit.models.decoder import Decoder
from earlyexit.tokenizer import Tokenizer

ARCHITECTURES = ("llama", "qwen2")
# quantization types we dequantize (through gguf.quants) and have tested
QUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def is_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            return p.is_file() and f.read(4) == b"GGUF"
    except OSError:
        return False


def _require_gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            "reading GGUF files needs the gguf package: pip install 'earlyexit[real]'"
        ) from None
    return gguf


def _open(path: Path):
    gguf = _require_gguf()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not is_gguf(path):
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic)")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/... on a cut file
        raise CheckpointError(
            f"{path}: truncated or corrupt GGUF file ({type(e).__name__}: {e})"
        ) from None


_REQUIRED = object()


def _field(reader, key: str, path: Path, default=_REQUIRED):
    """A metadata value; ``default`` when absent, or an error if there is none."""
    f = reader.fields.get(key)
    if f is None:
        if default is _REQUIRED:
            raise CheckpointError(f"{path}: GGUF metadata lacks {key}")
        return default
    return f.contents()


def config_from_gguf(reader, path: Path) -> ModelConfig:
    """Our :class:`ModelConfig` from a GGUF file's metadata and tensor names."""
    arch = _field(reader, "general.architecture", path)
    if arch not in ARCHITECTURES:
        raise ConfigError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}"
        )

    def meta(key: str, default=_REQUIRED):
        return _field(reader, f"{arch}.{key}", path, default)

    d_model = int(meta("embedding_length"))
    n_heads = int(meta("attention.head_count"))
    names = {t.name for t in reader.tensors}
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(meta("vocab_size", len(tokens.data) if tokens is not None else _REQUIRED))
    key_len = meta("attention.key_length", None)
    rope_type = meta("rope.scaling.type", "none")
    scaling = None
    if rope_type not in ("none", None):
        if rope_type != "linear":
            raise ConfigError(f"{path}: RoPE scaling {rope_type!r} is not supported (none, linear)")
        scaling = RopeScaling(type="linear", factor=float(meta("rope.scaling.factor")))
    bos = _field(reader, "tokenizer.ggml.bos_token_id", path, None)
    eos = _field(reader, "tokenizer.ggml.eos_token_id", path, None)
    qwen = arch == "qwen2"
    return ModelConfig(
        name=str(_field(reader, "general.name", path, arch)),
        vocab_size=vocab,
        d_model=d_model,
        n_layers=int(meta("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(meta("attention.head_count_kv", n_heads)),
        head_dim=int(key_len) if key_len else d_model // n_heads,
        d_ff=int(meta("feed_forward_length")),
        norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_context=int(meta("context_length", 2048)),
        tie_embeddings="output.weight" not in names,
        qkv_bias=qwen or "blk.0.attn_q.bias" in names,
        o_bias="blk.0.attn_output.bias" in names,
        eos_token_ids=() if eos is None else (int(eos),),
        bos_token_id=None if bos is None else int(bos),
        sharing=SharingConfig(),
    )


def _unpermute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, rows (half, i) were stored as (i, half).

    (out, ...) with out = heads x head_dim; the GGUF layout of one head interleaves its two
    rotary halves, ours (and transformers') keeps them as two blocks."""
    hd = w.shape[0] // heads
    rest = w.shape[1:]
    return w.reshape(heads, hd // 2, 2, *rest).transpose(1, 2).reshape(w.shape)


def _tensor(reader_tensor, path: Path, dtype: torch.dtype) -> torch.Tensor:
    from gguf import quants

    t = reader_tensor
    kind = t.tensor_type.name
    if kind not in QUANT_TYPES:
        raise CheckpointError(
            f"{path}: tensor {t.name} is stored as {kind}, which earlyexit does not read "
            f"(supported: {', '.join(QUANT_TYPES)})"
        )
    shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists the fastest dimension first
    try:
        # F32 tensors come back as read-only views of the file's memory map
        data = np.require(quants.dequantize(t.data, t.tensor_type), np.float32, "W")
        # into torch's own (64-byte aligned) memory, in the target dtype
        return torch.empty(shape, dtype=dtype).copy_(torch.from_numpy(data.reshape(shape)))
    except (ValueError, IndexError, TypeError) as e:  # a file cut inside the tensor data
        raise CheckpointError(
            f"{path}: tensor {t.name} cannot be read ({type(e).__name__}: {e}); truncated file?"
        ) from None


def state_from_gguf(
    reader, cfg: ModelConfig, path: Path, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Our state dict from the GGUF tensors, dequantized one tensor at a time."""
    tensors = {t.name: t for t in reader.tensors}
    permuted = _field(reader, "general.architecture", path) == "llama"

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise CheckpointError(f"{path}: missing tensor {name}")
        return _tensor(tensors.pop(name), path, dtype)

    out = {
        "tok_embeddings.weight": take("token_embd.weight"),
        "norm.weight": take("output_norm.weight"),
    }
    if not cfg.tie_embeddings:
        out["head.weight"] = take("output.weight")
    for i in range(cfg.n_layers):
        p, q = f"blk.{i}.", f"blocks.{i}."
        out[q + "attn_norm.weight"] = take(p + "attn_norm.weight")
        out[q + "mlp_norm.weight"] = take(p + "ffn_norm.weight")
        wq, wk, wv = (take(p + f"attn_{n}.weight") for n in "qkv")
        if permuted:
            wq, wk = _unpermute(wq, cfg.n_heads), _unpermute(wk, cfg.n_kv_heads)
        out[q + "attn.wqkv.weight"] = torch.cat([wq, wk, wv])
        out[q + "attn.wo.weight"] = take(p + "attn_output.weight")
        if cfg.qkv_bias:
            bq, bk, bv = (take(p + f"attn_{n}.bias") for n in "qkv")
            if permuted:
                bq, bk = _unpermute(bq, cfg.n_heads), _unpermute(bk, cfg.n_kv_heads)
            out[q + "attn.wqkv.bias"] = torch.cat([bq, bk, bv])
        if cfg.o_bias:
            out[q + "attn.wo.bias"] = take(p + "attn_output.bias")
        out[q + "mlp.w13.weight"] = torch.cat(
            [take(p + "ffn_gate.weight"), take(p + "ffn_up.weight")]
        )
        out[q + "mlp.w2.weight"] = take(p + "ffn_down.weight")
    # rope_freqs (llama3 scaling tables) and similar derived tensors are not weights
    leftover = sorted(k for k in tensors if k not in ("rope_freqs.weight",))
    if leftover:
        raise CheckpointError(
            f"{path}: unexpected tensor(s) {', '.join(leftover[:5])}; this variant is not supported"
        )
    return out


def tokenizer_from_gguf(path: Path) -> tuple[Tokenizer | None, dict]:
    """``tokenizer.json`` (through transformers' GGUF converter) and ``tokenizer_config.json``
    contents (chat template, special tokens) from the GGUF metadata."""
    reader = _open(path)
    if "tokenizer.ggml.tokens" not in reader.fields:
        return None, {}
    try:
        import transformers
        from transformers import AutoTokenizer
    except ImportError:
        raise CheckpointError(
            f"{path}: converting its tokenizer needs transformers: pip install 'earlyexit[hf]'"
        ) from None
    transformers.utils.logging.set_verbosity_error()
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # an unknown pre-tokenizer or tokenizer model
        raise CheckpointError(
            f"{path}: its tokenizer cannot be converted ({type(e).__name__}: {e})"
        ) from None
    tok = Tokenizer(hf_tok.backend_tokenizer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = getattr(hf_tok, name, None)
        if isinstance(value, str):
            config[name] = value
    template = _field(reader, "tokenizer.chat_template", path, None)
    if template:
        config["chat_template"] = str(template)
    return tok, config


def read_gguf(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """(config, our state dict) of a GGUF file; validated before anything is returned."""
    path = Path(path)
    reader = _open(path)
    cfg = config_from_gguf(reader, path)
    state = state_from_gguf(reader, cfg, path, dtype or torch.float32)
    return cfg, {k: v.to(device) for k, v in state.items()}


def load_gguf(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Decoder, Tokenizer | None, dict]:
    """A :class:`Decoder` straight from a GGUF file, its tokenizer, and its tokenizer config."""
    cfg, state = read_gguf(path, device, dtype)
    tok, tok_cfg = tokenizer_from_gguf(Path(path))
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tok.vocab_size} tokens, the model {cfg.vocab_size}"
        )
    return build_model(cfg, state, str(path), device), tok, tok_cfg


def gguf_import(src: str | Path, dst: str | Path) -> Path:
    """Convert a GGUF file into an earlyexit checkpoint (written atomically: nothing is
    written if any tensor, the config or the tokenizer cannot be read)."""
    from earlyexit.chat import chat_files

    model, tok, tok_cfg = load_gguf(src)
    return save_checkpoint(model, dst, tokenizer=tok, extra_files=chat_files(tok_cfg))
