"""``grpo.engine.slots.Outputs``: runs of 1..w tokens per row appended with stops and the token limit inside a run."""
import torch

from grpo.engine.config import SamplingConfig
from grpo.engine.slots import Outputs
from grpo.sampling import StopStrings

PAD, EOS = 0, 1


class Letters:
    """Token t decodes to the t-th letter (1 -> 'a')."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(96 + t) for t in ids)


def outputs(rows: int, max_new: int, stop_strings=()) -> Outputs:
    cfg = SamplingConfig(max_new_tokens=max_new, max_batch=rows)
    return Outputs(rows, cfg, PAD, torch.tensor([EOS]), StopStrings(Letters(), list(stop_strings)))


def test_runs_stop_at_a_stop_id_or_the_limit_and_drop_the_rest():
    out = outputs(4, max_new=5)
    out.add(torch.tensor([0, 1, 2, 3]), torch.tensor([5, 5, 5, 5]), torch.tensor([-0.5] * 4))
    tokens = torch.tensor([[6, 7, 8], [6, EOS, 8], [6, 7, 8], [EOS, 7, 8]])
    logprobs = -torch.arange(1, 13, dtype=torch.float).view(4, 3) / 10
    done = out.add_runs(torch.tensor([0, 1, 2, 3]), tokens, logprobs, torch.tensor([3, 3, 1, 2]))
    assert done.tolist() == [False, True, False, True]
    assert out.count.tolist() == [4, 3, 2, 2]
    assert out.tokens.tolist() == [[5, 6, 7, 8, PAD], [5, 6, EOS, PAD, PAD], [5, 6, PAD, PAD, PAD], [5, EOS, PAD, PAD, PAD]]
    assert torch.allclose(out.logprobs[1], torch.tensor([-0.5, -0.4, -0.5, 0, 0]))
    assert out.reason == ["", "stop", "", "stop"]
    done = out.add_runs(torch.tensor([0, 2, 1]), torch.tensor([[9, 9, 9], [9, 9, 9], [9, 9, 9]]),
                        torch.zeros(3, 3), torch.tensor([3, 2, 3]))
    assert done.tolist() == [True, False, False]  # row 0 reaches the limit after one token; row 1 was finished
    assert out.tokens[0].tolist() == [5, 6, 7, 8, 9] and out.count.tolist() == [5, 3, 4, 2]
    assert out.reason[0] == "length" and out.tokens[1].tolist() == [5, 6, EOS, PAD, PAD]


def test_a_stop_string_inside_a_run_ends_the_row_there():
    out = outputs(2, max_new=8, stop_strings=["cd"])
    out.add(torch.tensor([0, 1]), torch.tensor([2, 3]), torch.zeros(2))  # "b", "c"
    done = out.add_runs(torch.tensor([0, 1]), torch.tensor([[3, 4, 5], [4, 5, 6]]), -torch.ones(2, 3),
                        torch.tensor([3, 3]))
    assert done.tolist() == [True, True]
    assert out.tokens[:, :4].tolist() == [[2, 3, 4, PAD], [3, 4, PAD, PAD]]  # "bcd", "cd": the rest dropped
    assert out.logprobs[:, :4].tolist() == [[0, -1, -1, 0], [0, -1, 0, 0]]
    assert out.count.tolist() == [3, 2] and out.reason == ["stop", "stop"]
