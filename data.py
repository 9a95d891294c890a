"""Medical multiple-choice QA: loaders, prompts, training-set mixing, a synthetic demo task.

Benchmarks (name: hub id [config] split | raw format read from a path):
  medqa            GBaker/MedQA-USMLE-4-options test, 1273 | jind11/MedQA US 4_options JSONL
  medmcqa          openlifescienceai/medmcqa validation, 4183 (cop 0..3) | dev.json JSONL (cop 1..4)
  pubmedqa         qiaojin/PubMedQA [pqa_labeled] train, official 500-PMID test split |
                   ori_pqal.json (+ test_ground_truth.json beside it); yes/no/maybe + abstract
  mmlu_medical     cais/mmlu [all] test, 6 medical subjects, 1089 | headerless *_test.csv folder
  mmlu_pro_health  TIGER-Lab/MMLU-Pro test, category health, 818 | MMLU-Pro JSONL
  medxpertqa       TsinghuaC3I/MedXpertQA [Text] test, 2450, 10 options | JSONL dump of it
  gpqa_medical     Idavidrein/gpqa [gpqa_main] train (gated), Genetics + Molecular Biology | CSV
  medqa_train, medmcqa_train (training splits); demo (16 one-line facts, made on the fly).
Each record becomes a `Question` (the `example` reward.grade() reads). Bad input raises ValueError
naming the file and line (or record) and the problem; nothing is skipped silently.
"""
import csv
import json
import random
import string
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

LETTERS = string.ascii_uppercase
MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine",
                "medical_genetics", "professional_medicine")
GPQA_MEDICAL = ("Genetics", "Molecular Biology")
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}


@dataclass
class Question:
    id: str
    question: str
    options: dict[str, str]  # ordered letter -> text: A, B, C, ...
    answer: str  # the key, a letter in options
    source: str  # benchmark name
    context: str | None = None  # PubMedQA abstract
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        letters = list(LETTERS[:len(self.options)])
        if self.answer not in self.options or list(self.options) != letters:
            raise ValueError(f"{self.source} record {self.id}: answer {self.answer!r} is not among "
                             f"the options {', '.join(self.options)} (letters must run A, B, ...)")


# Raw rows travel as (where, row) pairs; `where` ("file:line", "file PMID 123") heads any error.
def _get(row: dict, key: str, kind: type = object):
    value = row.get(key) if isinstance(row, dict) else None
    if value is None or not isinstance(value, kind):
        raise ValueError(f"missing field {key!r}" if value is None else
                         f"field {key!r} should be a {kind.__name__}, not {type(value).__name__}")
    return value


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None


def read_records(path) -> list[tuple[str, dict]]:
    """(where, row) pairs of a JSON-lines file (any suffix: medmcqa's dev.json is JSON lines)."""
    path, rows = Path(path), []
    lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines(): U+2028 in strings
    for n, line in enumerate(lines, 1):
        try:
            rows += [(f"{path}:{n}", json.loads(line))] if line.strip() else []
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: malformed JSON line ({e.msg})") from None
    return rows


