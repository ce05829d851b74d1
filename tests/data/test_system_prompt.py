"""``data.chat.resolve_system_prompt``: none, r1, file:<path>, or the text itself; one-line errors."""
import pytest

from data.chat import R1_TEMPLATE, resolve_system_prompt
from grpo.config import ConfigError
from stages.rejection_sampling import chat_row


def test_names_text_and_files(tmp_path, monkeypatch):
    assert resolve_system_prompt("none") is None
    assert resolve_system_prompt("r1") == R1_TEMPLATE
    assert resolve_system_prompt("You are a careful mathematician.") == "You are a careful mathematician."
    # a string that is not file:<path> is the text itself, even if a file of that name exists
    (tmp_path / "prompt.txt").write_text("Think first.\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert resolve_system_prompt("prompt.txt") == "prompt.txt"
    assert resolve_system_prompt("file:prompt.txt") == "Think first."  # relative to the working directory
    (tmp_path / "multi.txt").write_text("  Línea uno.\nLine two.\n\n", encoding="utf-8")
    assert resolve_system_prompt(f"file:{tmp_path / 'multi.txt'}") == "Línea uno.\nLine two."


@pytest.mark.parametrize("content, expected", [
    (None, "no such system prompt file"), (b"", "is empty"), (b" \n\t\n", "is empty"),
    (b"caf\xe9\n", "not UTF-8 text (byte 4 is 0xe9)"),
])
def test_bad_files_are_one_line_config_errors(tmp_path, content, expected):
    path = tmp_path / "p.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        resolve_system_prompt(f"file:{path}", key="eval.system_prompt")
    assert e.value.key == "eval.system_prompt" and expected in str(e.value) and str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_a_directory_and_an_empty_string_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot be read"):
        resolve_system_prompt(f"file:{tmp_path}")
    with pytest.raises(ConfigError, match="empty string"):
        resolve_system_prompt("  ")


def test_rejection_sampling_rows_carry_the_system_turn():
    assert chat_row("Q", "A", "math")["messages"][0] == {"role": "user", "content": "Q"}
    row = chat_row("Q", "A", "math", "Be brief.")
    assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
    assert row["messages"][0]["content"] == "Be brief."
