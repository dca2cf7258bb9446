import json

import pytest

from earlyexit.config import PRESETS, ModelConfig
from earlyexit.errors import ConfigError
from earlyexit.models.plan import Step, build_plan


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
