"""The CLI's choices that copy a library constant (cli/choices.py) equal it: the parser
imports no torch, so the constants of torch-importing modules are copied, and checked here."""

import importlib

import pytest

from earlyexit.cli import build_parser, choices


@pytest.mark.parametrize("name,where", sorted(choices.COPIES.items()))
def test_each_copy_equals_the_library_constant(name, where):
    module, attr = where.split(":")
    assert getattr(choices, name) == getattr(importlib.import_module(module), attr)


def test_the_torch_free_constants_are_imported_not_copied():
    from earlyexit.device import DTYPES, PRECISIONS
    from earlyexit.plan import SHARING_SCHEMES

    assert choices.PRECISIONS is PRECISIONS and tuple(DTYPES) == choices.DTYPE_NAMES
    assert set(choices.CONVERSION_SHARING) == set(SHARING_SCHEMES) - {"none"}


def _actions(*path):
    p = build_parser()
    for name in path:
        p = p._subparsers._group_actions[0].choices[name]
    return {a.dest: a for a in p._actions}


def test_the_flags_offer_the_constants():
    gen, serve = _actions("generate"), _actions("serve")
    assert tuple(gen["strategy"].choices) == choices.STRATEGIES
    assert tuple(gen["confidence"].choices) == choices.MEASURES
    assert gen["threshold"].default == choices.DEFAULT_THRESHOLD
    assert tuple(gen["dtype"].choices) == choices.DTYPE_CHOICES == ("auto", *choices.DTYPE_NAMES)
    assert gen["dtype"].default == serve["dtype"].default == "auto"  # bf16 where native
    assert _actions("demo")["dtype"].default is None  # the demo keeps its weights as stored
    assert tuple(serve["policy"].choices) == choices.POLICIES
    assert tuple(serve["strategy"].choices) == choices.SERVED_STRATEGIES
    assert tuple(serve["deep_kv"].choices) == choices.DEEP_KV
    assert tuple(_actions("convert")["lora_init"].choices) == choices.LORA_INITS
    assert tuple(_actions("eval")["routing"].choices) == choices.ROUTINGS
    assert tuple(_actions("bench", "depthwise")["deep_kv"].choices) == choices.DEEP_KV
    assert tuple(_actions("demo")["precision"].choices) == choices.PRECISIONS
