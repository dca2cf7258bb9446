"""Hugging Face interop: import Llama / Mistral / Qwen2 / SmolLM directories, export dense models.

- ``hf_import(src, dst)``: reads ``config.json`` and safetensors weights (single file or
  sharded with ``model.safetensors.index.json``; a hub name is downloaded when online),
  maps keys (q/k/v -> ``wqkv``, gate/up -> ``w13``) and writes our checkpoint format.
- ``hf_export(src, dst)``: writes ``config.json`` + ``model.safetensors`` (+ tokenizer) that
  ``transformers.AutoModelForCausalLM.from_pretrained`` loads. Only dense plans export: a
  layer-shared model is not a plain Hugging Face model.
- Reads both config styles: ``rope_theta`` + ``rope_scaling`` (transformers 4.x and every
  hub repo) and ``rope_parameters`` (transformers 5); writes the former, which both read.
- Never pickle: ``pytorch_model.bin`` checkpoints are refused with a hint.

Parity with ``transformers`` on the same weights is tested in ``tests/test_hf.py``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import torch

from earlyexit.config import ExitConfig, ModelConfig, RopeScaling, SharingConfig
from earlyexit.errors import CheckpointError, ConfigError
from earlyexit.files import atomic_dir
from earlyexit.io.checkpoint import build_model, read_safetensors, save_checkpoint
from earlyexit.models.decoder import Decoder
from earlyexit.strict import parse_dataclass
from earlyexit.tokenizer import Tokenizer

SUPPORTED = ("llama", "mistral", "qwen2")
EXTRA_KEY = "earlyexit"  # config key and tensor prefix for what plain transformers ignores  # SmolLM repositories are model_type "llama"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------------- config
def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict into a :class:`ModelConfig`."""
    mtype = hf.get("model_type")
    if mtype not in SUPPORTED:
        raise ConfigError(
            f"{source}: unsupported architecture model_type={mtype!r}; supported: {', '.join(SUPPORTED)}"
        )
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
    if hf.get("use_sliding_window") and mtype == "qwen2":
        raise ConfigError(
            f"{source}: Qwen2 per-layer sliding windows (use_sliding_window=true) are not supported"
        )
    try:
        n_heads = hf["num_attention_heads"]
        d_model = hf["hidden_size"]
        cfg = dict(
            name=hf.get("_name_or_path") or mtype,
            vocab_size=hf["vocab_size"],
            d_model=d_model,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or d_model // n_heads,
            d_ff=hf["intermediate_size"],
        )
    except KeyError as e:
        raise ConfigError(f"{source}: missing key {e.args[0]!r}") from None
    cfg["norm_eps"] = float(hf.get("rms_norm_eps", 1e-6))
    rope = dict(hf.get("rope_parameters") or {})  # transformers 5
    legacy = hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    cfg["rope_theta"] = float(theta)
    scaling = {**legacy, **rope}
    rtype = scaling.get("rope_type", scaling.get("type", "default"))
    if rtype not in ("default", None):
        if rtype not in ("linear", "llama3"):
            raise ConfigError(
                f"{source}: rope scaling type {rtype!r} is not supported (default, linear, llama3)"
            )
        cfg["rope_scaling"] = RopeScaling(
            type=rtype,
            factor=float(scaling.get("factor", 1.0)),
            low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
            high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
            original_max_position=int(scaling.get("original_max_position_embeddings", 8192)),
        )
    cfg["max_context"] = int(hf.get("max_position_embeddings", 2048))
    cfg["tie_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    if mtype == "qwen2":
        cfg["qkv_bias"], cfg["o_bias"] = True, False
    elif mtype == "llama":
        bias = bool(hf.get("attention_bias", False))
        cfg["qkv_bias"] = cfg["o_bias"] = bias
        cfg["mlp_bias"] = bool(hf.get("mlp_bias", False))
    if mtype == "mistral" and hf.get("sliding_window"):
        cfg["sliding_window"] = int(hf["sliding_window"])
    eos = hf.get("eos_token_id")
    cfg["eos_token_ids"] = tuple(eos if isinstance(eos, list) else [] if eos is None else [eos])
    cfg["bos_token_id"] = hf.get("bos_token_id")
    exits = ExitConfig()
    extra = hf.get(EXTRA_KEY)  # written by hf_export: exits survive a round trip
    if isinstance(extra, dict) and extra.get("exits"):
        try:
            exits = parse_dataclass(ExitConfig, extra["exits"], f"{EXTRA_KEY}.exits.")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    return ModelConfig(**cfg, sharing=SharingConfig(), exits=exits)


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A Hugging Face ``config.json`` dict for a dense :class:`ModelConfig`."""
    if cfg.sharing.scheme != "none":
        raise ConfigError(
            f"only dense models export to Hugging Face; this one shares layers ({cfg.sharing.scheme})"
        )
    if cfg.qkv_bias and not cfg.o_bias and not cfg.mlp_bias and cfg.sliding_window is None:
        mtype, arch = "qwen2", "Qwen2ForCausalLM"
    elif cfg.sliding_window is not None and not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias):
        mtype, arch = "mistral", "MistralForCausalLM"
    elif cfg.qkv_bias == cfg.o_bias and cfg.sliding_window is None:
        mtype, arch = "llama", "LlamaForCausalLM"
    else:
        raise ConfigError(
            "this combination of biases and sliding window has no Hugging Face family"
        )
    hf: dict[str, Any] = {
        "architectures": [arch],
        "model_type": mtype,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_context,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": list(cfg.eos_token_ids)
        if len(cfg.eos_token_ids) != 1
        else cfg.eos_token_ids[0],
        "torch_dtype": "float32",
    }
    if cfg.rope_scaling is not None and cfg.rope_scaling.type != "default":
        rs = cfg.rope_scaling
        hf["rope_scaling"] = {"rope_type": rs.type, "factor": rs.factor}
        if rs.type == "llama3":
            hf["rope_scaling"].update(
                low_freq_factor=rs.low_freq_factor,
                high_freq_factor=rs.high_freq_factor,
                original_max_position_embeddings=rs.original_max_position,
            )
    if mtype == "llama":
        hf["attention_bias"] = cfg.qkv_bias
        hf["mlp_bias"] = cfg.mlp_bias
    if mtype == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if mtype == "qwen2":
        hf["use_sliding_window"] = False
    if cfg.exits.steps:  # transformers ignores this key; hf-import reads it back
        hf[EXTRA_KEY] = {"exits": {**dataclasses.asdict(cfg.exits), "steps": list(cfg.exits.steps)}}
    return hf


# ---------------------------------------------------------------------- weights
def state_from_hf(
    hf_state: dict[str, torch.Tensor], cfg: ModelConfig, source: str
) -> dict[str, torch.Tensor]:
    """Map Hugging Face tensor names onto ours (consumes ``hf_state``)."""

    def take(name: str) -> torch.Tensor:
        if name not in hf_state:
            raise CheckpointError(f"{source}: missing tensor {name}")
        return hf_state.pop(name)

    out: dict[str, torch.Tensor] = {}
    out["tok_embeddings.weight"] = take("model.embed_tokens.weight")
    out["norm.weight"] = take("model.norm.weight")
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    else:
        out["head.weight"] = take("lm_head.weight")
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[q + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        out[q + "mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
        attn = [take(p + f"self_attn.{n}_proj.weight") for n in "qkv"]
        out[q + "attn.wqkv.weight"] = _cat(attn, source, p + "self_attn.{q,k,v}_proj.weight")
        out[q + "attn.wo.weight"] = take(p + "self_attn.o_proj.weight")
        if cfg.qkv_bias:
            bias = [take(p + f"self_attn.{n}_proj.bias") for n in "qkv"]
            out[q + "attn.wqkv.bias"] = _cat(bias, source, p + "self_attn.{q,k,v}_proj.bias")
        if cfg.o_bias:
            out[q + "attn.wo.bias"] = take(p + "self_attn.o_proj.bias")
        mlp = [take(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
        out[q + "mlp.w13.weight"] = _cat(mlp, source, p + "mlp.{gate,up}_proj.weight")
        out[q + "mlp.w2.weight"] = take(p + "mlp.down_proj.weight")
        if cfg.mlp_bias:
            out[q + "mlp.w13.bias"] = _cat(
                [take(p + "mlp.gate_proj.bias"), take(p + "mlp.up_proj.bias")],
                source,
                p + "mlp.{gate,up}_proj.bias",
            )
            out[q + "mlp.w2.bias"] = take(p + "mlp.down_proj.bias")
    for k in [k for k in hf_state if k.startswith(EXTRA_KEY + ".")]:  # exit norms, classifiers
        out[k[len(EXTRA_KEY) + 1 :]] = hf_state.pop(k)
    leftover = sorted(k for k in hf_state if not k.endswith("rotary_emb.inv_freq"))
    if leftover:
        raise CheckpointError(
            f"{source}: unexpected tensor(s) {', '.join(leftover[:5])}; this variant of the architecture is not supported"
        )
    return out


def _cat(parts: list[torch.Tensor], source: str, what: str) -> torch.Tensor:
    if len({p.shape[1:] for p in parts}) != 1:
        raise CheckpointError(
            f"{source}: tensors {what} have incompatible shapes {[tuple(p.shape) for p in parts]}"
        )
    return torch.cat(parts, dim=0)


def state_to_hf(model: Decoder) -> dict[str, torch.Tensor]:
    """Our dense state dict under Hugging Face names (q/k/v and gate/up split again)."""
    cfg = model.config
    sd = model.state_dict()
    out = {
        "model.embed_tokens.weight": sd["tok_embeddings.weight"],
        "model.norm.weight": sd["norm.weight"],
    }
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["head.weight"]
    sizes = (cfg.q_dim, cfg.kv_dim, cfg.kv_dim)
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"blocks.{i}."
        out[p + "input_layernorm.weight"] = sd[q + "attn_norm.weight"]
        out[p + "post_attention_layernorm.weight"] = sd[q + "mlp_norm.weight"]
        for n, t in zip("qkv", sd[q + "attn.wqkv.weight"].split(sizes)):
            out[p + f"self_attn.{n}_proj.weight"] = t
        if cfg.qkv_bias:
            for n, t in zip("qkv", sd[q + "attn.wqkv.bias"].split(sizes)):
                out[p + f"self_attn.{n}_proj.bias"] = t
        out[p + "self_attn.o_proj.weight"] = sd[q + "attn.wo.weight"]
        if cfg.o_bias:
            out[p + "self_attn.o_proj.bias"] = sd[q + "attn.wo.bias"]
        gate, up = sd[q + "mlp.w13.weight"].split(cfg.d_ff)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        out[p + "mlp.down_proj.weight"] = sd[q + "mlp.w2.weight"]
        if cfg.mlp_bias:
            gb, ub = sd[q + "mlp.w13.bias"].split(cfg.d_ff)
            out[p + "mlp.gate_proj.bias"], out[p + "mlp.up_proj.bias"] = gb, ub
            out[p + "mlp.down_proj.bias"] = sd[q + "mlp.w2.bias"]
    for k, v in sd.items():  # per-exit norms and classifiers ride along under our prefix
        if k.startswith(("exit_norms.", "exit_classifiers.", "exit_adapters.", "exit_attention.")):
            out[f"{EXTRA_KEY}.{k}"] = v
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


# ---------------------------------------------------------------------- directories
def _resolve(src: str | Path) -> Path:
    """A local directory, or a hub repository downloaded when ``src`` looks like ``org/name``."""
    path = Path(src)
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(
                f"{path}: not a directory (expected a Hugging Face model directory)"
            )
        return path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", str(src)):
        try:
            from huggingface_hub import snapshot_download
        except ImportError:
            raise CheckpointError(
                f"{src}: no such directory (install earlyexit[hf] to download hub models)"
            ) from None
        try:
            return Path(
                snapshot_download(
                    str(src), allow_patterns=["*.json", "*.safetensors", "tokenizer*"]
                )
            )
        except Exception as e:
            raise CheckpointError(
                f"{src}: no such directory, and downloading it from the hub failed ({type(e).__name__})"
            ) from None
    raise CheckpointError(f"{src}: no such directory")


def read_hf_dir(
    src: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
):
    """Read a Hugging Face directory: (ModelConfig, our state dict, Tokenizer or None)."""
    path = _resolve(src)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: not a model directory (no config.json)")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: not valid JSON ({e})") from None
    if "format_version" in hf_cfg and "model_type" not in hf_cfg:
        raise CheckpointError(f"{path}: this is already an earlyexit checkpoint")
    cfg = config_from_hf(hf_cfg, str(cfg_path))
    hf_state: dict[str, torch.Tensor] = {}
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        for f in files:
            hf_state.update(read_safetensors(path / f, device, dtype))
    elif (path / "model.safetensors").is_file():
        hf_state = read_safetensors(path / "model.safetensors", device, dtype)
    elif any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise CheckpointError(
            f"{path}: only pickle weights (*.bin) found; earlyexit reads safetensors only (convert them with transformers' save_pretrained(safe_serialization=True))"
        )
    else:
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = state_from_hf(hf_state, cfg, str(path))
    tok = (
        Tokenizer.from_file(path / "tokenizer.json")
        if (path / "tokenizer.json").is_file()
        else None
    )
    return cfg, state, tok


def load_hf(
    src: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[Decoder, Tokenizer | None]:
    """A :class:`Decoder` straight from a Hugging Face directory (no conversion on disk)."""
    cfg, state, tok = read_hf_dir(src, device, dtype)
    return build_model(cfg, state, str(src), device), tok


def hf_import(src: str | Path, dst: str | Path) -> Path:
    """Convert a Hugging Face model directory (or hub name) into an earlyexit checkpoint,
    with its chat template (``tokenizer_config.json``) when it has one."""
    from earlyexit.chat import chat_files, load_chat_config

    model, tok = load_hf(src)
    extra = chat_files(load_chat_config(_resolve(src)))
    return save_checkpoint(model, dst, tokenizer=tok, extra_files=extra)


def hf_export(model: Decoder, dst: str | Path, tokenizer: Tokenizer | None = None) -> Path:
    """Write ``model`` as a Hugging Face directory ``AutoModelForCausalLM`` can load."""
    from safetensors.torch import save_file

    hf_cfg = config_to_hf(model.config)
    gen = {"bos_token_id": hf_cfg["bos_token_id"], "eos_token_id": hf_cfg["eos_token_id"]}
    with atomic_dir(dst) as tmp:
        save_file(state_to_hf(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp / "tokenizer.json")
            tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast"}
            (tmp / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return Path(dst)


def from_transformers(hf_model) -> Decoder:
    """A :class:`Decoder` with the weights of an in-memory ``transformers`` causal LM."""
    cfg = config_from_hf(hf_model.config.to_dict(), f"{type(hf_model).__name__}.config")
    sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    dev = next(hf_model.parameters()).device
    return build_model(
        cfg, state_from_hf(sd, cfg, type(hf_model).__name__), "transformers model", dev
    )
