"""Model configuration: :class:`ModelConfig`, its sub-configs, presets and strict (de)serialisation.

- One dataclass describes every model family we run (Llama, Mistral, Qwen2, SmolLM shapes):
  sizes, GQA, RoPE (with Llama-3 and linear scaling), biases, tied head, sliding window.
- :class:`SharingConfig` turns the layer count into a *depth plan* (``plan.py``); the
  plan is derived, stored in ``config.json`` for readers, and checked on load.
- ``from_dict`` is strict: unknown keys and wrong types are refused with the key named,
  so a typo in a config file never silently falls back to a default.
- Presets are files, ``earlyexit/presets/NAME.json``, loaded into ``PRESETS`` behind
  :meth:`ModelConfig.from_name` (gpt-fast style); strict parsing is ``earlyexit/strict.py``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from earlyexit.errors import ConfigError
from earlyexit.plan import Step, build_plan, n_blocks, n_kv_slots
from earlyexit.strict import parse_dataclass

# Bumped when the on-disk checkpoint layout changes incompatibly. Loaders refuse newer ones.
FORMAT_VERSION = 1

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class RopeScaling:
    """RoPE frequency scaling (HF ``rope_scaling`` / ``rope_parameters``).

    Attributes:
        type: ``default`` (none), ``linear`` (positions divided by ``factor``) or ``llama3``
            (Llama 3.1 wavelength-dependent scaling).
        factor: scaling factor.
        low_freq_factor: llama3 only.
        high_freq_factor: llama3 only.
        original_max_position: llama3 only: the pre-scaling context length.
    """

    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self) -> None:
        if self.type not in ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling.type {self.type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.factor <= 0:
            raise ConfigError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.type == "llama3" and not (0 < self.low_freq_factor < self.high_freq_factor):
            raise ConfigError("rope_scaling: llama3 needs 0 < low_freq_factor < high_freq_factor")


@dataclass
class SharingConfig:
    """How unrolled steps map onto shared blocks (see ``plan.py``).

    Attributes:
        scheme: ``none`` (dense), ``cycle``, ``sequence``, ``middle_cycle``, ``middle_sequence``.
        loops: number of recursions B (1 for dense).
    """

    scheme: str = "none"
    loops: int = 1


ROUTER_KINDS = ("none", "expert", "token")


@dataclass
class RouterConfig:
    """Mixture-of-Recursions routing (arXiv 2507.10524 §2): who runs how many recursions.

    Attributes:
        kind: ``none``, ``expert`` (one router per recursion, capacity top-k in training,
            sigmoid(score) > 0.5 at inference) or ``token`` (one router over depths).
        router: ``linear`` (d -> 1 or N_r, no bias) or ``mlp`` (d -> 2d -> out, GELU).
        activation: expert-choice gate: ``sigmoid`` or ``tanh``, scaled by ``alpha``.
        alpha: gate scale (None: 0.1 for expert-choice, 1.0 for token-choice).
        capacities: expert-choice share of tokens kept at each recursion (None:
            (N_r - r + 1) / N_r for r = 1..N_r); non-increasing, the first 1.
        gating: ``code``: selected states become H + g F(H) (the official code, F including
            its residual); ``replace``: H <- F(H), which makes c = 1 a plain recursive model.
        aux_coef: expert-choice BCE (router score vs top-k selection) weight.
        balance_coef, z_coef: token-choice balancing and router z-loss weights.
        aux_router: expert-choice: a separate MLP per recursion on the *detached* states,
            trained with the same BCE at 10x the learning rate, decides at inference
            instead of the main router's sign (the main router still sets the gate).
        loss_free_bias: token-choice: step u of the non-trainable per-depth bias added to
            the routing scores for the choice (b_i += u sign(mean load - load_i) every
            training forward); 0 disables.
        kv_sharing: recursions after the first attend to the first recursion's keys and
            values (of every token) instead of caching their own: KV memory / N_r, and no
            K/V projections after the first recursion.
    """

    kind: str = "none"
    router: str = "linear"
    activation: str = "sigmoid"
    alpha: float | None = None
    capacities: tuple[float, ...] | None = None
    gating: str = "code"
    aux_coef: float = 0.001
    balance_coef: float = 0.1
    z_coef: float = 1e-5
    kv_sharing: bool = False
    aux_router: bool = False
    loss_free_bias: float = 0.0

    @property
    def gate_scale(self) -> float:
        return self.alpha if self.alpha is not None else (0.1 if self.kind == "expert" else 1.0)


LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass
class LoraConfig:
    """Per-step LoRA relaxing shared blocks (Relaxed Recursive Transformers, §2).

    Every step of a shared block adds its own B_l A_l x to each target linear, with scale
    exactly 1 (no alpha / r). ``rank`` applies to every target unless a per-target field is
    set; ranks are capped at min(r, d_in, d_out); 0 disables a target.

    Tied blocks also tie their norms and biases, so full rank alone reproduces the source
    only when those are equal across the tied layers. ``norms`` and ``biases`` relax them
    too: each relaxed step adds its own offset to the shared norm weights and biases (RRT
    keeps norms per depth in practice), so a full-rank relaxation reproduces any source.

    Attributes:
        rank: default rank of every target.
        q, k, v, o, gate, up, down: per-target ranks (None: ``rank``).
        norms: per-step offsets of both RMSNorm weights of each relaxed step.
        biases: per-step offsets of every bias of each relaxed step (models with biases).
    """

    rank: int = 0
    q: int | None = None
    k: int | None = None
    v: int | None = None
    o: int | None = None
    gate: int | None = None
    up: int | None = None
    down: int | None = None
    norms: bool = False
    biases: bool = False

    def requested(self, target: str) -> int:
        r = getattr(self, target)
        return self.rank if r is None else r

    @property
    def enabled(self) -> bool:
        """Any per-step parameters at all (the plan then gives shared blocks LoRA slots)."""
        return any(self.requested(t) > 0 for t in LORA_TARGETS) or self.norms or self.biases


@dataclass
class ExitConfig:
    """Early-exit points (FREE, CALM, recursive loop exits).

    Every exit reuses the final norm and LM head, so a model with exits is still a plain
    dense model (Hugging Face export keeps working); ``norms`` adds a small per-exit RMSNorm
    instead, initialised from the final norm.

    Attributes:
        steps: exits after these many plan steps, strictly increasing, each in
            [1, n_layers - 1]; the last step is always an exit too.
        norms: give each intermediate exit its own RMSNorm.
        classifier: give each intermediate exit a learned confidence classifier (CALM's
            early-exit classifier / FREE's meta): MLP d -> d -> 2 on the normed state.
        trained: set once exit training ran (exit strategies warn on untrained exits).
        adapter_rank: give each intermediate exit a residual adapter h + U silu(D h) of this
            rank before its norm (0: none). With the body frozen, an exit trained this way
            leaves the full-depth model exactly as it was (see docs/decisions.md).
        attention: give each intermediate exit an attention adapter (Kangaroo, arXiv
            2404.18911): h + Attention(RMSNorm(h)) with its own q/k/v/o and its own KV-cache
            slot, before the MLP adapter (if any) and the exit norm. It sees the exit's
            states of every earlier position, so it drafts far better than a per-token
            adapter; it needs the forward's context (positions, cache), so only strategies
            that run it on every position (``speculative``) serve it.
    """

    steps: tuple[int, ...] = ()
    norms: bool = False
    classifier: bool = False
    trained: bool = False
    adapter_rank: int = 0
    attention: bool = False


@dataclass
class ModelConfig:
    """A decoder-only Llama-family model.

    Attributes:
        name: free-form name (the preset's, or the source model's).
        vocab_size: rows of the embedding and of the LM head.
        d_model: residual-stream width.
        n_layers: depth of the unrolled model (length of the plan).
        n_heads: query heads.
        n_kv_heads: key/value heads (GQA when < n_heads; must divide n_heads).
        head_dim: per-head width; defaults to d_model // n_heads.
        d_ff: SwiGLU hidden width.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: optional RoPE scaling.
        tie_embeddings: LM head shares the embedding matrix.
        qkv_bias: bias on q, k, v projections (Qwen2; Llama's ``attention_bias``).
        o_bias: bias on the attention output projection (Llama's ``attention_bias``).
        mlp_bias: bias on gate, up and down projections.
        max_context: longest sequence (prompt + generation) the model accepts.
        sliding_window: attend only to the last ``sliding_window`` positions (Mistral), or None.
        eos_token_ids: tokens that end generation by default.
        bos_token_id: beginning-of-sequence token (informative: whether prompts get it is the
            tokenizer's post-processor's decision, as in Hugging Face).
        init_std: std of the normal init of linear and embedding weights.
        sharing: layer sharing; builds the plan.
        exits: early-exit points.
        lora: per-step LoRA relaxation of shared blocks.
        router: Mixture-of-Recursions routing over the recursions of ``sharing``.
    """

    name: str = "custom"
    vocab_size: int = 512
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    d_ff: int = 128
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    max_context: int = 256
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    init_std: float = 0.02
    sharing: SharingConfig = field(default_factory=SharingConfig)
    exits: ExitConfig = field(default_factory=ExitConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    # Derived in __post_init__, never set by hand.
    plan: tuple[Step, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; set head_dim"
                )
            self.head_dim = self.d_model // self.n_heads
        for name in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "d_ff",
            "max_context",
            "head_dim",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.norm_eps <= 0 or self.rope_theta <= 0 or self.init_std <= 0:
            raise ConfigError("norm_eps, rope_theta and init_std must be > 0")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"sliding_window must be >= 1 or null, got {self.sliding_window}")
        for t in (*self.eos_token_ids, self.bos_token_id):
            if t is not None and not 0 <= t < self.vocab_size:
                raise ConfigError(
                    f"special token id {t} is outside the vocabulary (size {self.vocab_size})"
                )
        self.eos_token_ids = tuple(self.eos_token_ids)
        for t in LORA_TARGETS:
            if self.lora.requested(t) < 0:
                raise ConfigError(f"lora ranks must be >= 0, got {t}={self.lora.requested(t)}")
        if self.lora.biases and not (self.qkv_bias or self.o_bias or self.mlp_bias):
            raise ConfigError("lora.biases relaxes biases, and this model has none")
        self.plan = build_plan(
            self.n_layers,
            self.sharing.scheme,
            self.sharing.loops,
            relaxed=self.lora.enabled,
            kv_sharing=self.router.kv_sharing and self.router.kind != "none",
        )
        self._check_router()
        ex = self.exits.steps = tuple(self.exits.steps)
        if any(not 1 <= s < self.n_layers for s in ex) or list(ex) != sorted(set(ex)):
            raise ConfigError(
                f"exits.steps must be strictly increasing and within [1, {self.n_layers - 1}] "
                f"(the last step {self.n_layers} is always an exit), got {list(ex)}"
            )

    def _check_router(self) -> None:
        r = self.router
        if r.kind not in ROUTER_KINDS:
            raise ConfigError(
                f"router.kind must be one of {', '.join(ROUTER_KINDS)}, got {r.kind!r}"
            )
        if r.kind == "none":
            return
        if self.sharing.scheme not in ("cycle", "middle_cycle") or self.sharing.loops < 2:
            raise ConfigError(
                "Mixture-of-Recursions needs sharing.scheme cycle or middle_cycle with loops >= 2"
            )
        if (
            r.router not in ("linear", "mlp")
            or r.activation not in ("sigmoid", "tanh")
            or r.gating not in ("code", "replace")
        ):
            raise ConfigError(
                "router.router must be linear|mlp, activation sigmoid|tanh, gating code|replace"
            )
        if r.capacities is not None:
            caps = r.capacities = tuple(r.capacities)
            if (
                len(caps) != self.sharing.loops
                or caps[0] != 1
                or any(not 0 < c <= 1 for c in caps)
                or list(caps) != sorted(caps, reverse=True)
            ):
                raise ConfigError(
                    f"router.capacities must be {self.sharing.loops} non-increasing values in (0, 1] starting at 1, got {list(caps)}"
                )
        if self.exits.steps or self.lora.enabled:
            raise ConfigError("Mixture-of-Recursions models do not combine with exits or LoRA here")

    @property
    def capacities(self) -> tuple[float, ...]:
        """Expert-choice capacity of each recursion (default (N_r - r + 1) / N_r)."""
        n = self.sharing.loops
        return self.router.capacities or tuple((n - r) / n for r in range(n))

    # ----------------------------------------------------------------- derived sizes
    @property
    def n_blocks(self) -> int:
        """Unique blocks (transformer layers with their own weights)."""
        return n_blocks(self.plan)

    @property
    def n_kv_slots(self) -> int:
        """KV-cache slots the plan writes, then one per exit attention adapter."""
        return n_kv_slots(self.plan) + (len(self.exits.steps) if self.exits.attention else 0)

    def exit_kv_slot(self, i: int) -> int:
        """The KV slot of intermediate exit ``i``'s attention adapter (after the plan's)."""
        if not self.exits.attention:
            raise ValueError("this model's exits have no attention adapters")
        return n_kv_slots(self.plan) + i

    def lora_shape(self, target: str) -> tuple[int, int, int]:
        """(rank, d_in, d_out) of a LoRA target, the rank capped at min(r, d_in, d_out)."""
        d_in, d_out = {
            "q": (self.d_model, self.q_dim),
            "k": (self.d_model, self.kv_dim),
            "v": (self.d_model, self.kv_dim),
            "o": (self.q_dim, self.d_model),
            "gate": (self.d_model, self.d_ff),
            "up": (self.d_model, self.d_ff),
            "down": (self.d_ff, self.d_model),
        }[target]
        return min(self.lora.requested(target), d_in, d_out), d_in, d_out

    def lora_bias_dims(self) -> dict[str, int]:
        """Width of each bias a block has, by fused linear (``qkv``, ``o``, ``w13``, ``w2``)."""
        dims = {"qkv": self.q_dim + 2 * self.kv_dim, "o": self.d_model}
        dims.update({"w13": 2 * self.d_ff, "w2": self.d_model})
        has = {"qkv": self.qkv_bias, "o": self.o_bias, "w13": self.mlp_bias, "w2": self.mlp_bias}
        return {k: v for k, v in dims.items() if has[k]}

    def lora_params(self) -> int:
        """Relaxation parameters: sum over relaxed steps and targets of r (d_in + d_out), plus
        each step's norm (2 d) and bias offsets when relaxed."""
        per_step = sum(r * (i + o) for r, i, o in map(self.lora_shape, LORA_TARGETS))
        per_step += 2 * self.d_model * self.lora.norms
        per_step += sum(self.lora_bias_dims().values()) * self.lora.biases
        return per_step * sum(s.lora is not None for s in self.plan)

    @property
    def exit_points(self) -> tuple[int, ...]:
        """Step counts after which logits may be read: the configured exits and the last step."""
        return (*self.exits.steps, self.n_layers)

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def block_params(self) -> int:
        """Parameters of one block (attention, MLP, two norms)."""
        d, q, kv, f = self.d_model, self.q_dim, self.kv_dim, self.d_ff
        n = d * (q + 2 * kv) + q * d + 3 * d * f + 2 * d
        n += (q + 2 * kv) * self.qkv_bias + d * self.o_bias + (2 * f + d) * self.mlp_bias
        return n

    def param_counts(self) -> dict[str, int]:
        """Unique parameters: ``embedding``, ``head`` (0 when tied), ``non_embedding`` (blocks,
        final norm, LoRA), ``total``."""
        emb = self.vocab_size * self.d_model
        head = 0 if self.tie_embeddings else emb
        non_emb = self.n_blocks * self.block_params() + self.d_model + self.lora_params()
        return {
            "embedding": emb,
            "head": head,
            "non_embedding": non_emb,
            "total": emb + head + non_emb,
        }

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict, including the derived plan (informative; checked on load)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        d["rope_scaling"] = dataclasses.asdict(self.rope_scaling) if self.rope_scaling else None
        d["sharing"] = dataclasses.asdict(self.sharing)
        d["exits"] = {**dataclasses.asdict(self.exits), "steps": list(self.exits.steps)}
        d["lora"] = dataclasses.asdict(self.lora)
        rc = dataclasses.asdict(self.router)
        rc["capacities"] = None if self.router.capacities is None else list(self.router.capacities)
        d["router"] = rc
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["plan"] = [s.to_dict() for s in self.plan]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> ModelConfig:
        """Strictly parse a dict produced by :meth:`to_dict` (or written by hand).

        Raises:
            ConfigError: unknown key, wrong type, invalid value, or a stored plan that does not
                match the sharing config. The message names ``source`` and the key.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        stored_plan = data.pop("plan", None)
        try:
            cfg = parse_dataclass(cls, data, "")
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        if stored_plan is not None:
            derived = [s.to_dict() for s in cfg.plan]
            if stored_plan != derived:
                raise ConfigError(
                    f"{source}: 'plan' does not match the plan built from 'sharing' and "
                    f"'n_layers'; remove 'plan' to rebuild it"
                )
        return cfg

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            data.pop("format_version", None)
        return cls.from_dict(data, source=str(path))

    # ----------------------------------------------------------------- presets
    @classmethod
    def from_name(cls, preset: str, /, **overrides: Any) -> ModelConfig:
        """A preset by exact name, or by an unambiguous case-insensitive substring.

        Raises:
            ConfigError: no preset or several presets match.
        """
        key = preset.lower()
        if key in PRESETS:
            match = key
        else:
            hits = [p for p in PRESETS if key in p]
            if len(hits) != 1:
                what = "matches several presets" if hits else "matches no preset"
                raise ConfigError(f"{preset!r} {what}; presets: {', '.join(sorted(PRESETS))}")
            match = hits[0]
        data = {"name": match, **PRESETS[match], **overrides}
        return cls.from_dict(data, source=f"preset {match!r}")


def _load_presets() -> dict[str, dict[str, Any]]:
    """name -> ModelConfig fields of every ``earlyexit/presets/*.json`` (one file per model;
    its ``description`` says where the numbers come from). Checked strictly on use
    (:meth:`ModelConfig.from_name`), like a user's config file."""
    from earlyexit.datafiles import read_named

    return {name: body for name, (_, body) in read_named("presets").items()}


PRESETS: dict[str, dict[str, Any]] = _load_presets()

# The embedded default's shape (the "stdlib-small" preset); its variants and the demo's
# models derive from it.
STDLIB_SMALL: dict[str, Any] = PRESETS["stdlib-small"]
