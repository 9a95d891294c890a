"""reward.py: tables of crafted completions and hedges, answer-leak cases, lenient_letter, and a
never-raises property test."""
import time
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reward import ALPHAMED, FORMATS, MEDRLVR, RewardInfo, grade, lenient_letter

Q4 = SimpleNamespace(options={"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Alteplase"},
                     answer="B")
Q5 = SimpleNamespace(options={k: f"drug {k.lower()}" for k in "ABCDE"}, answer="E")
Q10 = SimpleNamespace(options={k: f"finding {i}" for i, k in enumerate("ABCDEFGHIJ")}, answer="J")
YNM = SimpleNamespace(options={"A": "yes", "B": "no", "C": "maybe"}, answer="C")
VIT = SimpleNamespace(options={"A": "Vitamin A", "B": "Vitamin B12", "C": "A. baumannii",
                               "D": "Vitamin D"}, answer="C")
QP = SimpleNamespace(options={"A": "Asthma", "B": "Pneumonia", "C": "Sarcoidosis", "D": "Anemia"},
                     answer="B")

TA = "think_answer"
AI = "answer_is"
R = "Heparin acts immediately on antithrombin. "  # neutral reasoning, no letters

# (completion, example, fmt, values, expected reward, expected letter, expected format_ok)
CASES = [
    # --- boxed: every accepted spelling
    (R + r"\boxed{B}", Q4, "boxed", ALPHAMED, 1.0, "B", True),
    (R + r"\boxed{(B)}", Q4, "boxed", ALPHAMED, 1.0, "B", True),
    (R + r"\boxed{B.}", Q4, "boxed", ALPHAMED, 1.0, "B", True),
    (R + r"\boxed{B)}", Q4, "boxed", ALPHAMED, 1.0, "B", True),
    (R + r"\boxed{B) Heparin}", Q4, "boxed", ALPHAMED, 1.0, "B", True),
    (R + r"\boxed{B. Heparin}", Q4, "boxed", ALPHAMED, 1.0, "B", True),
    (R + r"\boxed{B: Heparin}", Q4, "boxed", ALPHAMED, 1.0, "B", True),
    (R + r"\boxed{(B) Heparin}", Q4, "boxed", ALPHAMED, 1.0, "B", True),
    (R + r"$\boxed{\text{B}}$", Q4, "boxed", ALPHAMED, 1.0, "B", True),
    (R + r"\boxed{\textbf{ B }}", Q4, "boxed", ALPHAMED, 1.0, "B", True),
    (R + r"\boxed{  heparin }", Q4, "boxed", ALPHAMED, 1.0, "B", True),  # exact option text
    (R + r"\boxed{B) Aspirin}", Q4, "boxed", ALPHAMED, 0.0, None, False),  # text contradicts B
    (R + r"\boxed{A}", Q4, "boxed", ALPHAMED, 0.0, "A", True),
    (R + r"\boxed{A}", Q4, "boxed", MEDRLVR, 0.0, "A", True),
    (R + r"\boxed{Warfarin}", Q4, "boxed", MEDRLVR, 0.0, "C", True),
    # --- boxed: last box wins, trailing text ignored, rejections
    (r"First \boxed{A}, on reflection \boxed{B}.", Q4, "boxed", ALPHAMED, 1.0, "B", True),
    (r"First \boxed{B}, on reflection \boxed{A}", Q4, "boxed", ALPHAMED, 0.0, "A", True),
    (r"\boxed{B} wait, maybe not \boxed{", Q4, "boxed", MEDRLVR, -1.0, None, False),  # unclosed
    (r"\boxed{B{}", Q4, "boxed", MEDRLVR, -1.0, None, False),  # unbalanced
    (R + r"\boxed{}", Q4, "boxed", MEDRLVR, -1.0, None, False),
    (R + r"\boxed{  }", Q4, "boxed", ALPHAMED, 0.0, None, False),
    (R + "The answer is B.", Q4, "boxed", MEDRLVR, -1.0, None, False),  # no box
    (R + r"\boxed{A, B}", Q4, "boxed", MEDRLVR, -1.0, None, False),
    (R + r"\boxed{A and B}", Q4, "boxed", MEDRLVR, -1.0, None, False),
    (R + r"\boxed{A or B}", Q4, "boxed", MEDRLVR, -1.0, None, False),
    (R + r"\boxed{B/C}", Q4, "boxed", MEDRLVR, -1.0, None, False),
    (R + r"\boxed{E}", Q4, "boxed", MEDRLVR, -1.0, None, False),  # not an option
    (R + r"\boxed{b}", Q4, "boxed", MEDRLVR, -1.0, None, False),  # lowercase rejected
    (R + r"\boxed{B because it is fast}", Q4, "boxed", MEDRLVR, -1.0, None, False),
    (R + r"\boxed{Dabigatran}", Q4, "boxed", MEDRLVR, -1.0, None, False),
    # --- boxed: 5 and 10 options, yes/no/maybe, option texts that look like letters
    (R + r"\boxed{E}", Q5, "boxed", ALPHAMED, 1.0, "E", True),
    (R + r"\boxed{F}", Q5, "boxed", MEDRLVR, -1.0, None, False),
    (R + r"\boxed{J}", Q10, "boxed", ALPHAMED, 1.0, "J", True),
    (R + r"\boxed{finding 3}", Q10, "boxed", ALPHAMED, 0.0, "D", True),
    (R + r"\boxed{K}", Q10, "boxed", MEDRLVR, -1.0, None, False),
    (R + r"\boxed{maybe}", YNM, "boxed", ALPHAMED, 1.0, "C", True),
    (R + r"\boxed{Yes}", YNM, "boxed", MEDRLVR, 0.0, "A", True),
    (R + r"\boxed{D}", YNM, "boxed", MEDRLVR, -1.0, None, False),
    (R + r"\boxed{A. baumannii}", VIT, "boxed", ALPHAMED, 1.0, "C", True),  # exact text beats "A."
    (R + r"\boxed{vitamin  b12}", VIT, "boxed", MEDRLVR, 0.0, "B", True),
    # --- think_answer
    ("<think>" + R + "</think><answer>B</answer>", Q4, TA, MEDRLVR, 1.0, "B", True),
    ("  \n<think>" + R + "</think>\n<answer> (B) </answer>\n", Q4, TA, MEDRLVR, 1.0, "B", True),
    ("<think>" + R + "</think> <answer>B. Heparin</answer>", Q4, TA, ALPHAMED, 1.0, "B", True),
    ("<think>" + R + "</think> <answer>heparin.</answer>", Q4, TA, MEDRLVR, 1.0, "B", True),
    ("<think>" + R + "</think> <answer>**D**</answer>", Q4, TA, MEDRLVR, 0.0, "D", True),
    ("<think>" + R + r"\boxed{A}</think><answer>B</answer>", Q4, TA, MEDRLVR, 1.0, "B", True),
    ("<think>" + R + "</think><answer>B</answer> Done.", Q4, TA, MEDRLVR, -1.0, None, False),
    ("Sure. <think>" + R + "</think><answer>B</answer>", Q4, TA, MEDRLVR, -1.0, None, False),
    ("<think>" + R + "</think> So B. <answer>B</answer>", Q4, TA, MEDRLVR, -1.0, None, False),
    ("<think>x</think><answer>A</answer><answer>B</answer>", Q4, TA, MEDRLVR, -1.0, None, False),
    ("<think><think>x</think></think><answer>B</answer>", Q4, TA, MEDRLVR, -1.0, None, False),
    ("<think>" + R + "<answer>B</answer>", Q4, TA, MEDRLVR, -1.0, None, False),  # no </think>
    ("<answer>B</answer><think>" + R + "</think>", Q4, TA, MEDRLVR, -1.0, None, False),
    ("<think>" + R + "</think><answer></answer>", Q4, TA, MEDRLVR, -1.0, None, False),
    ("<think>" + R + "</think><answer>A or B</answer>", Q4, TA, ALPHAMED, 0.0, None, False),
    ("<think>" + R + "</think><answer>E</answer>", Q4, TA, MEDRLVR, -1.0, None, False),
    ("<THINK>" + R + "</THINK><answer>B</answer>", Q4, TA, MEDRLVR, -1.0, None, False),
    ("<think>" + R + "</think><answer>no</answer>", YNM, TA, MEDRLVR, 0.0, "B", True),
    ("<think>" + R + "</think><answer>\\text{J}</answer>", Q10, TA, MEDRLVR, 1.0, "J", True),
    (R + r"\boxed{B}", Q4, TA, MEDRLVR, -1.0, None, False),  # right answer, wrong format
    # --- answer_is
    (R + "The answer is B", Q4, AI, ALPHAMED, 1.0, "B", True),
    (R + "the answer is (B).", Q4, AI, ALPHAMED, 1.0, "B", True),
    (R + "The correct answer is B.", Q4, AI, MEDRLVR, 1.0, "B", True),
    (R + "THE ANSWER IS: B) Heparin\nExtra notes follow.", Q4, AI, MEDRLVR, 1.0, "B", True),
    (R + "The final answer is:\n\n**B. Heparin**", Q4, AI, MEDRLVR, 1.0, "B", True),
    (R + "The answer is Heparin.", Q4, AI, MEDRLVR, 1.0, "B", True),
    (R + "The answer is $\\textbf{B}$", Q4, AI, MEDRLVR, 1.0, "B", True),
    ("The answer is A. Hmm, no: the answer is B.", Q4, AI, MEDRLVR, 1.0, "B", True),  # last wins
    ("The answer is B. Hmm, no: the answer is A.", Q4, AI, MEDRLVR, 0.0, "A", True),
    (R + "The answer is B because it is fast.", Q4, AI, MEDRLVR, -1.0, None, False),
    (R + "The answer is A or B.", Q4, AI, MEDRLVR, -1.0, None, False),
    (R + "The answer is A, B.", Q4, AI, MEDRLVR, -1.0, None, False),
    (R + "The answer is", Q4, AI, MEDRLVR, -1.0, None, False),
    (R + "The answer is E.", Q4, AI, MEDRLVR, -1.0, None, False),
    (R + "I would pick B.", Q4, AI, MEDRLVR, -1.0, None, False),
    (R + "The answer is maybe.", YNM, AI, ALPHAMED, 1.0, "C", True),
    (R + "The answer is E", Q5, AI, MEDRLVR, 1.0, "E", True),
    ("", Q4, AI, MEDRLVR, -1.0, None, False),
    ("", Q4, "boxed", MEDRLVR, -1.0, None, False),
    ("", Q4, TA, MEDRLVR, -1.0, None, False),
]


