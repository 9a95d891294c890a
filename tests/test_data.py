"""data.py: the real benchmark files (when ../shared/data is present), small fixture records in
every raw layout, each bad-input error, prompts with an offline tokenizer, training-set mixing and
the demo task."""
import csv
import json
import random
import shutil
import sys
import types
from collections import Counter

import pytest
from conftest import SHARED_DATA

import data
from data import (Question, build_messages, build_train_set, demo_questions, difficulty_mix,
                  encode_prompt, load_benchmark, load_benchmark_dir, load_gpqa, load_medmcqa,
                  load_medqa, load_medxpertqa, load_mmlu, load_mmlu_pro, load_pubmedqa,
                  pubmedqa_official_test, shuffle_options)

needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="no ../shared/data here")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def raw_lines(name):
    return [json.loads(line) for line in (SHARED_DATA / name).read_text().splitlines()]


# ------------------------------------------------------------------ the real files

@needs_shared
@pytest.mark.parametrize("name, count", [("medqa", 1273), ("medmcqa", 4183), ("pubmedqa", 500),
                                         ("mmlu_medical", 1089), ("mmlu_pro_health", 818),
                                         ("medxpertqa", 2450)])
def test_real_counts(name, count):
    questions = load_benchmark_dir(name, SHARED_DATA)
    assert len(questions) == count
    assert len({q.id for q in questions}) == count
    assert all(q.source == name for q in questions)


@needs_shared
def test_real_medqa_answers_match_answer_text():
    raw = raw_lines("medqa_us_4opt_test.jsonl")
    questions = load_benchmark_dir("medqa", SHARED_DATA)
    for i in (0, 1, 500, 1272):  # the raw `answer` field holds the text of the key
        assert questions[i].question == raw[i]["question"]
        assert questions[i].options[questions[i].answer] == raw[i]["answer"]
    assert Counter(q.answer for q in questions).keys() == set("ABCD")


@needs_shared
def test_real_medmcqa_one_based_cop():
    raw = raw_lines("medmcqa_dev.jsonl")
    questions = load_benchmark_dir("medmcqa", SHARED_DATA)
    for i in (0, 1, 2000, 4182):
        assert questions[i].id == raw[i]["id"]
        assert questions[i].options[questions[i].answer] == raw[i]["op" + "abcd"[raw[i]["cop"] - 1]]
    with pytest.raises(ValueError, match=r"medmcqa_dev.jsonl:\d+: 'cop' 4 is not in 0..3"):
        load_medmcqa(SHARED_DATA / "medmcqa_dev.jsonl", cop_base=0)  # wrong convention is caught


@needs_shared
def test_real_pubmedqa_ground_truth_and_official_split(tmp_path):
    truth = json.loads((SHARED_DATA / "pubmedqa_test_ground_truth.json").read_text())
    ori = json.loads((SHARED_DATA / "pubmedqa_ori_pqal.json").read_text())
    questions = load_benchmark_dir("pubmedqa", SHARED_DATA)
    assert {q.id for q in questions} == set(truth)
    for q in questions:
        assert q.options == {"A": "yes", "B": "no", "C": "maybe"}
        assert q.options[q.answer] == truth[q.id]
        assert q.context == "\n".join(ori[q.id]["CONTEXTS"])
        assert q.question == ori[q.id]["QUESTION"]
    # Without the ground-truth file beside it, the split is recomputed: the same 500 PMIDs.
    shutil.copy(SHARED_DATA / "pubmedqa_ori_pqal.json", tmp_path / "ori_pqal.json")
    assert {q.id for q in load_pubmedqa(tmp_path / "ori_pqal.json")} == set(truth)


@needs_shared
def test_real_mmlu_medical_subjects_and_answers():
    questions = load_benchmark_dir("mmlu_medical", SHARED_DATA)
    counts = Counter(q.meta["subject"] for q in questions)
    assert counts == {"anatomy": 135, "clinical_knowledge": 265, "college_biology": 144,
                      "college_medicine": 173, "medical_genetics": 100,
                      "professional_medicine": 272}
    with open(SHARED_DATA / "mmlu_medical_test" / "medical_genetics_test.csv", newline="") as f:
        raw = list(csv.reader(f))
    genetics = [q for q in questions if q.meta["subject"] == "medical_genetics"]
    for q, row in zip(genetics, raw):
        assert q.question == row[0] and q.options[q.answer] == row[1 + "ABCD".index(row[5])]


