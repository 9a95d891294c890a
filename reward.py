r"""Rule-based verifiable rewards for multiple-choice QA (pure Python, standard library only).

grade(completion, example, fmt, values) -> (reward, RewardInfo): values.correct if the parsed
letter is example.answer, .wrong if it is another option, else .bad_format (with a reason; a
completion that is not a str scores bad format, reason "not text"). The answer region:
- boxed (AlphaMed): content of the LAST `\boxed{`, braces balanced; text after it is ignored.
  No box, an unclosed last box, or an empty box -> bad format.
- think_answer (Med-RLVR): `<think>R</think> <answer>X</answer>`, each (case-sensitive) tag exactly
  once; only whitespace before <think>, between </think> and <answer>, and after </answer>.
  (If the prompt pre-fills "<think>", prepend it to the completion before scoring.)
- answer_is: after the last "answer is" (any case: "The correct answer is" too) and an optional
  ':', the first non-empty line. Later text may explain but not name another option's letter
  ("or C", "maybe C", "could be C", "option C", "(C)", "C."/"C)"/"C:"/"C" opening a line; not
  "A"/"I" before a lowercase word, the article and pronoun): that is "hedge after the answer".
Parsing the region (strict; surrounding whitespace, `*` and `$` stripped first), in this order:
1. one uppercase letter: `B`, `(B)`, `B.`, `B)`, `B:`, `(B).`, `\text{B}`, `\textbf{B}`;
2. the exact text of one option, normalised (case-folded, whitespace collapsed, surrounding
   `*_"'` and backquotes and a trailing '.' ignored);
3. several letters ("A, B", "A and B", "A or B", "A/B") -> "several answers";
4. a letter, a separator, then text (`B) text`, `B. text`, `B: text`, `(B) text`, `(B). text`):
   B only when the text, normalised as in 2, is option B's text ("B. **Heparin.**" is fine);
   text that is another letter after optional lowercase words ("B. C", "(B) (C)",
   "B. or maybe C") -> "several answers"; any other text -> "text disagrees with option B".
Anything else (lowercase "b", "B because ...") is "unparseable answer"; a letter that is not among
the options is "not an option".

reasoning (stripped length: reasoning_chars) = text before the answer region (inside <think>, before
the last \boxed or "answer is"; all of it when the format is bad). answer_leak: the final letter is
declared in the first max(100, 20%) chars of the reasoning as "answer is/: (option) B", "\boxed{B}",
"(B)", "option B", "choice B", or "B."/"B)" at a line start or after punctuation (not "vitamin A.",
nor the article "A"). Walking through options ("(A) ... (B) ...") also counts: an upper bound.
All patterns run in time linear in the completion's length.
lenient_letter(): a looser reading for evaluation reports, never a reward; rules in its docstring.
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
_LETTER_TEXT = re.compile(r"(?:\(([A-Z])\)[.:]?|([A-Z])[.:)])\s+(?P<text>.+)", re.S)
_OTHER_LETTER = re.compile(r"(?:[a-z]+[\s,]+)*\(?[A-Z]\)?[.:)?]?")  # "C", "(C)", "or maybe C"
_MARKS = " *_\"'`"  # markdown and quotes around an option's text
# A letter named as an alternative after an answer_is answer (module docstring); A or I before
# a lowercase word is the article or the pronoun ("or A patient", "maybe I should").
_ALTERNATIVE = re.compile(
    r"(?i:\b(?:or|maybe|perhaps|possibly|probably|alternatively|could\s+be|might\s+be|option"
    r"|choice|answer)\b)[\s:*]*\(?(?:([B-HJ-Z])|([AI])(?!\s+[a-z]))(?![\w'])"
    r"|\(([A-Z])\)"
    r"|^[ \t*#>-]*\(?([A-Z])(?:[.:)]|[ \t*]*$)", re.M)


def _boxed(text):
    start = text.rfind(_BOX)
    if start < 0:
        return None, None, "", "no box"
    depth, begin = 1, start + len(_BOX)
    for i in range(begin, len(text)):
        depth += (text[i] == "{") - (text[i] == "}")
        if depth == 0:
            return text[:start], text[begin:i], "", ""
    return None, None, "", "unclosed box"


def _think_answer(text):
    counts = [text.count(tag) for tag in _TAGS]
    if counts != [1, 1, 1, 1]:
        return None, None, "", "missing tags" if 0 in counts else "repeated tags"
    m = _THINK_ANSWER.fullmatch(text)
    if m is None:
        return None, None, "", "text outside tags"
    return m.group(1), m.group(2), "", ""


def _answer_is(text):
    hits = list(_ANSWER_IS.finditer(text))
    if not hits:
        return None, None, "", "no 'answer is'"
    first, _, after = text[hits[-1].end():].lstrip().partition("\n")
    return text[:hits[-1].start()], first, after, ""


# Each extractor: completion -> (reasoning, answer region, text after the region that must not
# name another letter, reason), reason "" when found.
_EXTRACT = {"boxed": _boxed, "think_answer": _think_answer, "answer_is": _answer_is}


def _norm(s):
    # "**Heparin**." and "Heparin" are the same answer; strip twice for marks outside the period
    return " ".join(s.split()).casefold().strip(_MARKS).rstrip(".").strip(_MARKS)


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
        m = _LETTER_TEXT.fullmatch(s)
        if m is None:
            return None, "unparseable answer"
    letter = next(g for g in m.groups() if g)  # the letter groups come before "text"
    if letter not in options:
        return None, "not an option"
    text = m.groupdict().get("text")
    if text is None or _norm(text) == _norm(str(options[letter])):
        return letter, ""
    # "B. C", "B. or maybe C": a second answer, not a description of option B
    if _OTHER_LETTER.fullmatch(text.strip(_MARKS + "\n\t")):
        return None, "several answers"
    return None, f"text disagrees with option {letter}"


def _hedged(after, letter, options):
    """True when `after` (text after the answer) names an option letter other than `letter`."""
    named = {next(g for g in m.groups() if g) for m in _ALTERNATIVE.finditer(after)}
    return bool(named & set(options) - {letter})


def answer_leaks(reasoning, letter):
    """True when `letter` is declared in the first max(100 chars, 20%) of the reasoning."""
    head = reasoning[: max(100, len(reasoning) // 5)]
    L = re.escape(letter)
    declared = (
        rf"(?i:answer\s*(?:is|:|=)\s*(?:option\s+|choice\s+)?)\(?{L}(?!\w)"
        rf"|\\boxed\{{\s*(?:\\text(?:bf)?\{{\s*)?\(?{L}(?!\w)"
        rf"|\({L}\)"
        rf"|(?i:\b(?:option|choice)\s+)\(?{L}(?!\w)"
        # `*` is itself an anchor, so blanks suffice between anchor and letter; `[ \t*]*` here
        # rescanned every run of `*` from each of its characters (quadratic)
        rf"|(?:^|[^\w\s,(])[ \t]*{L}[.)](?!\w)"
    )
    return re.search(declared, head, re.M) is not None


def grade(completion, example, fmt="boxed", values=ALPHAMED):
    """Reward and diagnostics for one completion; see the module docstring for the rules."""
    if fmt not in _EXTRACT:
        raise ValueError(f"unknown reward format {fmt!r}; known formats: {', '.join(FORMATS)}")
    if not isinstance(completion, str):
        return values.bad_format, RewardInfo(reason="not text")
    reasoning, region, after, reason = _EXTRACT[fmt](completion)
    letter = None
    if not reason:
        letter, reason = parse_choice(region, example.options)
    if letter is not None and _hedged(after, letter, example.options):
        letter, reason = None, "hedge after the answer"
    if letter is None:
        info = RewardInfo(reason=reason, reasoning_chars=len(completion.strip()))
        return values.bad_format, info
    reasoning = reasoning.strip()
    correct = letter == example.answer
    info = RewardInfo(letter=letter, format_ok=True, correct=correct,
                      answer_leak=answer_leaks(reasoning, letter), reasoning_chars=len(reasoning))
    return (values.correct if correct else values.wrong), info


# lenient_letter. A claim is the letter(s) right after a declaration: "A or B" names two.
_DECLARE = re.compile(r"(?P<strong>(?i:\banswer\s*(?:is\b|:|=)|\\boxed\{|<answer>))"
                      r"|(?i:\b(?:option|choice)\b)")
_ONE = r"(?:(?i:option|choice)\s+)?\(?[A-Z]\)?(?![\w-])"
_CLAIM = re.compile(rf"[\s:=*$]*(?:\\text(?:bf)?\{{\s*)?{_ONE}"
                    rf"(?:\s*(?:,|/|&|(?i:\bor\b|\band\b))\s*{_ONE})*")
_CAPITAL = re.compile(r"(?<!\w)[A-Z](?!\w)")
_OPTION_LINE = re.compile(r"^[ \t*#>-]*(?:\(([A-Z])\)|([A-Z])[.)])[ \t*]*(.*)", re.M)


def _option_lines(text, options):
    """Rule (b) of lenient_letter: [(False, position, {X})] for lines "X. <option X's text>"."""
    found = []
    for m in _OPTION_LINE.finditer(text):
        letter = m.group(1) or m.group(2)
        want = _norm(str(options[letter])) if letter in options else ""
        if want and re.match(rf"{re.escape(want)}(?!\w)", _norm(m.group(3))):
            found.append((False, m.start(), {letter}))
    # restating the options ("A. Aspirin\nB. Heparin ...") is a list, not an answer
    return found if len({next(iter(f[2])) for f in found}) == 1 else []


def lenient_letter(text: str, options: dict) -> str | None:
    r"""A looser reading, for evaluation reports, of a completion the strict parser rejected.

    (a) "answer is X", "answer: X", "answer = X", "\boxed{X", "<answer>X" declare X strongly;
        "option X", "choice X" weakly. X: an uppercase option letter not followed by a word
        character or '-'; letters joined by ',', '/', '&', "or", "and" are one declaration
        ("A or B", "option A or option B").
    (b) A line "X. <text>" ("X)", "(X)" too) whose text starts with option X's text (normalised)
        declares X weakly, unless such lines name two or more letters: that restates the options.
    (c) A strong declaration without a letter names each option whose text is a whole phrase in
        the rest of its line ("the answer is heparin"; "Final answer: yes" for yes/no/maybe).
    (d) Nothing else: never a bare capital ("A 39-year-old man", "I think J"), never a default.
    The last strong declaration wins, else the last weak one; None when there is none or when
    it names more than one option.
    """
    if not isinstance(text, str):
        return None
    phrases = [(key, re.compile(rf"(?<!\w){re.escape(want)}(?!\w)"))
               for key, value in options.items() if (want := _norm(str(value)))]
    found = []  # (strong, position, letters named)
    covered = 0  # end of the last claim: "option B" inside "option A or option B" is not another
    for m in _DECLARE.finditer(text):
        if m.start() < covered:
            continue
        strong, claim = m.group("strong") is not None, _CLAIM.match(text, m.end())
        if claim:
            covered = claim.end()
            letters = set(_CAPITAL.findall(claim.group())) & set(options)
        else:  # rule (c), for strong declarations only
            line = " ".join(text[m.end():m.end() + 200].split("\n", 1)[0].split()).casefold()
            letters = {key for key, phrase in phrases if strong and phrase.search(line)}
        if letters:
            found.append((strong, m.start(), letters))
    found += _option_lines(text, options)
    if not found:
        return None
    letters = max(found, key=lambda f: f[:2])[2]
    return next(iter(letters)) if len(letters) == 1 else None
