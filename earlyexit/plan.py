"""The depth plan: which unique block each step of the unrolled model runs.

Every model in earlyexit is ``embed -> steps -> norm + head`` (docs: architecture.md).
A :class:`Step` names the unique *block* (one transformer layer's weights) it runs, the
optional per-step LoRA slot, the KV-cache slot it writes, and which recursion (loop) it
belongs to. Dense models, layer-shared recursive models (Relaxed Recursive Transformers,
arXiv 2410.20672, App. B) and Mixture-of-Recursions (arXiv 2507.10524, §2) differ only in
the plan; the decoder runs any plan.

Sharing schemes over ``n_layers`` unrolled steps with ``loops`` recursions (0-based):

- ``none``:            step l runs block l                               (dense)
- ``cycle``:           K = L/B blocks; step l runs block l mod K; recursion l // K
- ``sequence``:        K = L/B blocks; step l runs block l // B; recursion l mod B
- ``middle_cycle``:    first and last blocks unique; the L-2 middle steps cycle over
                       K = (L-2)/B shared blocks 1..K (MoR's default)
- ``middle_sequence``: first and last unique; middle step l runs block 1 + (l-1) // B

Every step has its own KV slot here (per-depth KV, recursive.md §5); KV sharing across
recursions (MoR §3) is a later plan option that points several steps at one slot.
"""

from __future__ import annotations

from dataclasses import dataclass

from earlyexit.errors import ConfigError

SHARING_SCHEMES = ("none", "cycle", "sequence", "middle_cycle", "middle_sequence")


@dataclass(frozen=True)
class Step:
    """One step of the unrolled model.

    Attributes:
        block: index of the unique block (weights) this step runs.
        lora: index of this step's LoRA slot, or None for the shared weights only.
        kv_slot: index of the KV-cache slot this step reads and writes.
        recursion: 0-based recursion (loop) this step belongs to, None outside any loop.
        shares_kv: the step only reads ``kv_slot``, written by the same block in the first
            recursion (MoR's recursive KV sharing); it computes no keys or values.
    """

    block: int
    lora: int | None
    kv_slot: int
    recursion: int | None
    shares_kv: bool = False

    def to_dict(self) -> dict:
        d = {
            "block": self.block,
            "lora": self.lora,
            "kv_slot": self.kv_slot,
            "recursion": self.recursion,
        }
        if self.shares_kv:
            d["shares_kv"] = True
        return d


def build_plan(
    n_layers: int,
    scheme: str = "none",
    loops: int = 1,
    relaxed: bool = False,
    kv_sharing: bool = False,
) -> tuple[Step, ...]:
    """Build the plan of ``n_layers`` unrolled steps for a sharing scheme.

    With ``relaxed`` every step of a shared block gets its own LoRA slot in that block: the
    slot index is the step's recursion (Relaxed Recursive Transformers, §2). Unique blocks
    (the first and last of the middle schemes) get none: they are not shared.

    Raises:
        ConfigError: unknown scheme, or a layer count the scheme cannot split into
            ``loops`` equal recursions.
    """
    if scheme not in SHARING_SCHEMES:
        raise ConfigError(
            f"unknown sharing scheme {scheme!r}; supported: {', '.join(SHARING_SCHEMES)}"
        )
    if n_layers < 1:
        raise ConfigError(f"n_layers must be >= 1, got {n_layers}")
    if loops < 1:
        raise ConfigError(f"sharing.loops must be >= 1, got {loops}")
    if scheme == "none":
        if loops != 1:
            raise ConfigError("sharing.loops must be 1 when sharing.scheme is 'none'")
        if relaxed:
            raise ConfigError(
                "LoRA relaxation needs shared blocks; this model has none (sharing.scheme is 'none')"
            )
        return tuple(Step(i, None, i, None) for i in range(n_layers))

    middle = scheme.startswith("middle_")
    n_shared = n_layers - 2 if middle else n_layers
    if n_shared < loops or n_shared % loops:
        what = "n_layers - 2 (first and last layers stay unique)" if middle else "n_layers"
        raise ConfigError(
            f"sharing {scheme!r} with {loops} loops needs {what} = {n_shared} to be a "
            f"positive multiple of {loops}; add or remove layers"
        )
    k = n_shared // loops  # unique shared blocks
    offset = 1 if middle else 0
    steps: list[Step] = []
    if middle:
        steps.append(Step(0, None, 0, None))
    for j in range(n_shared):
        if scheme.endswith("cycle"):
            block, rec = j % k, j // k
        else:  # sequence: each block repeated `loops` times in place
            block, rec = j // loops, j % loops
        steps.append(Step(offset + block, rec if relaxed else None, len(steps), rec))
    if middle:
        steps.append(Step(k + 1, None, len(steps), None))
    if kv_sharing:
        return _share_kv(steps)
    return tuple(steps)


def _share_kv(steps: list[Step]) -> tuple[Step, ...]:
    """Recursions after the first read the first recursion's KV slot of the same block;
    the remaining slots are renumbered contiguously."""
    first: dict[int, int] = {}  # block -> step index of its first-recursion use
    for i, s in enumerate(steps):
        if s.recursion == 0:
            first.setdefault(s.block, i)
    slot_of: dict[int, int] = {}
    out = []
    for i, s in enumerate(steps):
        if s.recursion is not None and s.recursion > 0:
            out.append(Step(s.block, s.lora, slot_of[first[s.block]], s.recursion, shares_kv=True))
        else:
            slot_of[i] = len(slot_of)
            out.append(Step(s.block, s.lora, slot_of[i], s.recursion))
    return tuple(out)


def n_blocks(plan: tuple[Step, ...]) -> int:
    """Number of unique blocks a plan uses."""
    return max(s.block for s in plan) + 1


def n_kv_slots(plan: tuple[Step, ...]) -> int:
    """Number of KV-cache slots a plan writes."""
    return max(s.kv_slot for s in plan) + 1
