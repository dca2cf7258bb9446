"""The decode benchmark harness runs, checks outputs identical, and writes its JSON rows."""

import json

import pytest

pytest.importorskip("transformers")


def test_bench_decode_tiny(tmp_path, capsys):
    from earlyexit.bench.decode import main

    out = tmp_path / "decode.json"
    rows = main(
        preset="tiny",
        batch_sizes=[1, 3],
        new_tokens=8,
        prompt_len=5,
        repeats=2,
        threads=1,
        out=str(out),
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    summaries = [r for r in rows if r["impl"] == "summary"]
    assert [s["batch_size"] for s in summaries] == [1, 3]
    assert all(s["outputs_identical"] for s in summaries)
    assert (
        summaries[0]["fraction_of_bandwidth_bound"] > 0 and summaries[0]["copy_bandwidth_GBps"] > 0
    )
    for r in rows:
        if r["impl"] in ("earlyexit", "transformers"):
            assert len(r["seconds"]) == 2 and r["tokens_per_s"] > 0
    assert "| 1 |" in capsys.readouterr().out
