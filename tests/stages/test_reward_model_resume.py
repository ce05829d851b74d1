"""The reward-model stage resumes like SFT: after a crash or SIGTERM the same command continues from the latest
checkpoint, and a resume with a changed learning rate is refused."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import stages.reward_model as rm
from data.generate import Sizes, write_all
from data.tokenizer import train_tokenizer
from grpo.checkpoint import export_model
from grpo.config import run
from grpo.model import ModelConfig, load_policy
from tests.stages.stop_signal import sigterm_after_first_step
from tests.stages.test_reward_model import TOY_MODEL, synthetic_pairs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A toy V3 policy with its tokenizer, and 24 preference pairs."""
    root = tmp_path_factory.mktemp("rm_resume")
    paths = write_all(root / "data", seed=0, sizes=Sizes(math=10, math_test=2, math_rl=2, code=2, code_test=1, cot=10,
                                                           general=10, general_test=2, pref=10, pref_test=2))
    tok = train_tokenizer([p for k, p in paths.items() if k.endswith("_train")], root / "tok", 400)
    torch.manual_seed(0)
    export_model(root / "policy", load_policy(ModelConfig(overrides=TOY_MODEL, mtp_layers=0), tok), tok)
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in synthetic_pairs(24, 0)))
    return root


def args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return ["--recipe", str(ROOT / "recipes/tiny/reward_model.yaml"), f"model.init={workdir / 'policy'}",
            f"data=[{{path: {workdir / 'pairs.jsonl'}}}]", "test=null", f"output_dir={out}", "wandb_mode=disabled",
            "train.max_steps=4", "train.batch_size=5", "train.max_length=64", "train.warmup_steps=1",
            "train.log_every=1", *extra]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_after_crash_matches_uninterrupted_run(workdir, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    rm.main(args(workdir, tmp_path / "a", "train.save_every=2"))

    calls = {"n": 0}
    real_loss = rm.bradley_terry_loss

    def crash_on_third_step(chosen, rejected):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real_loss(chosen, rejected)

    monkeypatch.setattr(rm, "bradley_terry_loss", crash_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        rm.main(args(workdir, tmp_path / "b", "train.save_every=2"))
    assert not (tmp_path / "b/DONE").exists()
    assert (tmp_path / "b/checkpoints/latest").read_text() == "step-00000002"
    monkeypatch.setattr(rm, "bradley_terry_loss", real_loss)
    torch.manual_seed(1234)  # whatever the RNG state, the checkpoint restores it
    summary = rm.main(args(workdir, tmp_path / "b", "train.save_every=2"))  # the same command resumes

    assert summary["steps"] == 4 and (tmp_path / "b/DONE").is_file()
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in b] == [(r["loss"], r["grad_norm"], r["lr"]) for r in a]
    wa = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a/final").state_dict()
    wb = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b/final").state_dict()
    assert wa.keys() == wb.keys()
    assert [name for name in wa if not torch.equal(wa[name], wb[name])] == []


def test_sigterm_saves_the_last_step_and_the_rerun_resumes(workdir, tmp_path, capsys):
    out = tmp_path / "run"
    done = sigterm_after_first_step("stages.reward_model", args(workdir, out, "train.max_steps=100000"), out)
    assert done.returncode == 143 and "stopped by SIGTERM" in done.stderr, done.stderr[-3000:]
    n = metrics(out)[-1]["step"]
    assert [r["step"] for r in metrics(out)] == list(range(1, n + 1))
    assert (out / "checkpoints/latest").read_text() == f"step-{n:08d}" and not (out / "DONE").exists()
    summary = rm.main(args(workdir, out, f"train.max_steps={n + 2}"))
    assert summary["steps"] == n + 2 and f"resumed at step {n} from" in capsys.readouterr().out
    assert [r["step"] for r in metrics(out)] == list(range(1, n + 3))


def test_resume_with_another_lr_is_refused_in_one_line(workdir, tmp_path, capsys):
    out = tmp_path / "a"
    rm.main(args(workdir, out, "train.max_steps=2"))
    done = (out / "DONE").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(rm.main, args(workdir, out, "train.max_steps=3", "train.lr=0.5"))
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: train.resume_from:")
    assert "train.lr" in err[0] and "max_steps" not in err[0]
    assert (out / "DONE").read_text() == done and [r["step"] for r in metrics(out)] == [1, 2]
    # train.resume_from=none starts over with the new lr, replacing the old checkpoints
    summary = rm.main(args(workdir, out, "train.max_steps=3", "train.lr=0.5", "train.resume_from=none"))
    assert summary["steps"] == 3 and [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-00000003"]