@pytest.mark.parametrize("completion,example,fmt,values,reward,letter,format_ok", CASES)
def test_score_table(completion, example, fmt, values, reward, letter, format_ok):
    got, info = grade(completion, example, fmt, values)
    assert (got, info.letter, info.format_ok) == (reward, letter, format_ok)
    assert info.correct == (letter == example.answer)
    assert (info.reason == "") == format_ok


LONG = "Heparin potentiates antithrombin III and acts within minutes, unlike the oral agents. " * 6


@pytest.mark.parametrize("completion,fmt,leak", [
    ("<think>The answer is B. " + LONG + "</think><answer>B</answer>", TA, True),
    ("<think>" + LONG + "The answer is B.</think><answer>B</answer>", TA, False),  # late: not first part
    ("<think>The answer is A. " + LONG + "</think><answer>B</answer>", TA, False),  # other letter
    ("<think>B. " + LONG + "</think><answer>B</answer>", TA, True),
    ("<think>Answer: (B)\n" + LONG + "</think><answer>B</answer>", TA, True),
    ("<think>I think option B fits. " + LONG + "</think><answer>B</answer>", TA, True),
    (r"\boxed{B} " + LONG + r"so \boxed{B}", "boxed", True),
    (LONG + r"\boxed{B}", "boxed", False),
    ("Answer is B. " + LONG + "The answer is B.", AI, True),
    # the article "A" and "vitamin A." in prose are not declared answers
    ("<think>A 45-year-old man has A fib. A diagnosis is needed; vitamin A. is irrelevant. " + LONG
     + "</think><answer>A</answer>", TA, False),
    ("<think>A patient on A drug regimen. " + LONG + "</think><answer>(A)</answer>", TA, False),
    ("<think>(A) is right. " + LONG + "</think><answer>A</answer>", TA, True),
    # markdown before the letter: `*` runs still anchor "B." (the linear-time rewrite keeps this)
    ("<think>**B.** " + LONG + "</think><answer>B</answer>", TA, True),
    ("<think>Hm. * *\t B) first. " + LONG + "</think><answer>B</answer>", TA, True),
    ("<think>Vitamin **B. " + LONG + "</think><answer>B</answer>", TA, True),
])
def test_answer_leak(completion, fmt, leak):
    _, info = grade(completion, Q4, fmt, MEDRLVR)
    assert info.format_ok
    assert info.answer_leak is leak


