import json

import pytest

from earlyexit.config import PRESETS, ModelConfig
from earlyexit.errors import ConfigError
from earlyexit.plan import Step, build_plan


def test_presets_build_and_round_trip():
    for name in PRESETS:
        cfg = ModelConfig.from_name(name)
        again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg and again.plan == cfg.plan


def test_smollm_135m_shape_has_the_published_parameter_count():
    # HuggingFaceTB/SmolLM-135M: 134,515,008 parameters (tied embeddings).
    assert ModelConfig.from_name("smollm-135m").param_counts()["total"] == 134_515_008


def test_from_name_fuzzy_and_errors():
    assert ModelConfig.from_name("SmolLM-135").name == "smollm-135m"
    with pytest.raises(ConfigError, match="several presets"):
        ModelConfig.from_name("smollm")
    with pytest.raises(ConfigError, match="no preset"):
        ModelConfig.from_name("gpt-5")


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"d_model": "64"}, "d_model: expected an integer"),
        ({"tie_embeddings": 1}, "tie_embeddings: expected true/false"),
        ({"n_layer": 4}, "unknown key"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling.type 'yarn' is not supported"),
        ({"rope_scaling": {"type": "linear", "factr": 2}}, "unknown key.*rope_scaling.factr"),
        ({"n_heads": 3}, "multiple of n_kv_heads"),
        ({"sharing": {"scheme": "cycle", "loops": 3}}, "positive multiple of 3"),
        ({"sharing": {"scheme": "spiral"}}, "unknown sharing scheme"),
        ({"eos_token_ids": [9999]}, "outside the vocabulary"),
        ({"max_context": 0}, "max_context must be >= 1"),
    ],
)
def test_bad_config_is_refused_with_the_key_named(patch, message):
    data = ModelConfig.from_name("tiny").to_dict()
    data.pop("plan")
    data.update(patch)
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict(data, source="cfg.json")


def test_stored_plan_must_match_sharing():
    data = ModelConfig.from_name("tiny").to_dict()
    data["plan"][1]["block"] = 0
    with pytest.raises(ConfigError, match="'plan' does not match"):
        ModelConfig.from_dict(data)


def test_dense_plan():
    assert build_plan(3) == (Step(0, None, 0, None), Step(1, None, 1, None), Step(2, None, 2, None))


def test_cycle_and_sequence_plans():
    # recursive.md: CYCLE runs ((l-1) mod K)+1, SEQUENCE ceil(l/B) (1-based); here 0-based.
    cyc = build_plan(6, "cycle", 2)
    assert [s.block for s in cyc] == [0, 1, 2, 0, 1, 2]
    assert [s.recursion for s in cyc] == [0, 0, 0, 1, 1, 1]
    seq = build_plan(6, "sequence", 2)
    assert [s.block for s in seq] == [0, 0, 1, 1, 2, 2]
    assert [s.recursion for s in seq] == [0, 1, 0, 1, 0, 1]
    # each depth keeps its own KV slot
    assert [s.kv_slot for s in cyc] == list(range(6))


def test_middle_plans_keep_first_and_last_unique():
    mc = build_plan(8, "middle_cycle", 3)  # 1 + 2x3 + 1
    assert [s.block for s in mc] == [0, 1, 2, 1, 2, 1, 2, 3]
    assert [s.recursion for s in mc] == [None, 0, 0, 1, 1, 2, 2, None]
    ms = build_plan(8, "middle_sequence", 3)
    assert [s.block for s in ms] == [0, 1, 1, 1, 2, 2, 2, 3]
    with pytest.raises(ConfigError, match="n_layers - 2"):
        build_plan(9, "middle_cycle", 3)


def test_shared_config_counts_unique_blocks():
    cfg = ModelConfig.from_name("tiny", n_layers=6, sharing={"scheme": "cycle", "loops": 3})
    assert cfg.n_blocks == 2 and cfg.n_kv_slots == 6
    dense = ModelConfig.from_name("tiny", n_layers=6)
    assert cfg.param_counts()["non_embedding"] < dense.param_counts()["non_embedding"] / 2.9


