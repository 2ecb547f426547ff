"""deploy/prefect.yaml points at a real flow with parameters that flow accepts."""

import inspect

import yaml
from prefect.flows import load_flow_from_entrypoint

from tests.helpers import ROOT


def test_every_deployment_entrypoint_loads_with_its_parameters(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = yaml.safe_load((ROOT / "deploy" / "prefect.yaml").read_text())
    assert spec["deployments"]
    for dep in spec["deployments"]:
        flow = load_flow_from_entrypoint(dep["entrypoint"])
        accepted = set(inspect.signature(flow.fn).parameters)
        assert set(dep.get("parameters", {})) <= accepted, dep["name"]
        assert (ROOT / dep["parameters"]["config_path"]).exists()
        for schedule in dep.get("schedules", []):
            assert len(schedule["cron"].split()) == 5
