"""reward.py: a table of crafted completions, answer-leak cases, and a never-raises property test."""
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reward import ALPHAMED, FORMATS, MEDRLVR, RewardInfo, score

Q4 = SimpleNamespace(options={"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Alteplase"},
                     answer="B")
Q5 = SimpleNamespace(options={k: f"drug {k.lower()}" for k in "ABCDE"}, answer="E")
Q10 = SimpleNamespace(options={k: f"finding {i}" for i, k in enumerate("ABCDEFGHIJ")}, answer="J")
YNM = SimpleNamespace(options={"A": "yes", "B": "no", "C": "maybe"}, answer="C")
VIT = SimpleNamespace(options={"A": "Vitamin A", "B": "Vitamin B12", "C": "A. baumannii",
                               "D": "Vitamin D"}, answer="C")

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
    (R + r"\boxed{B) Aspirin}", Q4, "boxed", ALPHAMED, 1.0, "B", True),  # text contradicts: letter wins
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
    got, info = score(completion, example, fmt, values)
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
])
def test_answer_leak(completion, fmt, leak):
    _, info = score(completion, Q4, fmt, MEDRLVR)
    assert info.format_ok
    assert info.answer_leak is leak


def test_reasoning_chars_and_info_type():
    _, info = score("<think>  abc  </think><answer>B</answer>", Q4, TA, MEDRLVR)
    assert isinstance(info, RewardInfo) and info.reasoning_chars == 3
    _, info = score(r"  xyz \boxed{B}", Q4, "boxed")
    assert info.reasoning_chars == 3
    _, info = score("  garbage  ", Q4, "boxed")  # bad format: the whole stripped completion
    assert info.reasoning_chars == 7 and not info.answer_leak


def test_unknown_format_raises():
    with pytest.raises(ValueError, match="boxed"):
        score(r"\boxed{B}", Q4, "xml")


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
                reward, info = score(text, example, fmt, values)
                assert reward in {values.correct, values.wrong, values.bad_format}
                if not info.format_ok:
                    assert reward == values.bad_format and info.letter is None
                else:
                    assert info.letter in example.options
                    assert reward == (values.correct if info.correct else values.wrong)