# Hedges: a letter with text must be that option's text; a second letter is a second answer.
HEDGES = [  # (completion, example, fmt, reason)
    *[(c, QP, fmt, reason) for body, reason in [
        ("B. C", "several answers"),
        ("(B) (C)", "several answers"),
        ("B: C", "several answers"),
        ("B. or maybe C", "several answers"),
        ("B) Anemia", "text disagrees with option B"),  # Anemia is option D
        ("B. Asthma", "text disagrees with option B"),
        ("B. Pneumonia or sarcoidosis", "text disagrees with option B"),
      ] for fmt, c in [("boxed", R + r"\boxed{%s}" % body),
                       (TA, "<think>" + R + "</think> <answer>%s</answer>" % body),
                       (AI, R + "The answer is " + body)]],
    (R + "The answer is B\nor C", QP, AI, "hedge after the answer"),
    (R + "The answer is B.\nBut it could be C.", QP, AI, "hedge after the answer"),
    (R + "The answer is B.\n\n(C) is also possible.", QP, AI, "hedge after the answer"),
    (R + "The answer is B.\nC. Sarcoidosis fits too.", QP, AI, "hedge after the answer"),
    (R + "The answer is **B**\n\n**D**", QP, AI, "hedge after the answer"),
    (R + "The answer is B.\nFinal answer: option A", QP, AI, "hedge after the answer"),
    ("<think>" + R + "</think><answer>B\nor C</answer>", QP, TA, "several answers"),
]


