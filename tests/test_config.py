import pytest
import yaml
from pydantic import ValidationError

from schemas.config import PipelineConfig, load_config


def write(tmp_path, data) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_load_resolves_paths_against_the_config_and_applies_overrides(tmp_path):
    path = write(tmp_path, {"input": {"paths": ["data/x.jsonl"]}, "output": {"dir": "out"}})
    cfg = load_config(path, ["mining.num_negatives=7", "generation.styles={keywords: 2}"])
    assert cfg.input.paths == [str(tmp_path / "data/x.jsonl")]
    assert cfg.output.dir == str(tmp_path / "out")
    assert cfg.mining.num_negatives == 7
    assert cfg.generation.styles == {"keywords": 2}


def test_hash_ignores_runtime_and_output_dir_but_not_content(tmp_path):
    base = {"input": {"paths": ["a.jsonl"]}}
    a = PipelineConfig.model_validate(base)
    b = PipelineConfig.model_validate({**base, "runtime": {"num_cpus": 1}, "output": {"dir": "/x"}})
    c = PipelineConfig.model_validate({**base, "mining": {"max_positive_ratio": 0.9}})
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert a.run_id.startswith("tripletforge-") and len(a.run_id.split("-")[-1]) == 12


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"mining": {"min_rank": 5, "max_rank": 5}}, "min_rank"),
        ({"mining": {"num_negatives": 2, "min_negatives": 3}}, "min_negatives"),
        ({"generation": {"styles": {"haiku": 1}}}, "unknown query styles"),
        ({"generation": {"styles": {"question": 0}}}, "at least one"),
        ({"input": {"paths": ["a"], "min_chars": 10, "max_chars": 5}}, "min_chars"),
        ({"mining": {"bogus": 1}}, "Extra inputs"),
        ({"name": "bad name!"}, "name must"),
    ],
)
def test_invalid_configs_fail_with_a_clear_message(patch, message):
    raw = {"input": {"paths": ["a.jsonl"]}}
    for key, value in patch.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    with pytest.raises(ValidationError, match=message):
        PipelineConfig.model_validate(raw)


def test_bad_override_and_missing_file(tmp_path):
    path = write(tmp_path, {"input": {"paths": ["a"]}})
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(path, ["nonsense"])
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_shipped_configs_are_valid():
    from tests.helpers import ROOT

    for path in (ROOT / "configs").glob("*.yaml"):
        load_config(path)
