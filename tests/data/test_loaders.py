import json
import logging
from pathlib import Path

import pytest

from data.loaders import DataConfig, DataError, Rows, extract_answer, last_boxed, load_rows
from grpo.config import ConfigError, load_config

SHARED = Path("/work/shared/data")
GSM8K, MATH500 = SHARED / "gsm8k_test.jsonl", SHARED / "math500_test.jsonl"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


QA = [{"question": "What is 2 + 2?", "final": "4", "extra": 1}, {"question": "What is 3 + 5?", "final": "8", "extra": 2}]


def test_column_mapping_keeps_other_columns(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    rows = load_rows(DataConfig(path=str(path), columns={"prompt": "question", "answer": "final"}),
                     ["prompt", "answer"])
    assert isinstance(rows, Rows) and rows.n_skipped == 0 and rows.source == str(path)
    assert [(r["prompt"], r["answer"], r["extra"]) for r in rows] == [("What is 2 + 2?", "4", 1),
                                                                       ("What is 3 + 5?", "8", 2)]


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_other_file_formats(tmp_path, suffix):
    import datasets

    path = tmp_path / f"qa{suffix}"
    ds = datasets.Dataset.from_list(QA)
    {".parquet": ds.to_parquet, ".csv": ds.to_csv, ".json": ds.to_json}[suffix](str(path))
    rows = load_rows(DataConfig(path=str(path), columns={"prompt": "question", "answer": "final"}, limit=1),
                     ["prompt", "answer"])
    assert [(r["prompt"], str(r["answer"])) for r in rows] == [("What is 2 + 2?", "4")]


def test_directories(tmp_path):
    import datasets

    files = tmp_path / "files"
    files.mkdir()
    write_jsonl(files / "train.jsonl", QA)
    write_jsonl(files / "test.jsonl", QA[:1])
    cfg = DataConfig(path=str(files), split="test", columns={"prompt": "question"})
    assert [r["prompt"] for r in load_rows(cfg, ["prompt"])] == ["What is 2 + 2?"]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(QA)}).save_to_disk(str(saved))
    assert len(load_rows(DataConfig(path=str(saved), columns={"prompt": "question"}), ["prompt"])) == 2
    with pytest.raises(DataError, match="no split 'test'; splits: train"):
        load_rows(DataConfig(path=str(saved), split="test"), ["question"])


def test_answer_extraction():
    assert extract_answer("He has 3 + 4 = 7\n#### 1,234,567", "gsm8k") == "1234567"
    assert extract_answer("so #### -3", "gsm8k") == "-3"
    assert extract_answer("a \\boxed{1} then \\boxed{\\frac{1}{\\sqrt{2}}}.", "boxed") == "\\frac{1}{\\sqrt{2}}"
    assert last_boxed("\\boxed{\\{1, 2\\}}") == "\\{1, 2\\}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("no box") is None
    with pytest.raises(ValueError, match="no '#### <final answer>' line"):
        extract_answer("The answer is 7.", "gsm8k")


def test_generated_files_load(data_dir):
    required = {"math_test": ["prompt", "answer", "solution"], "code_train": ["prompt", "tests", "entry_point"],
                "cot_train": ["messages"], "general_test": ["prompt", "response"],
                "preferences_train": ["prompt", "chosen", "rejected"]}
    for name, fields in required.items():
        rows = load_rows(DataConfig(path=str(data_dir / f"{name}.jsonl")), fields)
        assert len(rows) == sum(1 for _ in (data_dir / f"{name}.jsonl").open()) and rows.n_skipped == 0