def read_csv(path, columns: list[str] | None = None) -> list[tuple[str, dict]]:
    """(where, row dict) pairs; `columns` names the columns of a headerless file."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header, rows = columns or next(reader, []), []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            if len(row) != len(header):
                raise ValueError(f"{where}: expected {len(header)} columns, got {len(row)}")
            rows.append((where, dict(zip(header, row))))
    return rows


def _convert(rows: list[tuple[str, dict]], convert, source: str) -> list[Question]:
    """convert(row, index, source) -> Question for each row; errors get `where` as a prefix."""
    questions = []
    for i, (where, row) in enumerate(rows):
        try:
            questions.append(convert(row, i, source))
        except (LookupError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
    return questions


def _medqa_row(row, idx, source):
    return Question(f"{source}-{idx:05d}", _get(row, "question"), answer=_get(row, "answer_idx"),
                    options={k: str(v) for k, v in sorted(_get(row, "options", dict).items())},
                    source=source, meta={"meta_info": row.get("meta_info")})


def _medmcqa_row(row, idx, source, cop_base):
    """`cop` is 1-based in the original release, 0-based on the hub: the caller says which."""
    cop = int(_get(row, "cop"))
    if not cop_base <= cop < cop_base + 4:
        raise ValueError(f"'cop' {cop} is not in {cop_base}..{cop_base + 3} (cop_base={cop_base})")
    return Question(str(row.get("id") or f"{source}-{idx:05d}"), _get(row, "question"),
                    {L: str(_get(row, "op" + L.lower())) for L in "ABCD"}, LETTERS[cop - cop_base],
                    source, meta={"subject": row.get("subject_name")})


def _pubmedqa_row(row, idx, source):
    """Hub rows (pubid, question, context.contexts, final_decision) or ori_pqal.json records."""
    hub = "context" in row
    contexts = _get(_get(row, "context"), "contexts") if hub else _get(row, "CONTEXTS", list)
    answers = {text: letter for letter, text in PUBMEDQA_OPTIONS.items()}
    if _get(row, "final_decision") not in answers:
        raise ValueError(f"final_decision {row['final_decision']!r} is not yes / no / maybe")
    return Question(str(_get(row, "pubid")), _get(row, "question" if hub else "QUESTION"),
                    dict(PUBMEDQA_OPTIONS), answers[row["final_decision"]], source,
                    "\n".join(contexts))


def _mmlu_row(row, idx, source):
    """Hub rows: question, subject, choices, answer index (the CSV loader gives a letter)."""
    answer = _get(row, "answer")
    return Question(f"{source}-{idx:05d}", _get(row, "question"),
                    dict(zip(LETTERS, map(str, _get(row, "choices", list)))),
                    LETTERS[answer] if isinstance(answer, int) else answer.strip(), source,
                    meta={"subject": _get(row, "subject")})


def _mmlu_pro_row(row, idx, source):
    return Question(str(_get(row, "question_id")), _get(row, "question"),
                    dict(zip(LETTERS, map(str, _get(row, "options", list)))), _get(row, "answer"),
                    source, meta={"category": row.get("category"), "src": row.get("src")})


def _medxpertqa_row(row, idx, source):
    question = _get(row, "question")
    cut = question.rfind("Answer Choices:")  # the options, repeated inline: show them once
    return Question(str(_get(row, "id")), question[:cut].rstrip() if cut >= 0 else question,
                    dict(_get(row, "options", dict)), _get(row, "label"), source,
                    meta={k: row.get(k) for k in ("medical_task", "body_system")})


def _gpqa_row(row, idx, source):
    """GPQA CSV rows; options shuffled with a seed fixed per record, so the keys spread over A-D."""
    texts = [str(_get(row, k)).strip() for k in
             ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")]
    record_id = str(row.get("Record ID") or f"{source}-{idx:04d}")
    order = random.Random(f"gpqa:{record_id}").sample(range(4), 4)  # str seed: sha512, stable
    return Question(record_id, str(_get(row, "Question")).strip(),
                    {LETTERS[i]: texts[j] for i, j in enumerate(order)}, LETTERS[order.index(0)],
                    source, meta={"subdomain": str(_get(row, "Subdomain")).strip()})


def pubmedqa_official_test(questions: list[Question]) -> list[Question]:
    """The standard 500-PMID test split as pubmedqa's split_dataset.py makes it: random.seed(0)
    shuffles each label's PMIDs (yes, no, maybe; file order); the second halves are the test set."""
    if len(questions) != 1000:
        raise ValueError(f"the split needs all 1000 pqa_labeled rows, got {len(questions)}")
    rng, test = random.Random(0), set()
    for letter in PUBMEDQA_OPTIONS:
        ids = [q.id for q in questions if q.answer == letter]
        rng.shuffle(ids)
        test.update(ids[(len(ids) + 1) // 2:])  # after ceil(len / 2), as the script splits
    return [q for q in questions if q.id in test]


# Raw-format loaders: load_x(path, source=benchmark name) -> list[Question].
def _load_records(path, convert, source: str) -> list[Question]:
    return _convert(read_records(path), convert, source)


load_medqa = partial(_load_records, convert=_medqa_row, source="medqa")
load_mmlu_pro = partial(_load_records, convert=_mmlu_pro_row, source="mmlu_pro_health")
load_medxpertqa = partial(_load_records, convert=_medxpertqa_row, source="medxpertqa")


def load_medmcqa(path, *, cop_base: int, source: str = "medmcqa") -> list[Question]:
    """MedMCQA JSONL; `cop_base` (no default): 1 for the original release, 0 for hub rows."""
    return _load_records(path, partial(_medmcqa_row, cop_base=cop_base), source)


def load_pubmedqa(path, source: str = "pubmedqa") -> list[Question]:
    """ori_pqal.json, test split: the PMIDs of *test_ground_truth.json beside it, or recomputed."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected an object keyed by PMID")
    rows = [(f"{path} PMID {p}", {**r, "pubid": p}) for p, r in data.items()]
    questions = _convert(rows, _pubmedqa_row, source)
    truth = sorted(path.parent.glob("*test_ground_truth.json"))
    if not truth:
        return pubmedqa_official_test(questions)
    test_ids = _read_json(truth[0])
    test = [q for q in questions if q.id in test_ids]
    if len(test) != len(test_ids):
        raise ValueError(f"{truth[0]}: {len(test_ids) - len(test)} test PMIDs are not in {path}")
    return test


def load_mmlu(path, subjects=MMLU_MEDICAL, source: str = "mmlu_medical") -> list[Question]:
    """Headerless CSV (question, A, B, C, D, answer): a file, or a folder of {subject}_test.csv."""
    path, rows = Path(path), []
    for f in [path / f"{s}_test.csv" for s in subjects] if path.is_dir() else [path]:
        rows += [(where, {"question": r["question"], "choices": [r[L] for L in "ABCD"],
                          "answer": r["answer"], "subject": f.stem.removesuffix("_test")})
                 for where, r in read_csv(f, columns=["question", *"ABCD", "answer"])]
    return _convert(rows, _mmlu_row, source)


def load_gpqa(path, subdomains=GPQA_MEDICAL, source: str = "gpqa_medical") -> list[Question]:
    """GPQA CSV with a header row; only the questions of `subdomains`."""
    questions = _convert(read_csv(path), _gpqa_row, source)
    return [q for q in questions if q.meta["subdomain"] in subdomains]


# hub: (dataset id, config, split); hub_row: converter of hub rows; select: the subset of the hub
# rows; load: raw-file loader; file: its name in a data folder like ../shared/data.
_MEDQA = dict(hub_row=_medqa_row, load=load_medqa)
_MEDMCQA = dict(hub_row=partial(_medmcqa_row, cop_base=0), load=partial(load_medmcqa, cop_base=1))
_MEDQA_HUB, _MEDMCQA_HUB = "GBaker/MedQA-USMLE-4-options", "openlifescienceai/medmcqa"
BENCHMARKS = {
    "medqa": dict(_MEDQA, hub=(_MEDQA_HUB, None, "test"), file="medqa_us_4opt_test.jsonl"),
    "medmcqa": dict(_MEDMCQA, hub=(_MEDMCQA_HUB, None, "validation"), file="medmcqa_dev.jsonl"),
    "pubmedqa": dict(hub=("qiaojin/PubMedQA", "pqa_labeled", "train"), hub_row=_pubmedqa_row,
                     select=pubmedqa_official_test, load=load_pubmedqa,
                     file="pubmedqa_ori_pqal.json"),
    "mmlu_medical": dict(hub=("cais/mmlu", "all", "test"), hub_row=_mmlu_row, load=load_mmlu,
                         select=lambda qs: [q for q in qs if q.meta["subject"] in MMLU_MEDICAL],
                         file="mmlu_medical_test"),
    "mmlu_pro_health": dict(hub=("TIGER-Lab/MMLU-Pro", None, "test"), hub_row=_mmlu_pro_row,
                            select=lambda qs: [q for q in qs if q.meta["category"] == "health"],
                            load=load_mmlu_pro, file="mmlu_pro_health_2024-05.jsonl"),
    "medxpertqa": dict(hub=("TsinghuaC3I/MedXpertQA", "Text", "test"), hub_row=_medxpertqa_row,
                       load=load_medxpertqa, file="medxpertqa_text_test.jsonl"),
    "gpqa_medical": dict(hub=("Idavidrein/gpqa", "gpqa_main", "train"), hub_row=_gpqa_row,
                         select=lambda qs: [q for q in qs if q.meta["subdomain"] in GPQA_MEDICAL],
                         load=load_gpqa, file="gpqa_main.csv"),
    "medqa_train": dict(_MEDQA, hub=(_MEDQA_HUB, None, "train"), file="medqa_us_4opt_train.jsonl"),
    "medmcqa_train": dict(_MEDMCQA, hub=(_MEDMCQA_HUB, None, "train"), file="medmcqa_train.jsonl"),
    "demo": dict(hub=None, file=None),  # demo_questions(256, seed=0), whatever path and split
}


def load_benchmark(name: str, path=None, split: str | None = None) -> list[Question]:
    """From the hub when path is None (`split` overrides the registry's), else from a raw file;
    a .parquet file is read as a saved copy of the hub split (the hub's row layout)."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if name == "demo":
        return demo_questions(256, seed=0)
    entry = BENCHMARKS[name]
    if path is not None and Path(path).suffix != ".parquet":
        return entry["load"](path, source=name)
    if path is not None:
        import pyarrow.parquet as pq  # comes with `datasets`
        rows = [(f"{path} row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]
    else:
        rows = _hub_rows(name, entry, split)
    questions = _convert(rows, entry["hub_row"], name)
    return entry["select"](questions) if "select" in entry else questions


class HubUnavailable(OSError):
    """A benchmark that only the Hugging Face hub has here, and the hub could not be read."""


def _hub_rows(name: str, entry: dict, split: str | None) -> list[tuple[str, dict]]:
    from datasets import load_dataset  # optional dependency: only the hub path needs it
    hub_id, config, split = *entry["hub"][:2], split or entry["hub"][2]
    try:
        dataset = load_dataset(hub_id, config, split=split)
    except Exception as e:  # offline, unreachable, gated: one clear error naming what to pass
        raise HubUnavailable(
            f"{name} comes from the Hugging Face hub ({hub_id}, split {split}), which could not be "
            f"read ({type(e).__name__}: {str(e)[:200]}). Offline, pass --data-dir DIR holding "
            f"{entry['file']} (raw files laid out as ../shared/data) or {name}=PATH") from None
    return [(f"{hub_id} {split} row {i}", dict(r)) for i, r in enumerate(dataset)]


def load_benchmark_dir(name: str, data_dir) -> list[Question]:
    """A benchmark from a folder laid out like ../shared/data (file names in BENCHMARKS)."""
    file = BENCHMARKS.get(name, {}).get("file")
    return load_benchmark(name, None if file is None else Path(data_dir) / file)


ALPHAMED_INSTRUCTION = "Please reason step by step, and put the final answer in \\boxed{}."
MEDRLVR_SYSTEM = (
    "A conversation between User and Assistant. The User asks a multiple-choice medical question. "
    "The Assistant first thinks step by step, then gives the letter of one option. The reasoning "
    "and the letter are enclosed in <think> </think> and <answer> </answer> tags, respectively, "
    "i.e. <think> reasoning process here </think> <answer> letter here </answer>.")


def build_messages(q: Question, style: str) -> list[dict]:
    """alphamed: a user turn ending in the \\boxed{} instruction; medrlvr: R1-Zero system + user."""
    options = "\n".join(f"{letter}. {text}" for letter, text in q.options.items())
    context = f"Context: {q.context}\n\n" if q.context else ""
    user = f"{context}Question: {q.question}\n\nOptions:\n{options}"
    if style == "alphamed":
        return [{"role": "user", "content": f"{user}\n\n{ALPHAMED_INSTRUCTION}"}]
    if style == "medrlvr":
        return [{"role": "system", "content": MEDRLVR_SYSTEM}, {"role": "user", "content": user}]
    raise ValueError(f"unknown prompt style {style!r}; known: alphamed, medrlvr")


def encode_prompt(tokenizer, q: Question, style: str, chat: bool | None = None) -> list[int]:
    """Prompt token ids; chat=None uses the chat template if the tokenizer has one (its rendering
    holds any BOS already, so none is added twice), else plain "User: ...\\n\\nAssistant:" text."""
    messages = build_messages(q, style)
    if chat if chat is not None else getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer.encode(text, add_special_tokens=False)
    prefix = {"system": "", "user": "User: ", "assistant": "Assistant: "}
    text = "\n\n".join(prefix[m["role"]] + m["content"] for m in messages) + "\n\nAssistant:"
    return tokenizer.encode(text, add_special_tokens=True)


def shuffle_options(q: Question, rng: random.Random) -> Question:
    """The same question with its options in a random order and the key letter remapped."""
    texts = list(q.options.values())
    order = rng.sample(range(len(texts)), len(texts))  # new letter i shows old option order[i]
    return replace(q, options={LETTERS[i]: texts[j] for i, j in enumerate(order)},
                   answer=LETTERS[order.index(LETTERS.index(q.answer))],
                   meta={**q.meta, "shuffled": True})


def question_key(q: Question) -> str:
    """Normalised question + sorted option texts (MedMCQA reuses stems like "All true except")."""
    def norm(text):
        return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())
    return norm(q.question) + " || " + " | ".join(sorted(norm(t) for t in q.options.values()))


def build_train_set(sources: list[list[Question]],
                    exclude: list[list[Question]] = ()) -> list[Question]:
    """Concatenate, drop repeats and questions also in an `exclude` list (evaluation benchmarks)."""
    seen = {question_key(q) for qs in exclude for q in qs}
    kept = []
    for q in (q for qs in sources for q in qs):
        if question_key(q) not in seen:
            seen.add(question_key(q))
            kept.append(q)
    return kept


def difficulty_mix(questions: list[Question], pass_rates_path, mix,
                   seed: int = 0) -> list[Question]:
    """Draw mix[level] questions of each level (seeded), tagged meta["difficulty"], shuffled.
    `mix`: a dict or a spec such as "easy:400,medium:400,hard:400". Levels by the base model's
    pass rate k/n: hard k/n <= 1/3, easy >= 2/3, medium between (thirds: every level is reachable
    for any n >= 3). AlphaMed found that a mix of levels trains best."""
    levels = {"easy": [], "medium": [], "hard": []}
    if isinstance(mix, str):
        mix = dict(part.partition(":")[::2] for part in mix.replace(" ", "").split(","))
    if not set(mix) <= set(levels) or not all(str(v).isdigit() for v in mix.values()):
        raise ValueError(f"bad difficulty mix {mix!r}; expected e.g. 'easy:400,hard:400'")
    rates = {}
    for where, row in read_records(pass_rates_path):  # {"id": ..., "correct": k, "n": n} lines
        try:
            qid, k, n = str(_get(row, "id")), _get(row, "correct", int), _get(row, "n", int)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        if not 0 <= k <= n or n == 0 or qid in rates:
            raise ValueError(f"{where}: need 0 <= correct <= n, n > 0 and an id not seen before")
        rates[qid] = (k, n)
    missing = [q.id for q in questions if q.id not in rates]
    if missing:
        raise ValueError(f"{pass_rates_path}: no pass rate for {len(missing)} ids: {missing[:5]}")
    for q in questions:
        rate = rates[q.id][0] / rates[q.id][1]
        level = "hard" if rate <= 1 / 3 else "easy" if rate >= 2 / 3 else "medium"
        levels[level].append(replace(q, meta={**q.meta, "difficulty": level, "pass_rate": rate}))
    rng, chosen = random.Random(seed), []
    for level, count in mix.items():
        if int(count) > len(levels[level]):
            raise ValueError(f"difficulty mix asks for {count} {level} questions; there are "
                             + ", ".join(f"{len(v)} {k}" for k, v in levels.items()))
        chosen += rng.sample(levels[level], int(count))
    rng.shuffle(chosen)
    return chosen


# The demo task: one-line facts (question, answer); distractors are the other facts' answers.
DEMO_FACTS = [
    ("Which organ pumps blood?", "heart"), ("Which organ makes bile?", "liver"),
    ("Which organ filters urine?", "kidney"), ("Which organ takes in air?", "lung"),
    ("Which organ thinks?", "brain"), ("Which organ sees?", "eye"), ("Which organ hears?", "ear"),
    ("Which organ digests food?", "stomach"), ("Which organ stores urine?", "bladder"),
    ("Which organ covers the body?", "skin"), ("Which gland makes insulin?", "pancreas"),
    ("Which bone guards the brain?", "skull"), ("Which cell carries oxygen?", "red cell"),
    ("Which cell fights germs?", "white cell"), ("Which hormone lowers sugar?", "insulin"),
    ("Which vitamin needs sunlight?", "vitamin D")]


def demo_questions(n: int, seed: int = 0, num_options: int = 4,
                   shuffle: bool = False) -> list[Question]:
    """n questions cycling through the facts in a seeded order. Fact i has fixed options (seed-i
    distractors, key i % num_options: keys spread evenly); shuffle=True shuffles each question."""
    if not 2 <= num_options <= len(DEMO_FACTS):
        raise ValueError(f"num_options must be in 2..{len(DEMO_FACTS)}, got {num_options}")
    rng, out, order = random.Random(seed), [], []
    for j in range(n):
        order = order or rng.sample(range(len(DEMO_FACTS)), len(DEMO_FACTS))
        i = order.pop()
        others = [answer for _, answer in DEMO_FACTS[:i] + DEMO_FACTS[i + 1:]]
        texts = random.Random(i).sample(others, num_options - 1)
        texts.insert(i % num_options, DEMO_FACTS[i][1])
        q = Question(f"demo-{j:04d}", DEMO_FACTS[i][0], dict(zip(LETTERS, texts)),
                     LETTERS[i % num_options], "demo", meta={"fact": i})
        out.append(shuffle_options(q, rng) if shuffle else q)
    return out