@needs_shared
@pytest.mark.parametrize("file", ["mmlu_pro_health_2024-05.jsonl", "mmlu_pro_health_2026-02.jsonl"])
def test_real_mmlu_pro_health(file):
    raw = raw_lines(file)
    questions = load_benchmark("mmlu_pro_health", SHARED_DATA / file)
    assert len(questions) == 818
    for q, row in zip(questions, raw):
        assert q.id == str(row["question_id"])
        assert q.options[q.answer] == row["options"][row["answer_index"]]
    assert {len(q.options) for q in questions} == set(range(3, 11))


@needs_shared
def test_real_medxpertqa_choices_block_removed():
    raw = raw_lines("medxpertqa_text_test.jsonl")
    questions = load_benchmark_dir("medxpertqa", SHARED_DATA)
    for q, row in zip(questions, raw):
        assert "Answer Choices:" not in q.question and len(q.options) == 10
        assert row["question"].startswith(q.question) and q.question
        assert q.options[q.answer] == row["options"][row["label"]]


# ------------------------------------------------------------------ fixtures in each raw layout

MEDQA_ROWS = [
    {"question": "Which drug reverses heparin?", "answer": "Protamine", "answer_idx": "C",
     "options": {"A": "Vitamin K", "B": "Naloxone", "C": "Protamine", "D": "Flumazenil"},
     "meta_info": "step1"},
    {"question": "Deficiency of which vitamin causes scurvy?", "answer": "Vitamin C",
     "answer_idx": "A", "options": {"B": "Vitamin D", "A": "Vitamin C", "D": "Vitamin A",
                                    "C": "Vitamin K"}, "meta_info": "step2&3"},
]


def medmcqa_rows(cop_base):
    return [{"id": f"m{i}", "question": f"Q{i}?", "opa": "a", "opb": "b", "opc": "c", "opd": "d",
             "cop": i + cop_base, "subject_name": "Anatomy"} for i in range(4)]