@pytest.mark.parametrize("completion,example,fmt,reason", HEDGES)
def test_hedges_are_format_failures(completion, example, fmt, reason):
    got, info = grade(completion, example, fmt, MEDRLVR)
    assert (got, info.letter, info.format_ok, info.reason) == (-1.0, None, False, reason)


CLEAN = [  # (completion, example, fmt, letter): must stay accepted
    (R + r"\boxed{B. Pneumonia}", QP, "boxed", "B"),
    (R + r"\boxed{B. **pneumonia.**}", QP, "boxed", "B"),  # bold, case, trailing period
    (R + r"\boxed{(B). Pneumonia}", QP, "boxed", "B"),
    (R + r"\boxed{D) Anemia}", QP, "boxed", "D"),
    ("<think>" + R + "</think> <answer> B </answer>", QP, TA, "B"),
    ("<think>" + R + "</think> <answer>B:  Pneumonia.</answer>", QP, TA, "B"),
    (R + "The answer is B.\n\nThis is because the fever and the consolidation fit pneumonia, "
     "while asthma and anemia do not.", QP, AI, "B"),
    (R + "The answer is B. Pneumonia\n\nOption B explains the infiltrate; (B) is the one.", QP, AI,
     "B"),
    (R + "The answer is B.\nA patient with anemia or sarcoidosis would look different.", QP, AI,
     "B"),
    (R + "The answer is C.\nI would not pick asthma.", Q10, AI, "C"),  # "I" is a pronoun here
]


@pytest.mark.parametrize("completion,example,fmt,letter", CLEAN)
def test_clean_answers_stay_correct(completion, example, fmt, letter):
    got, info = grade(completion, example, fmt, MEDRLVR)
    assert (info.letter, info.format_ok, info.reason) == (letter, True, "")
    assert got == (1.0 if letter == example.answer else 0.0)


@pytest.mark.parametrize("completion", [None, b"\\boxed{B}", 2, ["B"]])
def test_non_text_is_bad_format(completion):
    for fmt in FORMATS:
        got, info = grade(completion, Q4, fmt, MEDRLVR)
        assert (got, info.letter, info.format_ok, info.reason) == (-1.0, None, False, "not text")


