from pathlib import Path

import pytest

from data.generate import Sizes, write_all

SMALL = Sizes(math=300, math_test=120, math_rl=16, code=60, code_test=20, cot=200, general=80, general_test=30, pref=40,
              pref_test=20)


@pytest.fixture(scope="session")
def sizes() -> Sizes:
    return SMALL


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated")
    write_all(out, seed=0, sizes=SMALL)
    return out


@pytest.fixture(scope="session")
def tokenizer(data_dir, tmp_path_factory):
    """Trained through the CLI entry point, loaded the way every stage loads it."""
    from transformers import AutoTokenizer

    from data.tokenizer import main

    out = tmp_path_factory.mktemp("tokenizer")
    main(["--data", str(data_dir), "--out", str(out), "--vocab-size", "512"])
    return AutoTokenizer.from_pretrained(str(out))
