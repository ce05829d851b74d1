"""Per-dataset weights: ``DataConfig.weight`` and ``mix_by_weight``, on small hand-computed inputs."""
import json
import random

import pytest

from data.loaders import DataConfig, load_mixed, mix_by_weight
from grpo.config import ConfigError, build

A = [f"a{i}" for i in range(4)]
B = [f"b{i}" for i in range(3)]


def test_weight_one_is_every_row_once_in_order():
    assert mix_by_weight([A, B], [1.0, 1.0], seed=0) == A + B


def test_whole_weights_repeat_every_row():
    assert mix_by_weight([A, B], [2.0, 1.0], seed=0) == A + A + B
    assert mix_by_weight([B], [3.0], seed=5) == B * 3


def test_fractions_draw_a_seeded_subset_in_file_order():
    # 0.5 of 4 rows = 2 rows, drawn by random.Random("0/0") without replacement, kept in file order
    drawn = sorted(random.Random("0/0").sample(range(4), 2))
    assert mix_by_weight([A], [0.5], seed=0) == [A[j] for j in drawn] == ["a1", "a2"]  # pinned: the mix is stable
    # 1.5 of 4 rows = 6: every row once, then 2 drawn ones; the second dataset draws with "0/1"
    drawn_b = sorted(random.Random("0/1").sample(range(3), 2))  # round(0.5 * 3) = round(1.5) = 2 (half to even)
    assert mix_by_weight([A, B], [1.5, 0.5], seed=0) == A + [A[j] for j in drawn] + [B[j] for j in drawn_b] \
        == ["a0", "a1", "a2", "a3", "a1", "a2", "b1", "b2"]
    assert round(2.5) == 2 and len(mix_by_weight([["x"] * 5], [0.5], seed=0)) == 2  # round(2.5) = 2


def test_mix_is_deterministic_per_seed_and_independent_of_other_weights():
    rows = [f"r{i}" for i in range(100)]
    assert mix_by_weight([rows], [0.3], seed=1) == mix_by_weight([rows], [0.3], seed=1)
    assert mix_by_weight([rows], [0.3], seed=1) != mix_by_weight([rows], [0.3], seed=2)
    assert len(mix_by_weight([rows], [0.3], seed=1)) == 30
    # the second dataset's draw depends on the seed and its position, not on the first one's weight
    tail = lambda w: mix_by_weight([A, rows], [w, 0.3], seed=1)[-30:]  # noqa: E731
    assert tail(0.5) == tail(2.0)


def test_a_tiny_weight_keeps_one_row():
    assert len(mix_by_weight([A], [0.01], seed=0)) == 1


@pytest.mark.parametrize("weight", [0, -1.0])
def test_weight_must_be_positive_and_the_error_names_the_dataset(weight):
    with pytest.raises(ConfigError) as e:
        build(DataConfig, {"path": "math.jsonl", "weight": weight}, prefix="data[1]")
    assert e.value.key == "data[1].weight"
    assert "math.jsonl" in str(e.value) and "> 0" in str(e.value) and "\n" not in str(e.value)


def test_load_mixed_weights_each_file(tmp_path):
    paths = []
    for name, n in (("x", 4), ("y", 2)):
        paths.append(tmp_path / f"{name}.jsonl")
        paths[-1].write_text("".join(json.dumps({"prompt": f"{name}{i}"}) + "\n" for i in range(n)))
    cfgs = [DataConfig(path=str(paths[0]), weight=0.5), DataConfig(path=str(paths[1]), weight=2.0)]
    rows = [r["prompt"] for r in load_mixed(cfgs, ["prompt"], seed=3)]
    drawn = sorted(random.Random("3/0").sample(range(4), 2))
    assert rows == [f"x{j}" for j in drawn] + ["y0", "y1", "y0", "y1"]