def reference_plan(L, scheme, B, relaxed, kv_sharing):
    """recursive.md §1 / mor.md §1 written out: (block, lora, kv_slot, recursion, shares_kv)
    per unrolled step. KV sharing: a step of recursion > 1 reads the slot its block wrote in
    recursion 1; the writing steps' slots are numbered in order."""
    if scheme == "none":
        return [(i, None, i, None, False) for i in range(L)]
    middle = scheme.startswith("middle_")
    n = L - 2 if middle else L
    K = n // B
    rows = [(0, None)] if middle else []
    for j in range(n):
        block, rec = (j % K, j // K) if scheme.endswith("cycle") else (j // B, j % B)
        rows.append((block + middle, rec))
    if middle:
        rows.append((K + 1, None))
    out, slot_of_block = [], {}
    for i, (block, rec) in enumerate(rows):
        lora = rec if relaxed and rec is not None else None
        if kv_sharing and rec is not None and rec > 0:
            out.append((block, lora, slot_of_block[block], rec, True))
            continue
        slot = i
        if kv_sharing:  # writers (unique blocks and recursion 1) number their slots in order
            slot = sum(1 for o in out if not o[4])
            if rec == 0:
                slot_of_block[block] = slot
        out.append((block, lora, slot, rec, False))
    return out


def test_every_plan_equals_the_written_out_schemes():
    from earlyexit.plan import n_blocks, n_kv_slots

    checked = 0
    for scheme in ("none", "cycle", "sequence", "middle_cycle", "middle_sequence"):
        for L in range(1, 13):
            for B in range(1, 5):
                middle = scheme.startswith("middle_")
                n = L - 2 if middle else L
                if (scheme == "none" and B != 1) or (scheme != "none" and (n < B or n % B)):
                    continue
                for relaxed in (False, True) if scheme != "none" else (False,):
                    for kv in (False, True) if scheme != "none" else (False,):
                        plan = build_plan(L, scheme, B, relaxed, kv)
                        got = [(s.block, s.lora, s.kv_slot, s.recursion, s.shares_kv) for s in plan]
                        assert got == reference_plan(L, scheme, B, relaxed, kv), (scheme, L, B)
                        assert n_blocks(plan) == 1 + max(r[0] for r in got)
                        assert n_kv_slots(plan) == len({r[2] for r in got})
                        checked += 1
    assert checked > 150
    assert build_plan(4) == build_plan(4, "none", 1, False, False)  # the defaults: dense


def test_plan_errors_are_one_clear_line():
    with pytest.raises(ConfigError) as e:
        build_plan(4, "bogus")
    assert str(e.value) == (
        "unknown sharing scheme 'bogus'; supported: none, cycle, sequence, middle_cycle, "
        "middle_sequence"
    )
    cases = [
        ((0,), "n_layers must be >= 1, got 0"),
        ((4, "cycle", 0), "sharing.loops must be >= 1, got 0"),
        ((4, "none", 2), "sharing.loops must be 1 when sharing.scheme is 'none'"),
        (
            (4, "none", 1, True),
            "LoRA relaxation needs shared blocks; this model has none (sharing.scheme is 'none')",
        ),
        (
            (7, "cycle", 2),
            "sharing 'cycle' with 2 loops needs n_layers = 7 to be a positive multiple of 2; "
            "add or remove layers",
        ),
        (
            (7, "middle_cycle", 2),
            "sharing 'middle_cycle' with 2 loops needs n_layers - 2 (first and last layers stay "
            "unique) = 5 to be a positive multiple of 2; add or remove layers",
        ),
        (
            (3, "middle_cycle", 2),
            "sharing 'middle_cycle' with 2 loops needs n_layers - 2 (first and last layers stay "
            "unique) = 1 to be a positive multiple of 2; add or remove layers",
        ),
    ]
    for args, msg in cases:
        with pytest.raises(ConfigError) as e:
            build_plan(*args)
        assert str(e.value) == msg
    assert len(build_plan(1)) == 1 and len(build_plan(3, "cycle", 3)) == 3  # edge sizes


def test_step_to_dict():
    assert Step(2, 1, 5, 0).to_dict() == {"block": 2, "lora": 1, "kv_slot": 5, "recursion": 0}
    assert Step(1, None, 0, 2, shares_kv=True).to_dict() == {
        "block": 1,
        "lora": None,
        "kv_slot": 0,
        "recursion": 2,
        "shares_kv": True,
    }
