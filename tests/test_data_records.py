"""Bad records in JSON-lines data: a record without a 'text' string is skipped with a
warning naming the file and line, counted at the end of the pass; nothing usable is an
error."""

from __future__ import annotations

import gzip
import json
import warnings

import pytest
from train_fixtures import base_args, make_docs, make_fixture, read_metrics

from osd import train
from osd.data import DataError, Documents, open_source


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("records_fixture"))


def with_bad_records(tmp_path, name="bad.jsonl.gz", n=24):
    """The fixture's documents with line 3 lacking 'text' and line 6 holding "text": null."""
    good = make_docs(tmp_path / "good.jsonl", n, seed=3).read_text().splitlines()
    good[2] = json.dumps({"timestamp": "2019-04-25 12:00:00", "url": "u-missing"})
    good[5] = json.dumps({"text": None, "timestamp": "2019-04-25 12:00:00", "url": "u-null"})
    path = tmp_path / name
    with (gzip.open if path.suffix == ".gz" else open)(path, "wt") as f:
        f.write("\n".join(good) + "\n")
    return path


def test_training_runs_through_bad_records_with_one_counted_warning(fx, tmp_path):
    data = with_bad_records(tmp_path)
    run = tmp_path / "run"
    # 24 lines, 22 usable: 3 steps of 8 documents go past the end of the file (an epoch)
    argv = base_args(fx, run, dataset=data, optimizer="adamw", batch_size=8, num_training_steps=3, eval_every=100)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert train.main(argv) == 0
    messages = sorted({str(w.message) for w in caught if "'text'" in str(w.message)})
    assert messages == [
        f"dataset {data}: line 3 has no 'text' string (null or missing); skipping it and any others like it "
        "(counted at the end of the pass)",
        f"dataset {data}: skipped 2 of 24 records without a 'text' string",
    ]
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3]


def test_documents_skip_and_count(tmp_path):
    data = with_bad_records(tmp_path, "bad.jsonl", n=10)
    with pytest.warns(UserWarning) as record:
        texts = list(Documents(open_source(str(data)), epochs=1))
    assert len(texts) == 8 and all(isinstance(t, str) for t in texts)
    assert [str(w.message).split(": ", 1)[1] for w in record] == [
        "line 3 has no 'text' string (null or missing); skipping it and any others like it (counted at the end of the pass)",
        "skipped 2 of 10 records without a 'text' string",
    ]


def test_blank_lines_do_not_shift_the_line_named(tmp_path):
    data = tmp_path / "blank.jsonl"
    data.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": null}\n')
    with pytest.warns(UserWarning) as record:
        assert sorted(Documents(open_source(str(data)), epochs=1)) == ["a", "b"]
    assert "line 4 has no 'text' string" in str(record[0].message)
    assert "skipped 1 of 3 records" in str(record[1].message)


class ListSource(list):
    """A stand-in for a streamed dataset (no datasets): records in a list."""

    num_shards = 1

    def state_dict(self):
        return {}


def test_no_usable_record_is_an_error(fx, tmp_path, capsys):
    data = tmp_path / "nulls.jsonl"
    data.write_text("".join(json.dumps({"text": None, "url": f"u{i}"}) + "\n" for i in range(5)))
    assert train.main(base_args(fx, tmp_path / "run", dataset=data)) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"osd-train: error: dataset file {data}: records need a 'text' field (a string); none of its first 5 has one"
    )
    # bad records past the first lines, and nothing else: counted, then refused
    docs = Documents(lambda epoch: ListSource([{"text": None}, {"text": 7}, {"text": None}]), epochs=1)
    with pytest.warns(UserWarning, match="record 1 of the stream has no 'text' string \\(null or missing\\)"):
        with pytest.raises(DataError, match=r"^dataset: no usable records: all 3 lack a 'text' string$"):
            list(docs)
