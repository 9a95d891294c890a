r"""Rule-based verifiable rewards for multiple-choice QA (pure Python, standard library only).

score(completion, example, fmt, values) -> (reward, RewardInfo): values.correct if the parsed
letter is example.answer, .wrong if it is another option, else .bad_format. The answer region:
- boxed (AlphaMed): content of the LAST `\boxed{`, braces balanced; text after it is ignored.
  No box, an unclosed last box, or an empty box -> bad format.
- think_answer (Med-RLVR): `<think>R</think> <answer>X</answer>`, each (case-sensitive) tag exactly
  once; only whitespace before <think>, between </think> and <answer>, and after </answer>.
  (If the prompt pre-fills "<think>", prepend it to the completion before scoring.)
- answer_is: after the last "answer is" (any case: "The correct answer is" too) and an optional
  ':', the first non-empty line.
Parsing the region (strict; surrounding whitespace, `*` and `$` stripped first), in this order:
1. one uppercase letter: `B`, `(B)`, `B.`, `B)`, `B:`, `(B).`, `\text{B}`, `\textbf{B}`;
2. the exact text of one option (case-insensitive, whitespace-normalised, trailing '.' ignored);
3. several letters ("A, B", "A and B", "A or B", "A/B") -> bad format;
4. a letter, a separator, then text: `B) text`, `B. text`, `B: text`, `(B) text`: the letter
   counts; the text is not checked against option B's text.
Anything else (lowercase "b", "B because ..."), or a letter not among the options, is bad format.

reasoning (stripped length: reasoning_chars) = text before the answer region (inside <think>, before
the last \boxed or "answer is"; all of it when the format is bad). answer_leak: the final letter is
declared in the first max(100, 20%) chars of the reasoning as "answer is/: (option) B", "\boxed{B}",
"(B)", "option B", "choice B", or "B."/"B)" at a line start or after punctuation (not "vitamin A.",
nor the article "A"). Walking through options ("(A) ... (B) ...") also counts: an upper bound.
"""
import re
from dataclasses import dataclass

FORMATS = ("boxed", "think_answer", "answer_is")


@dataclass(frozen=True)
class RewardValues:
    correct: float
    wrong: float
    bad_format: float

    @classmethod
    def parse(cls, text: str) -> "RewardValues":
        """'1,0,-1' -> RewardValues(1.0, 0.0, -1.0); ValueError unless three numbers."""
        parts = text.split(",")
        if len(parts) != 3:
            raise ValueError("need three numbers correct,wrong,bad-format")
        try:
            return cls(*map(float, parts))
        except ValueError:
            raise ValueError("need three numbers correct,wrong,bad-format") from None


ALPHAMED = RewardValues(1.0, 0.0, 0.0)
MEDRLVR = RewardValues(1.0, 0.0, -1.0)


@dataclass
class RewardInfo:
    letter: str | None = None
    format_ok: bool = False
    correct: bool = False
    reason: str = ""  # why the format is not ok; "" when it is
    answer_leak: bool = False
    reasoning_chars: int = 0


_BOX = "\\boxed{"
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_THINK_ANSWER = re.compile(r"\s*<think>(.*)</think>\s*<answer>(.*)</answer>\s*", re.S)
_ANSWER_IS = re.compile(r"\banswer\s+is\b\s*:?", re.I)
_LETTER = re.compile(r"\\text(?:bf)?\{\s*([A-Z])\s*\}|\(([A-Z])\)[.:]?|([A-Z])[.:)]?")
_SEVERAL = re.compile(r"\(?[A-Z]\)?[.):]?\s*(?:,|/|&|\b(?i:or|and)\b)\s*\(?[A-Z]\b")
_LETTER_TEXT = re.compile(r"(?:\(([A-Z])\)[.:]?|([A-Z])[.:)])\s+\S")


def _boxed(text):
    start = text.rfind(_BOX)
    if start < 0:
        return None, None, "no box"
    depth, begin = 1, start + len(_BOX)
    for i in range(begin, len(text)):
        depth += (text[i] == "{") - (text[i] == "}")
        if depth == 0:
            return text[:start], text[begin:i], ""
    return None, None, "unclosed box"


def _think_answer(text):
    counts = [text.count(tag) for tag in _TAGS]
    if counts != [1, 1, 1, 1]:
        return None, None, "missing tags" if 0 in counts else "repeated tags"
    m = _THINK_ANSWER.fullmatch(text)
    if m is None:
        return None, None, "text outside tags"
    return m.group(1), m.group(2), ""


def _answer_is(text):
    hits = list(_ANSWER_IS.finditer(text))
    if not hits:
        return None, None, "no 'answer is'"
    rest = text[hits[-1].end():].lstrip()
    return text[:hits[-1].start()], rest.split("\n", 1)[0], ""


# Each extractor: completion -> (reasoning, answer region, reason), reason "" when found.
_EXTRACT = {"boxed": _boxed, "think_answer": _think_answer, "answer_is": _answer_is}


def _norm(s):
    return " ".join(s.split()).rstrip(".").casefold()


def parse_choice(region, options):
    """(letter, "") for one valid option, else (None, reason). Rules in the module docstring."""
    s = region.strip().strip("*$").strip()
    if not s:
        return None, "empty answer"
    m = _LETTER.fullmatch(s)
    if m is None:
        hits = [key for key, text in options.items() if _norm(str(text)) == _norm(s)]
        if len(hits) == 1:
            return hits[0], ""
        if _SEVERAL.match(s):
            return None, "several answers"
        m = _LETTER_TEXT.match(s)
        if m is None:
            return None, "unparseable answer"
    letter = next(g for g in m.groups() if g)
    if letter not in options:
        return None, "not an option"
    return letter, ""


def answer_leaks(reasoning, letter):
    """True when `letter` is declared in the first max(100 chars, 20%) of the reasoning."""
    head = reasoning[: max(100, len(reasoning) // 5)]
    L = re.escape(letter)
    declared = (
        rf"(?i:answer\s*(?:is|:|=)\s*(?:option\s+|choice\s+)?)\(?{L}(?!\w)"
        rf"|\\boxed\{{\s*(?:\\text(?:bf)?\{{\s*)?\(?{L}(?!\w)"
        rf"|\({L}\)"
        rf"|(?i:\b(?:option|choice)\s+)\(?{L}(?!\w)"
        rf"|(?:^|[^\w\s,(])[ \t*]*{L}[.)](?!\w)"
    )
    return re.search(declared, head, re.M) is not None


def score(completion, example, fmt="boxed", values=ALPHAMED):
    """Reward and diagnostics for one completion; see the module docstring for the rules."""
    if fmt not in _EXTRACT:
        raise ValueError(f"unknown reward format {fmt!r}; known formats: {', '.join(FORMATS)}")
    reasoning, region, reason = _EXTRACT[fmt](completion)
    letter = None
    if not reason:
        letter, reason = parse_choice(region, example.options)
    if letter is None:
        info = RewardInfo(reason=reason, reasoning_chars=len(completion.strip()))
        return values.bad_format, info
    reasoning = reasoning.strip()
    correct = letter == example.answer
    info = RewardInfo(letter=letter, format_ok=True, correct=correct,
                      answer_leak=answer_leaks(reasoning, letter), reasoning_chars=len(reasoning))
    return (values.correct if correct else values.wrong), info
