"""The normaliser (serve_app/markdown.py): prose keeps every word in order, whatever markdown wraps it;
markup, code blocks and emoji do not reach the model."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serve_app.text.markdown import strip_markdown

WORD = re.compile(r"[^\W_]+(?:['’.,-][^\W_]+)*")


def words(text: str) -> list[str]:
    return WORD.findall(text)


# Plain prose: words of letters and digits in any script, with the punctuation prose uses between them.
word = st.text(alphabet=st.characters(categories=("L", "Nd")), min_size=1, max_size=12)
punctuation = st.sampled_from(["", "", "", ",", ".", "!", "?", ";", ":", " -", "'s", "...", ")", '"'])
sentence = st.lists(st.tuples(word, punctuation).map("".join), min_size=1, max_size=20).map(" ".join)
prose = st.lists(sentence, min_size=1, max_size=6).map(lambda lines: "\n".join(lines))

# Markdown around words: the words inside must come out, the markup must not.
WRAPS = [
    "**{}**",
    "*{}*",
    "_{}_",
    "__{}__",
    "~~{}~~",
    "`{}`",
    "[{}](https://example.com/a_(b)?c=d)",
    "![{}](img.png)",
    "<b>{}</b>",
    "{}",
]
LINE_STARTS = ["", "# ", "### ", "> ", "- ", "* ", "+ ", "1. ", "- [ ] ", "- [x] ", "> > ", "• "]


@settings(max_examples=300, deadline=None)
@given(prose)
@pytest.mark.slow("property-based: many generated documents")
def test_plain_prose_keeps_every_word_in_order(text):
    assert words(strip_markdown(text)) == words(text)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(LINE_STARTS), st.lists(st.tuples(st.sampled_from(WRAPS), word), min_size=1, max_size=8)
        ),
        min_size=1,
        max_size=8,
    )
)
@pytest.mark.slow("property-based: many generated documents")
def test_markdown_keeps_the_words_it_wraps_and_drops_its_markup(lines):
    text = "\n".join(start + " ".join(wrap.format(w) for wrap, w in parts) for start, parts in lines)
    spoken = strip_markdown(text)
    # Ordered-list numbers are words too ("1. first" reads well aloud); every other marker goes.
    expected = [
        x
        for start, parts in lines
        for x in [n for n in words(start) if n.isdigit()] + [y for _, w in parts for y in words(w)]
    ]
    assert words(spoken) == expected
    assert not set(spoken) & set("*_~`#>[]|<"), spoken


@pytest.mark.parametrize(
    "markdown, spoken",
    [
        ("# Weather today\nIt is **sunny** and *warm*.", "Weather today\nIt is sunny and warm."),
        ("Run `ls -la` first.\n```bash\nrm -rf /\n```\nThen rest.", "Run ls -la first.\nThen rest."),
        ("See [the docs](https://x.io/a_(b)) and <https://y.io>.", "See the docs and https://y.io."),
        ("| Day | Temp |\n|---|:---:|\n| Mon | 20 |", "Day, Temp\n\nMon, 20"),
        ("- [x] done\n- [ ] todo\n1. first", "done\ntodo\n1. first"),
        ("> quoted _text_ here", "quoted text here"),
        ("Great job! 🎉👍🏽 See you 👩‍👩‍👧 soon ✨", "Great job! See you soon "),
        ("snake_case_name and 5 * 3 * 2 stay", "snake_case_name and 5 * 3 * 2 stay"),
        ("C# and F# are languages; 50% off, $5.", "C# and F# are languages; 50% off, $5."),
        ("Title\n=====\ntext\n\n---\n[1]: https://example.com", "Title\n\ntext\n\n\n"),
        ("Arrows → and ★ stars go; 1️⃣ stays a one.", "Arrows and stars go; 1 stays a one."),
    ],
)
def test_examples(markdown, spoken):
    assert strip_markdown(markdown) == spoken


# Inputs that made the regex version backtrack (quadratic or worse): openers with no closer, and long runs
# of what a pattern may take or give back. Each unit is repeated up to the length tried.
ADVERSARIAL = [
    "`",
    "*a ",
    "**a ",
    "_a ",
    "~~a ",
    "[",
    "[a]((b)",
    "![",
    "![a](",
    "[a][",
    "<http:",
    " ",
    "| ",
    "🎉",
    "a*b_c`d~e[f<g",
]


def _cpu_seconds(fn, text: str, repeats: int = 2) -> float:
    import time

    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        fn(text)
        best = min(best, time.process_time() - started)
    return best


@pytest.mark.parametrize("unit", ADVERSARIAL)
def test_hostile_markdown_takes_linear_time(unit):
    """At 100,000 characters (the most MAX_INPUT_LENGTH allows), ten times the input takes about ten times
    the CPU time, never the hundred times of a quadratic pattern (the regex version took 1.0 s for a word and
    4,096 backticks, 3.7 s for 20,000 "[", 6.4 s for 20,000 spaces before a "|"). A ratio of CPU times in one
    process, best of two, so a busy machine slows both sides alike; 35x leaves room for noise and still
    fails a quadratic pattern (100x) by far."""
    text = "x " + unit * (100_000 // len(unit))  # after a word: a line that starts with ``` is a code fence
    text = text[:-1] + "|" if unit == " " else text  # spaces before a pipe: the table-border pattern
    small, big = _cpu_seconds(strip_markdown, text[:10_000]), _cpu_seconds(strip_markdown, text[:100_000])
    assert big < 35 * small + 0.05, (unit, small, big)