def test_leak_check_is_linear_in_punctuation_runs():
    # Was 9-11 s (quadratic backtracking over the `*` run); linear now takes ~0.02 s. The bound is
    # loose on purpose: this guards against the quadratic blow-up, not a speed target.
    start = time.perf_counter()
    got, info = grade("*" * 400_000 + r"\boxed{B}", Q4, "boxed", MEDRLVR)
    assert time.perf_counter() - start < 1.0
    assert (got, info.letter, info.answer_leak, info.reasoning_chars) == (1.0, "B", False, 400_000)


LENIENT = [  # (text, example, letter lenient_letter reads)
    ("A 39-year-old man presents with chest pain. A diagnosis is needed.", Q4, None),  # article
    (R + "The answer is (C).", Q4, "C"),
    (R + "...answer: B", Q4, "B"),
    (R + "so the answer is heparin", Q4, "B"),  # option text after a declaration
    (R + "The answer is: **Warfarin**, given long term.", Q4, "C"),
    ("The study supports it. Final answer: yes", YNM, "A"),
    ("The answer is No.", YNM, "B"),
    ("Findings point to the last one. I think J", Q10, None),  # no declaration, no default
    ("Looking at the choices, option D is correct.", Q4, "D"),
    ("Weighing them:\nC. Warfarin", Q4, "C"),
    ("A. Aspirin\nB. Heparin\nC. Warfarin\nD. Alteplase\nHard to say.", Q4, None),  # restated
    ("The answer is A or B.", Q4, None),
    ("The answer is option A or option B.", Q4, None),
    ("The answer is B. Hmm, the answer is A or B.", Q4, None),  # the final one is ambiguous
    ("Heparin acts within minutes; warfarin takes days.", Q4, None),  # no declaration
    ("The answer is heparin, not warfarin.", Q4, None),  # two option texts
    (r"First \boxed{A}, then \boxed{\textbf{C}}", Q4, "C"),  # last one wins
    ("The answer is B. Option A is wrong because it is an antiplatelet.", Q4, "B"),  # strong wins
    ("<answer>heparin</answer>", Q4, "B"),
    ("The answer is E.", Q4, None),  # not an option
    ("The answer is Bleeding.", Q4, None),  # a word, not the letter B
    (None, Q4, None),
]


@pytest.mark.parametrize("text,example,letter", LENIENT)
def test_lenient_letter(text, example, letter):
    assert lenient_letter(text, example.options) == letter


def test_reasoning_chars_and_info_type():
    _, info = grade("<think>  abc  </think><answer>B</answer>", Q4, TA, MEDRLVR)
    assert isinstance(info, RewardInfo) and info.reasoning_chars == 3
    _, info = grade(r"  xyz \boxed{B}", Q4, "boxed")
    assert info.reasoning_chars == 3
    _, info = grade("  garbage  ", Q4, "boxed")  # bad format: the whole stripped completion
    assert info.reasoning_chars == 7 and not info.answer_leak


def test_unknown_format_raises():
    with pytest.raises(ValueError, match="boxed"):
        grade(r"\boxed{B}", Q4, "xml")


FRAGMENTS = st.sampled_from(["\\boxed{", "}", "{", "<think>", "</think>", "<answer>", "</answer>",
                             "A", "B", "E", "(", ")", ".", " ", "\n", "answer is", "The answer is ",
                             "\\text{", "option ", " or ", ", ", "Heparin", "*", "$", "maybe"])
TEXTS = st.one_of(st.text(), st.lists(FRAGMENTS, max_size=30).map("".join))


@settings(max_examples=200, deadline=None)
@given(TEXTS)
def test_never_raises(text):
    for example in (Q4, YNM, Q10):
        for fmt in FORMATS:
            for values in (ALPHAMED, MEDRLVR):
                reward, info = grade(text, example, fmt, values)
                assert reward in {values.correct, values.wrong, values.bad_format}
                assert lenient_letter(text, example.options) in {None, *example.options}
                if not info.format_ok:
                    assert reward == values.bad_format and info.letter is None
                else:
                    assert info.letter in example.options
                    assert reward == (values.correct if info.correct else values.wrong)
