"""The lm-evaluation-harness adapter on local YAML tasks (no downloads). lm-eval is the
``eval`` extra, not part of ``dev``: without it this module is skipped, not failed."""

import json
import textwrap

import pytest

from earlyexit.cli import main

lm_eval = pytest.importorskip(
    "lm_eval", reason="the lm-eval adapter needs: pip install -e '.[eval]'"
)


def _task_dir(tmp_path):
    rows = [
        {"question": "def f(x):\n    return x + 1", "choices": ["\n", " banana"], "answer": 0},
        {"question": "import os", "choices": ["\n", "??"], "answer": 0},
        {"question": "for i in range(10):", "choices": ["\n    ", " !!"], "answer": 0},
    ]
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "ee_local_mc.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: ee_local_mc
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{question}}}}"
            doc_to_choice: "{{{{choices}}}}"
            doc_to_target: "{{{{answer}}}}"
            metric_list:
              - metric: acc
            """
        )
    )
    (tasks / "ee_local_gen.yaml").write_text(
        textwrap.dedent(
            f"""\
            task: ee_local_gen
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {data}
            test_split: test
            output_type: generate_until
            doc_to_text: "{{{{question}}}}"
            doc_to_target: "\\n"
            generation_kwargs:
              until: ["\\n\\n"]
              max_gen_toks: 6
            metric_list:
              - metric: exact_match
            """
        )
    )
    return tasks


def test_lm_eval_adapter_on_a_local_task(exit_setup, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = _task_dir(tmp_path)
    base = ["eval", "lm-eval", "--model", str(exit_setup / "model"), "--include-path", str(tasks)]
    base += ["--tasks", "ee_local_mc,ee_local_gen", "--json", "--device", "cpu"]
    assert main([*base, "--strategy", "full"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert set(full["results"]) == {"ee_local_mc", "ee_local_gen"}
    assert 0 <= full["results"]["ee_local_mc"]["acc,none"] <= 1
    assert full["mean_depth"] == 4.0
    # a strategy that always exits after step 1 changes depths (and is honoured in scoring)
    free1 = [
        "--strategy",
        "free",
        "--exit-step",
        "1",
        "--threshold",
        "-1",
        "--allow-untrained-exits",
    ]
    assert main([*base, *free1]) == 0
    shallow = json.loads(capsys.readouterr().out)
    assert shallow["mean_depth"] < 4.0
    # the never-exiting strategy scores exactly like full depth
    assert main([*base, "--strategy", "free", "--threshold", "1.0"]) == 0
    never = json.loads(capsys.readouterr().out)
    assert never["results"]["ee_local_mc"]["acc,none"] == full["results"]["ee_local_mc"]["acc,none"]