def test_malformed_rows_name_file_row_and_problem(tmp_path):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}, {"prompt": "c"},
            {"prompt": "", "answer": "4"}, {"prompt": ["e"], "answer": "5"}, {"prompt": "f", "answer": 6}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=rf"^{path}: row 3: field 'answer' is missing or null$"):
        load_rows(DataConfig(path=str(path)), ["prompt", "answer"])
    with pytest.raises(DataError, match=r"row 4: field 'q' \(column 'prompt'\) is empty"):
        load_rows(DataConfig(path=str(path), columns={"q": "prompt"}), ["q"])
    path2 = write_jsonl(tmp_path / "types.jsonl", [rows[0], rows[4]])
    with pytest.raises(DataError, match=r"types.jsonl: row 2: field 'prompt' must be a string, got list"):
        load_rows(DataConfig(path=str(path2)), ["prompt"])
    path3 = write_jsonl(tmp_path / "msgs.jsonl", [{"messages": [{"role": "user", "content": "hi"}]},
                                                  {"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match="row 2: field 'messages': message 0 must have string 'role' and 'content'"):
        load_rows(DataConfig(path=str(path3)), ["messages"])


def test_skip_invalid_counts_and_logs(tmp_path, caplog):
    rows = [{"prompt": "a", "answer": "1"}, {"prompt": "b"}, {"prompt": "  ", "answer": "3"}, {"prompt": "d", "answer": 4}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="data.loaders"):
        loaded = load_rows(DataConfig(path=str(path), skip_invalid=True), ["prompt", "answer"])
    assert [(r["prompt"], r["answer"]) for r in loaded] == [("a", "1"), ("d", "4")]
    assert loaded.n_skipped == 2
    assert f"{path}: skipped 2 malformed row(s) of 4" in caplog.text


def test_dataset_level_errors(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", QA)
    with pytest.raises(DataError, match=r"columns mapping names missing column\(s\) prompt -> q; available: question"):
        load_rows(DataConfig(path=str(path), columns={"prompt": "q"}), ["prompt"])
    with pytest.raises(DataError, match=r"no column for required field\(s\) prompt, answer; .*columns=\{'prompt'"):
        load_rows(DataConfig(path=str(path)), ["prompt", "answer"])
    broken = write_jsonl(tmp_path / "broken.jsonl", [QA[0], '{"question": "x", "final": ', QA[1]])
    with pytest.raises(DataError, match=r"broken.jsonl: row 2: invalid JSON"):
        load_rows(DataConfig(path=str(broken)), ["question"])
    (tmp_path / "qa.txt").write_text("hello")
    with pytest.raises(DataError, match=r"unsupported file type '.txt'; allowed: .jsonl, .json, .parquet, .csv"):
        load_rows(DataConfig(path=str(tmp_path / "qa.txt")), ["prompt"])
    with pytest.raises(DataError, match="no such file or directory"):
        load_rows(DataConfig(path=str(tmp_path / "absent.jsonl")), ["prompt"])


def test_config_validation(tmp_path):
    cfg = load_config(DataConfig, None, ["path=x.jsonl", "columns={prompt: question}", "answer_format=gsm8k"])
    assert cfg.columns == {"prompt": "question"} and cfg.answer_format == "gsm8k"
    with pytest.raises(ConfigError, match="answer_format: must be one of 'plain', 'gsm8k', 'boxed'"):
        load_config(DataConfig, None, ["path=x.jsonl", "answer_format=latex"])
    with pytest.raises(ConfigError, match="limit: must be >= 1"):
        DataConfig(path="x.jsonl", limit=0)
    with pytest.raises(ConfigError, match="path: must be a data file"):
        DataConfig(path="")


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K copy absent")
def test_real_gsm8k():
    rows = load_rows(DataConfig(path=str(GSM8K), columns={"prompt": "question"}, answer_format="gsm8k"),
                     ["prompt", "answer"])
    assert len(rows) == 1319 and rows.n_skipped == 0
    assert rows[0]["answer"] == "18" and rows[0]["solution"].endswith("#### 18")
    assert all(r["answer"].lstrip("-").isdigit() for r in rows)
    assert sum("," in r["solution"].rpartition("####")[2] for r in rows) == 14


@pytest.mark.skipif(not MATH500.exists(), reason="shared MATH-500 copy absent")
def test_real_math500_boxed_matches_answer_column():
    plain = load_rows(DataConfig(path=str(MATH500), columns={"prompt": "problem"}), ["prompt", "answer", "solution"])
    boxed = load_rows(DataConfig(path=str(MATH500), columns={"prompt": "problem", "answer": "solution"},
                                 answer_format="boxed", limit=100), ["prompt", "answer"])
    assert len(plain) == 500 and len(boxed) == 100
    assert [b["answer"].replace(" ", "") for b in boxed] == [p["answer"].replace(" ", "") for p in plain[:100]]


@pytest.mark.parametrize("content", ["", "  \n"])
def test_empty_assistant_turn_names_file_and_row(tmp_path, content):
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]}
    path = write_jsonl(tmp_path / "sft.jsonl", [ok, ok, bad])
    with pytest.raises(DataError, match=rf"^{path}: row 3: field 'messages': message 1 is an empty assistant turn"):
        load_rows(DataConfig(path=str(path)), ["messages"])
    loaded = load_rows(DataConfig(path=str(path), skip_invalid=True), ["messages"])
    assert len(loaded) == 2 and loaded.n_skipped == 1


def test_non_utf8_line_names_file_and_line(tmp_path, caplog):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"prompt": "a", "answer": "1"}\n\n{"prompt": "caf\xe9", "answer": "2"}\n{"prompt": "c", "answer": "3"}\n')
    with pytest.raises(DataError, match=rf"^{path}: line 3: not valid UTF-8 \(byte 0xe9 at byte column 16\)"):
        load_rows(DataConfig(path=str(path)), ["prompt", "answer"])
    with caplog.at_level(logging.WARNING, logger="data.loaders"):
        rows = load_rows(DataConfig(path=str(path), skip_invalid=True), ["prompt", "answer"])
    assert [r["prompt"] for r in rows] == ["a", "c"] and rows.n_skipped == 1
    assert "line(s) 3" in caplog.text
    csv = tmp_path / "latin1.csv"
    csv.write_bytes(b"prompt\ncaf\xe9\n")
    with pytest.raises(DataError, match=rf"^{csv}: line 2: not valid UTF-8.*only in .jsonl files$"):
        load_rows(DataConfig(path=str(csv), skip_invalid=True), ["prompt"])


@pytest.mark.parametrize("text", ["", "\n  \n"])
def test_empty_jsonl_says_so(tmp_path, text):
    path = tmp_path / "empty.jsonl"
    path.write_text(text)
    for skip in (False, True):
        with pytest.raises(DataError, match=rf"^{path}: empty data file \(no rows\); expected one JSON object per line$"):
            load_rows(DataConfig(path=str(path), skip_invalid=skip), ["prompt"])