def test_parquet_copy_of_the_hub_split(tmp_path):
    """A .parquet path is a saved hub split: MedMCQA's hub rows count cop from 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    path = tmp_path / "validation.parquet"
    pq.write_table(pa.Table.from_pylist(medmcqa_rows(0)), path)
    questions = load_benchmark("medmcqa", path)
    assert [q.answer for q in questions] == list("ABCD")
    assert [q.options[q.answer] for q in questions] == list("abcd")
    pq.write_table(pa.Table.from_pylist([dict(medmcqa_rows(0)[0], cop=7)]), path)
    with pytest.raises(ValueError, match=r"validation.parquet row 0: 'cop' 7"):
        load_benchmark("medmcqa", path)


def test_medqa_fixture(tmp_path):
    questions = load_medqa(write_jsonl(tmp_path / "t.jsonl", MEDQA_ROWS))
    assert [q.id for q in questions] == ["medqa-00000", "medqa-00001"]
    assert [q.options[q.answer] for q in questions] == ["Protamine", "Vitamin C"]
    assert list(questions[1].options) == ["A", "B", "C", "D"]  # letters put in order
    assert questions[1].meta["meta_info"] == "step2&3"


def test_medmcqa_both_cop_conventions(tmp_path):
    original = load_medmcqa(write_jsonl(tmp_path / "dev.json", medmcqa_rows(1)), cop_base=1)
    hub = load_medmcqa(write_jsonl(tmp_path / "hub.jsonl", medmcqa_rows(0)), cop_base=0)
    assert [q.answer for q in original] == [q.answer for q in hub] == list("ABCD")
    assert [q.options[q.answer] for q in hub] == list("abcd")
    with pytest.raises(ValueError, match=r"dev.json:1: 'cop' 1 is not in 2..5"):
        load_medmcqa(tmp_path / "dev.json", cop_base=2)
    with pytest.raises(TypeError):
        load_medmcqa(tmp_path / "dev.json")  # the convention must be said


def test_pubmedqa_fixture_with_ground_truth(tmp_path):
    ori = {str(p): {"QUESTION": f"Does {p} work?", "CONTEXTS": ["Background.", "Results."],
                    "final_decision": d} for p, d in [(11, "yes"), (22, "no"), (33, "maybe")]}
    (tmp_path / "ori_pqal.json").write_text(json.dumps(ori, indent=1))
    (tmp_path / "test_ground_truth.json").write_text(json.dumps({"22": "no", "33": "maybe"}))
    questions = load_pubmedqa(tmp_path / "ori_pqal.json")
    assert [(q.id, q.answer) for q in questions] == [("22", "B"), ("33", "C")]
    assert questions[0].context == "Background.\nResults."
    assert "Context: Background.\nResults.\n\nQuestion: Does 22 work?" in \
        build_messages(questions[0], "alphamed")[0]["content"]
    (tmp_path / "test_ground_truth.json").write_text(json.dumps({"22": "no", "44": "yes"}))
    with pytest.raises(ValueError, match=r"test_ground_truth.json: 1 test PMIDs are not in"):
        load_pubmedqa(tmp_path / "ori_pqal.json")
    ori["22"]["final_decision"] = "perhaps"
    (tmp_path / "ori_pqal.json").write_text(json.dumps(ori))
    with pytest.raises(ValueError, match=r"ori_pqal.json PMID 22: final_decision 'perhaps'"):
        load_pubmedqa(tmp_path / "ori_pqal.json")
    (tmp_path / "ori_pqal.json").write_text('{\n "11": {\n  "QUESTION": "x",\n }')
    with pytest.raises(ValueError, match=r"ori_pqal.json:4: malformed JSON"):
        load_pubmedqa(tmp_path / "ori_pqal.json")


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def test_mmlu_fixture_folder_and_file(tmp_path):
    write_csv(tmp_path / "anatomy_test.csv", [["Thigh bone?", "Femur", "Ulna", "Rib", "Skull", "A"],
                                               ["Largest organ?", "Liver", "Skin", "Lung", "Heart",
                                                "B"]])
    write_csv(tmp_path / "astronomy_test.csv", [["Planet?", "Mars", "Sun", "Moon", "Comet", "A"]])
    questions = load_mmlu(tmp_path, subjects=("anatomy",))
    assert [q.options[q.answer] for q in questions] == ["Femur", "Skin"]
    assert questions[0].meta["subject"] == "anatomy"
    assert len(load_mmlu(tmp_path / "astronomy_test.csv")) == 1
    with pytest.raises(FileNotFoundError, match="medical_genetics_test.csv"):
        load_mmlu(tmp_path, subjects=("anatomy", "medical_genetics"))
    write_csv(tmp_path / "bad_test.csv", [["Q?", "a", "b", "c", "d", "A"], ["Q?", "a", "b", "A"]])
    with pytest.raises(ValueError, match=r"bad_test.csv:2: expected 6 columns, got 4"):
        load_mmlu(tmp_path / "bad_test.csv")


def test_mmlu_pro_and_medxpertqa_fixtures(tmp_path):
    pro = write_jsonl(tmp_path / "pro.jsonl", [
        {"question_id": 7, "question": "Q?", "options": ["x", "y", "z"], "answer": "C",
         "category": "health"}])
    q = load_mmlu_pro(pro)[0]
    assert (q.id, q.options, q.answer) == ("7", {"A": "x", "B": "y", "C": "z"}, "C")
    options = {L: f"choice {L}" for L in "ABCDEFGHIJ"}
    block = " ".join(f"({k}) {v}" for k, v in options.items())
    xpert = write_jsonl(tmp_path / "x.jsonl", [{"id": "Text-9", "question": f"Which?\nAnswer "
                                                f"Choices: {block}", "options": options,
                                                "label": "J", "body_system": "Skeletal"}])
    q = load_medxpertqa(xpert)[0]
    assert (q.id, q.question, q.answer, len(q.options)) == ("Text-9", "Which?", "J", 10)
    assert "choice A" in build_messages(q, "alphamed")[0]["content"]


GPQA_HEADER = ["Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
               "Incorrect Answer 3", "Subdomain", "Record ID"]


def gpqa_csv(path, n=24):
    subdomains = ["Genetics", "Molecular Biology", "Quantum Mechanics"]
    rows = [[f"Question {i}\nwith a second line?", f" right {i}\n", f"wrong {i}a", f"wrong {i}b",
             f"wrong {i}c", subdomains[i % 3], f"rec{i}"] for i in range(n)]
    return write_csv(path, [GPQA_HEADER] + rows)


def test_gpqa_fixture_subdomains_and_fixed_shuffle(tmp_path):
    path = gpqa_csv(tmp_path / "gpqa_main.csv")
    questions = load_gpqa(path)
    assert len(questions) == 16 and {q.meta["subdomain"] for q in questions} == {
        "Genetics", "Molecular Biology"}
    for q in questions:
        i = q.id.removeprefix("rec")
        assert q.options[q.answer] == f"right {i}"  # stripped
        wrong = [f"wrong {i}{c}" for c in "abc"]
        assert sorted(q.options.values()) == sorted([f"right {i}"] + wrong)
    assert len({q.answer for q in questions}) >= 3  # keys spread over the letters
    again = load_benchmark_dir("gpqa_medical", tmp_path)
    assert [(q.options, q.answer) for q in again] == [(q.options, q.answer) for q in questions]


@pytest.fixture
def fake_hub(monkeypatch):
    """A stand-in `datasets` module: load_dataset returns the rows registered for an id."""
    tables, calls = {}, []

    def load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        return tables[hub_id]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return tables, calls


def test_hub_layouts(fake_hub):
    tables, calls = fake_hub
    tables["openlifescienceai/medmcqa"] = medmcqa_rows(0)
    tables["GBaker/MedQA-USMLE-4-options"] = MEDQA_ROWS
    tables["cais/mmlu"] = [{"question": "Q?", "subject": s, "choices": ["a", "b", "c", "d"],
                            "answer": 3} for s in ("anatomy", "astronomy", "medical_genetics")]
    tables["TIGER-Lab/MMLU-Pro"] = [{"question_id": i, "question": "Q?", "options": ["a", "b"],
                                     "answer": "B", "category": c} for i, c in
                                    enumerate(["health", "law", "health"])]
    tables["TsinghuaC3I/MedXpertQA"] = [{"id": "Text-1", "question": "Q?\nAnswer Choices: (A) a",
                                         "options": {"A": "a", "B": "b"}, "label": "B"}]
    assert [q.answer for q in load_benchmark("medmcqa")] == list("ABCD")
    assert calls[-1] == ("openlifescienceai/medmcqa", None, "validation")
    assert len(load_benchmark("medqa_train")) == 2
    assert calls[-1] == ("GBaker/MedQA-USMLE-4-options", None, "train")
    load_benchmark("medqa", split="dev")
    assert calls[-1] == ("GBaker/MedQA-USMLE-4-options", None, "dev")  # split overrides
    mmlu = load_benchmark("mmlu_medical")
    assert [q.meta["subject"] for q in mmlu] == ["anatomy", "medical_genetics"]
    assert {q.answer for q in mmlu} == {"D"} and calls[-1] == ("cais/mmlu", "all", "test")
    assert [q.id for q in load_benchmark("mmlu_pro_health")] == ["0", "2"]
    assert load_benchmark("medxpertqa")[0].question == "Q?"
    tables["openlifescienceai/medmcqa"] = [dict(medmcqa_rows(0)[0], cop=-1)]  # the unlabelled test
    with pytest.raises(ValueError, match=r"openlifescienceai/medmcqa validation row 0: 'cop' -1"):
        load_benchmark("medmcqa")


def test_hub_pubmedqa_official_split(fake_hub):
    tables, calls = fake_hub
    labels = ["yes"] * 552 + ["no"] * 338 + ["maybe"] * 110
    random.Random(1).shuffle(labels)
    tables["qiaojin/PubMedQA"] = [
        {"pubid": 1000 + i, "question": f"Q{i}?", "final_decision": d,
         "context": {"contexts": ["Some text."], "labels": ["RESULTS"]}} for i, d in
        enumerate(labels)]
    questions = load_benchmark("pubmedqa")
    assert calls[-1] == ("qiaojin/PubMedQA", "pqa_labeled", "train")
    assert len(questions) == 500 and Counter(q.answer for q in questions) == {
        "A": 276, "B": 169, "C": 55}
    assert questions[0].context == "Some text."
    with pytest.raises(ValueError, match="needs all 1000 pqa_labeled rows, got 999"):
        pubmedqa_official_test(questions + questions[:499])


def test_gpqa_hub_rows_filtered(fake_hub, tmp_path):
    tables, _ = fake_hub
    with open(gpqa_csv(tmp_path / "g.csv", n=6), newline="") as f:
        tables["Idavidrein/gpqa"] = list(csv.DictReader(f))
    assert [q.id for q in load_benchmark("gpqa_medical")] == ["rec0", "rec1", "rec3", "rec4"]


# ------------------------------------------------------------------ bad input

def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MEDQA_ROWS[0]) + "\n{\"question\": \n" + json.dumps(MEDQA_ROWS[1]))
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON line"):
        load_medqa(path)


def test_missing_field_names_field_and_line(tmp_path):
    rows = [MEDQA_ROWS[0], {k: v for k, v in MEDQA_ROWS[1].items() if k != "answer_idx"}]
    with pytest.raises(ValueError, match=r"m.jsonl:2: missing field 'answer_idx'"):
        load_medqa(write_jsonl(tmp_path / "m.jsonl", rows))
    with pytest.raises(ValueError, match=r"o.jsonl:1: field 'options' should be a dict, not list"):
        load_medqa(write_jsonl(tmp_path / "o.jsonl", [dict(MEDQA_ROWS[0], options=["a", "b"])]))
    with pytest.raises(ValueError, match=r"g.csv:2: missing field 'Subdomain'"):
        load_gpqa(write_csv(tmp_path / "g.csv", [GPQA_HEADER[:5], ["Q?", "a", "b", "c", "d"]]))


def test_answer_not_among_options(tmp_path):
    with pytest.raises(ValueError, match=r"a.jsonl:1: medqa record medqa-00000: answer 'E' is not"):
        load_medqa(write_jsonl(tmp_path / "a.jsonl", [dict(MEDQA_ROWS[0], answer_idx="E")]))
    with pytest.raises(ValueError, match=r"x record 1: answer 'C' is not among the options A, B"):
        Question("1", "Q?", {"A": "a", "B": "b"}, "C", "x")
    with pytest.raises(ValueError, match="letters must run A, B"):
        Question("1", "Q?", {"A": "a", "C": "c"}, "A", "x")


def test_unknown_benchmark_lists_names(tmp_path):
    with pytest.raises(ValueError, match=r"unknown benchmark 'medqaa'; known: medqa, medmcqa"):
        load_benchmark("medqaa")
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark_dir("nope", tmp_path)
    with pytest.raises(FileNotFoundError, match="medqa_us_4opt_test.jsonl"):
        load_benchmark_dir("medqa", tmp_path)


# ------------------------------------------------------------------ prompts

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def offline_tokenizer(chat_template):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    specials = ["<s>", "</s>", "<|end|>", "<|user|>", "<|system|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Question: Which organ pumps blood? Options: A. heart"], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   chat_template=chat_template)


Q = Question("q1", "Which organ pumps blood?", {"A": "heart", "B": "lung"}, "A", "demo")


def test_alphamed_and_medrlvr_messages():
    (user,) = build_messages(Q, "alphamed")
    assert user == {"role": "user", "content": (
        "Question: Which organ pumps blood?\n\nOptions:\nA. heart\nB. lung\n\n"
        "Please reason step by step, and put the final answer in \\boxed{}.")}
    system, user = build_messages(Q, "medrlvr")
    assert system["role"] == "system" and "<think> </think>" in system["content"]
    assert "<answer> </answer>" in system["content"]
    assert user["content"] == "Question: Which organ pumps blood?\n\nOptions:\nA. heart\nB. lung"
    with pytest.raises(ValueError, match="unknown prompt style 'r1'"):
        build_messages(Q, "r1")


def test_encode_prompt_with_chat_template_adds_bos_once():
    tok = offline_tokenizer(CHAT_TEMPLATE)
    ids = encode_prompt(tok, Q, "alphamed")
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    assert tok.decode(ids) == ("<s><|user|>Question: Which organ pumps blood?\n\nOptions:\nA. heart"
                               "\nB. lung\n\nPlease reason step by step, and put the final answer "
                               "in \\boxed{}.<|end|><|assistant|>")
    ids = encode_prompt(tok, Q, "medrlvr")
    assert tok.decode(ids).startswith("<s><|system|>A conversation between User and Assistant.")


def test_encode_prompt_without_chat_template_is_plain_text():
    tok = offline_tokenizer(None)
    ids = encode_prompt(tok, Q, "medrlvr")
    text = tok.decode(ids)
    assert ids[0] == tok.bos_token_id and text.startswith("<s>A conversation between")
    assert text.endswith("\n\nUser: Question: Which organ pumps blood?\n\nOptions:\nA. heart\n"
                         "B. lung\n\nAssistant:")
    chat = offline_tokenizer(CHAT_TEMPLATE)
    assert encode_prompt(chat, Q, "medrlvr", chat=False) == encode_prompt(tok, Q, "medrlvr")


def test_shuffle_options_remaps_answer():
    q = Question("q", "Q?", {L: f"text {L}" for L in "ABCDE"}, "D", "x", meta={"k": 1})
    rng, answers = random.Random(0), set()
    for _ in range(50):
        s = shuffle_options(q, rng)
        assert s.options[s.answer] == "text D" and sorted(s.options.values()) == sorted(
            q.options.values())
        assert list(s.options) == list("ABCDE") and s.meta == {"k": 1, "shuffled": True}
        answers.add(s.answer)
    assert len(answers) >= 4 and q.answer == "D" and q.options["D"] == "text D"


# ------------------------------------------------------------------ training sets

def test_build_train_set_dedup_and_exclusion():
    def mk(i, text, options=("a", "b", "c", "d")):
        return Question(str(i), text, dict(zip("ABCD", options)), "A", "t")
    train = [mk(0, "What causes scurvy?"), mk(1, "  what CAUSES   scurvy "),  # duplicate
             mk(2, "All of the following are true except:"),
             mk(3, "All of the following are true except:", ("e", "f", "g", "h")),  # kept
             mk(4, "Which drug reverses heparin?")]
    other = [mk(5, "What causes scurvy?!"), mk(6, "New question?")]
    bench = [mk(9, "Which drug, reverses heparin", ("d", "c", "b", "a"))]  # shuffled options
    kept = build_train_set([train, other], exclude=[bench])
    assert [q.id for q in kept] == ["0", "2", "3", "6"]


def write_pass_rates(path, rates):
    return write_jsonl(path, [{"id": i, "correct": k, "n": n} for i, (k, n) in rates.items()])


def test_difficulty_mix(tmp_path):
    questions = [Question(f"q{i}", f"Q{i}?", {"A": "a", "B": "b"}, "A", "t") for i in range(60)]
    # k of 6: 0..2 -> hard (30 questions), 3 -> medium (10), 4..5 -> easy (20)
    ks = [0, 1, 2, 3, 4, 5] * 10
    path = write_pass_rates(tmp_path / "p.jsonl", {f"q{i}": (ks[i], 6) for i in range(60)})
    chosen = difficulty_mix(questions, path, "easy:5, medium:10,hard:7", seed=3)
    assert Counter(q.meta["difficulty"] for q in chosen) == {"easy": 5, "medium": 10, "hard": 7}
    for q in chosen:
        k = ks[int(q.id[1:])]
        assert q.meta["difficulty"] == ("hard" if k <= 2 else "medium" if k == 3 else "easy")
        assert q.meta["pass_rate"] == k / 6
    assert len({q.id for q in chosen}) == 22
    assert [q.id for q in difficulty_mix(questions, path, {"easy": 5, "medium": 10, "hard": 7},
                                         seed=3)] == [q.id for q in chosen]
    assert [q.id for q in difficulty_mix(questions, path, {"hard": 20}, seed=4)] != \
        [q.id for q in difficulty_mix(questions, path, {"hard": 20}, seed=5)]
    with pytest.raises(ValueError, match="11 medium questions; there are 20 easy, 10 medium, 30 h"):
        difficulty_mix(questions, path, "medium:11")
    with pytest.raises(ValueError, match="bad difficulty mix"):
        difficulty_mix(questions, path, "easy=4")
    with pytest.raises(ValueError, match="bad difficulty mix"):
        difficulty_mix(questions, path, {"trivial": 4})


def test_difficulty_mix_bad_pass_rates(tmp_path):
    questions = [Question(f"q{i}", "Q?", {"A": "a", "B": "b"}, "A", "t") for i in range(3)]
    path = write_pass_rates(tmp_path / "p.jsonl", {"q0": (1, 4), "q2": (4, 4)})
    with pytest.raises(ValueError, match=r"p.jsonl: no pass rate for 1 ids: \['q1'\]"):
        difficulty_mix(questions, path, "easy:1")
    write_pass_rates(path, {"q0": (1, 4), "q1": (5, 4)})
    with pytest.raises(ValueError, match=r"p.jsonl:2: need 0 <= correct <= n"):
        difficulty_mix(questions, path, "easy:1")
    write_jsonl(path, [{"id": "q0", "n": 4}])
    with pytest.raises(ValueError, match=r"p.jsonl:1: missing field 'correct'"):
        difficulty_mix(questions, path, "easy:1")


# ------------------------------------------------------------------ demo task

def test_demo_deterministic_and_fixed_per_fact():
    a, b = demo_questions(64, seed=0), demo_questions(64, seed=0)
    assert a == b and a != demo_questions(64, seed=1)
    assert [q.id for q in a[:3]] == ["demo-0000", "demo-0001", "demo-0002"]
    per_fact = {}
    for q in a:
        per_fact.setdefault(q.question, set()).add((tuple(q.options.items()), q.answer))
        assert len(q.question.split()) <= 6 and all(len(t.split()) <= 2 for t in q.options.values())
    assert len(per_fact) == len(data.DEMO_FACTS) and all(len(v) == 1 for v in per_fact.values())
    keys = Counter(next(iter(v))[1] for v in per_fact.values())
    assert keys == {"A": 4, "B": 4, "C": 4, "D": 4}  # spread evenly over the letters
    facts = dict(data.DEMO_FACTS)
    assert all(q.options[q.answer] == facts[q.question] for q in a)
    assert Counter(q.question for q in a) == {f: 4 for f in facts}  # balanced cycling


def test_demo_shuffled_and_registry():
    facts = dict(data.DEMO_FACTS)
    shuffled = demo_questions(64, seed=0, shuffle=True)
    assert all(q.options[q.answer] == facts[q.question] for q in shuffled)
    by_fact = {}
    for q in shuffled:
        by_fact.setdefault(q.question, set()).add(q.answer)
    assert any(len(v) > 1 for v in by_fact.values())
    assert all(len(q.options) == 5 for q in demo_questions(8, num_options=5))
    demo = load_benchmark("demo")
    assert len(demo) == 256 and demo == load_benchmark_dir("demo", "/nonexistent")
    assert demo[7].id == "demo-0007"


def test_hub_unavailable_names_the_benchmark_and_the_local_alternative(monkeypatch):
    def offline(hub_id, config, split):
        raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(OSError) as err:
        load_benchmark("medqa_train")
    msg = str(err.value)
    assert "medqa_train" in msg and "GBaker/MedQA-USMLE-4-options" in msg
    assert "--data-dir" in msg and "medqa_us_4opt_train.jsonl" in msg and "medqa_train=PATH" in msg
