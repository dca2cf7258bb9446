"""Generation: greedy equals an argmax loop, batching, stops, streaming, depths, bad input."""

import pytest
import torch

from earlyexit.decoding.generate import generate, stream
from earlyexit.decoding.sampling import SamplingParams
from earlyexit.errors import InputError
from tests.conftest import make_model


def _argmax_loop(model, prompt, n):
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


def test_greedy_equals_uncached_argmax_loop(tiny):
    prompt = torch.randint(0, 512, (7,)).tolist()
    res = generate(tiny, [prompt], SamplingParams(max_new_tokens=20))[0]
    assert res.token_ids == _argmax_loop(tiny, prompt, 20)
    assert res.depths == [tiny.n_steps] * 20
    assert res.finish_reason == "length" and res.prompt_tokens == 7


def test_batched_prompts_of_different_lengths_equal_one_at_a_time(tiny):
    prompts = [torch.randint(0, 512, (n,)).tolist() for n in (3, 12, 1, 8)]
    params = SamplingParams(max_new_tokens=15)
    batched = generate(tiny, prompts, params)
    for p, r in zip(prompts, batched):
        assert r.token_ids == generate(tiny, [p], params)[0].token_ids


def test_seeded_sampling_reproducible(tiny):
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=123)
    a = generate(tiny, [[1, 2, 3], [4, 5]], p)
    b = generate(tiny, [[1, 2, 3], [4, 5]], p)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


def test_stop_tokens_end_a_row_while_others_go_on():
    model = make_model()
    prompt = [5, 6, 7]
    free = generate(model, [prompt], SamplingParams(max_new_tokens=10))[0].token_ids
    stop_at = free[3]
    first = free.index(stop_at)
    res = generate(
        model, [prompt, [9, 9]], SamplingParams(max_new_tokens=10, stop_token_ids=(stop_at,))
    )
    assert res[0].token_ids == free[: first + 1] and res[0].finish_reason == "stop"
    # the other row is unaffected by row 0 finishing early (unless it hits the stop itself)
    other = generate(model, [[9, 9]], SamplingParams(max_new_tokens=10, stop_token_ids=(stop_at,)))[
        0
    ]
    assert res[1].token_ids == other.token_ids


def test_model_eos_stops_unless_ignored():
    base = make_model()
    prompt = [5, 6, 7]
    free = generate(base, [prompt], SamplingParams(max_new_tokens=10))[0].token_ids
    eos_model = make_model(eos_token_ids=[free[2]])
    assert len(generate(eos_model, [prompt], SamplingParams(max_new_tokens=10))[0].token_ids) <= 3
    assert (
        generate(eos_model, [prompt], SamplingParams(max_new_tokens=10, ignore_eos=True))[
            0
        ].token_ids
        == free
    )


def test_stop_strings_cut_the_text_and_streaming_never_shows_them(tokenizer):
    model = make_model(vocab_size=tokenizer.vocab_size)
    prompt = tokenizer.encode("def main(")
    free = generate(model, [prompt], SamplingParams(max_new_tokens=30), tokenizer)[0]
    text = free.text
    stop = text[5:8]
    assert len(stop) == 3 and "\ufffd" not in stop, "pick a different prompt/seed for this test"
    res = generate(model, [prompt], SamplingParams(max_new_tokens=30, stop=(stop,)), tokenizer)[0]
    assert res.finish_reason == "stop"
    assert res.text == text[: text.index(stop)]
    streamed = "".join(
        ev.text
        for ev in stream(
            model, [prompt], SamplingParams(max_new_tokens=30, stop=(stop,)), tokenizer
        )
    )
    assert streamed == res.text


def test_stream_events_match_the_result(tiny_lm_dir):
    import earlyexit

    lm = earlyexit.load(tiny_lm_dir, device="cpu")
    res = lm.generate(["hello", "import os\n"], max_new_tokens=9)
    events = list(lm.stream(["hello", "import os\n"], max_new_tokens=9))
    for row in range(2):
        evs = [e for e in events if e.row == row]
        assert [e.token_id for e in evs] == res[row].token_ids
        assert [e.depth for e in evs] == res[row].depths
        assert "".join(e.text for e in evs) == res[row].text
        assert evs[-1].finish_reason == "length" and all(e.finish_reason is None for e in evs[:-1])


def test_generation_stops_at_the_context_limit():
    model = make_model(max_context=16)
    res = generate(model, [list(range(10))], SamplingParams(max_new_tokens=50))[0]
    assert len(res.token_ids) == 6 and res.finish_reason == "length"
    assert res.token_ids == _argmax_loop(model, list(range(10)), 6)


@pytest.mark.parametrize(
    "prompts, msg",
    [
        ([], "no prompts"),
        ([[]], "prompt 0 is empty"),
        ([[1] * 256], "context is 256"),
        ([[1, 600]], "outside"),
    ],
)
def test_bad_prompts_are_refused(tiny, prompts, msg):
    with pytest.raises(InputError, match=msg):
        generate(tiny, prompts, SamplingParams(max_new_tokens=2))


def test_text_prompt_without_tokenizer_is_refused(tiny):
    import earlyexit

    with pytest.raises(InputError, match="no tokenizer"):
        earlyexit.LM(tiny).generate("hello")


def test_strategy_options_as_keywords(exit_lm_dir):
    """lm.generate(prompts, strategy="free", threshold=...) builds the strategy from the
    keywords; the result equals passing the strategy object."""
    import earlyexit
    from earlyexit.errors import InputError

    lm = earlyexit.load(exit_lm_dir, device="cpu")
    prompts = ["def f(", "class A:"]
    a = lm.generate(prompts, strategy="free", threshold=-1, max_new_tokens=5, ignore_eos=True)
    b = lm.generate(
        prompts, strategy=lm.strategy("free", threshold=-1), max_new_tokens=5, ignore_eos=True
    )
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.depths for r in a] == [r.depths for r in b] and min(a[0].depths) < 4
    with pytest.raises(InputError, match=r"unknown keyword.*threshhold"):
        lm.generate("def f(", strategy="free", threshhold=0.3)
    with pytest.raises(InputError, match="need a strategy name"):
        lm.generate("def f(", strategy=lm.strategy("free"), threshold=0.3)
