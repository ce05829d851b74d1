"""Local model dirs are checked before transformers reads them: one-line errors naming the dir and the problem."""
import json
import shutil

import pytest

from grpo import model as model_module
from grpo.config import ConfigError
from grpo.model import ModelConfig, load_policy
from grpo.model_dir import ModelDirError, check_model_dir, check_tokenizer_dir, is_local
from tests.grpo.test_model import tokenizer  # noqa: F401 (module fixture)
from tests.grpo.test_release_format import tiny_policy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A good model dir (tiny DeepseekV3Policy + tokenizer, as export_model writes) and a sharded copy."""
    root = tmp_path_factory.mktemp("model_dir")
    policy = tiny_policy()
    policy.save_pretrained(root / "good")
    tokenizer.save_pretrained(root / "good")
    policy.save_pretrained(root / "sharded", max_shard_size="20KB")
    return root


@pytest.fixture
def good(saved, tmp_path):
    """A fresh copy of the good dir, to break."""
    return shutil.copytree(saved / "good", tmp_path / "final")


def raises_one_line(check, path, *fragments, key="init"):
    with pytest.raises(ModelDirError) as info:
        check(str(path), key)
    text = str(info.value)
    assert "\n" not in text and isinstance(info.value, ConfigError)
    assert text.startswith(f"{key}: ") and str(path) in text and "<output_dir>/final" in text
    for fragment in fragments:
        assert fragment in text, text
    return text


def test_good_dirs_pass(saved):
    assert check_model_dir(str(saved / "good")) is True
    assert check_tokenizer_dir(str(saved / "good")) is True
    assert sorted(p.name for p in (saved / "sharded").glob("*.safetensors*"))[-1] == "model.safetensors.index.json"
    assert check_model_dir(saved / "sharded") is True


def test_missing_dir(tmp_path):
    raises_one_line(check_model_dir, tmp_path / "sft" / "final", "does not exist")
    raises_one_line(check_tokenizer_dir, tmp_path / "sft" / "final", "does not exist", key="tokenizer")


def test_missing_or_bad_config(good):
    (good / "config.json").rename(good / "config.bak")
    raises_one_line(check_model_dir, good, "config.json is missing")
    config = json.loads((good / "config.bak").read_text())
    del config["model_type"]
    (good / "config.json").write_text(json.dumps(config))
    raises_one_line(check_model_dir, good, "config.json has no model_type")
    (good / "config.json").write_text('{"model_type": "deepseek_v3",')  # half-written
    raises_one_line(check_model_dir, good, "config.json", "not readable JSON")


def test_missing_weights(good, saved, tmp_path):
    (good / "model.safetensors").unlink()
    raises_one_line(check_model_dir, good, "weights are missing", "model.safetensors")
    sharded = shutil.copytree(saved / "sharded", tmp_path / "sharded")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    shard.unlink()
    raises_one_line(check_model_dir, sharded, "shards listed in model.safetensors.index.json are missing", shard.name)


def test_truncated_or_corrupt_safetensors(good):
    weights = good / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    raises_one_line(check_model_dir, good, "weights file model.safetensors is truncated", f"the file has {len(data) - 100}")
    weights.write_bytes(data[:200])  # cut inside the header
    raises_one_line(check_model_dir, good, "model.safetensors is truncated")
    weights.write_bytes(data[:5])
    raises_one_line(check_model_dir, good, "model.safetensors is truncated", "no header")
    weights.write_bytes(data[:8] + b"x" * (len(data) - 8))
    raises_one_line(check_model_dir, good, "model.safetensors is corrupt", "not JSON")


def test_truncated_shard(saved, tmp_path):
    sharded = shutil.copytree(saved / "sharded", tmp_path / "sharded")
    shard = sorted(sharded.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1])
    raises_one_line(check_model_dir, sharded, f"weights file {shard.name} is truncated")


def test_pytorch_bin_is_accepted(good):
    (good / "model.safetensors").unlink()
    (good / "pytorch_model.bin").write_bytes(b"\x80\x02")
    assert check_model_dir(good) is True


def test_missing_tokenizer_files(good):
    assert check_tokenizer_dir(good) is True
    (good / "tokenizer.json").unlink()
    raises_one_line(check_tokenizer_dir, good, "tokenizer.json is missing", "vocab files", key="tokenizer")
    (good / "vocab.json").write_text("{}")
    (good / "merges.txt").write_text("")
    assert check_tokenizer_dir(good) is True  # tokenizer_config.json + a BPE vocab
    (good / "tokenizer_config.json").unlink()
    raises_one_line(check_tokenizer_dir, good, "tokenizer files are missing", key="model.init")


def test_hub_ids_are_left_alone(tmp_path, monkeypatch):
    for hub in ("gpt2", "org/name", "deepseek-ai/DeepSeek-V3"):
        assert not is_local(hub) and check_model_dir(hub) is False and check_tokenizer_dir(hub) is False
    for path in ("./final", "/abs/final", "~/final", "runs/tiny/sft/final", "runs\\final", str(tmp_path)):
        assert is_local(path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)  # exists locally: a dir, checked
    assert is_local("org/name")
    raises_one_line(check_model_dir, "org/name", "config.json is missing")


def test_load_policy_checks_local_dirs_only(good, tokenizer, monkeypatch):
    (good / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes()[:-8])
    with pytest.raises(ModelDirError, match=r"^init: model dir .*final.*model.safetensors is truncated"):
        load_policy(ModelConfig(init=str(good)), tokenizer)

    def offline(name, *args, **kwargs):
        raise OSError(f"offline: {name}")

    monkeypatch.setattr(model_module.AutoConfig, "from_pretrained", offline)
    with pytest.raises(ConfigError, match="reachable hub id: offline: org/name") as info:
        load_policy(ModelConfig(init="org/name"), tokenizer)  # goes to transformers (the hub) as before
    assert not isinstance(info.value, ModelDirError)


def test_stages_load_tokenizers_through_the_check(tmp_path):
    from grpo.model_dir import load_tokenizer

    (tmp_path / "final").mkdir()
    with pytest.raises(ConfigError, match=r"^model\.init: .*final.*tokenizer files are missing"):
        load_tokenizer(tmp_path / "final", "model.init")
