"""The Kubernetes Indexed Job template against the API schemas of current Kubernetes
releases, with kubernetes-validate in strict mode (unknown fields are errors, as
``kubectl apply --validate=strict`` makes them). No cluster is needed, and none is here.
"""

from __future__ import annotations

import pytest

from support import ROOT

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is a test extra (pip install '.[test]')"
)
yaml = pytest.importorskip("yaml", reason="PyYAML is a test extra (pip install '.[test]')")

TEMPLATE = ROOT / "ci" / "kubernetes" / "gpuconform-indexed-job.yaml"


def _current_versions(count: int = 3) -> list[str]:
    """The newest ``count`` minor releases whose schemas the installed validator carries."""
    from kubernetes_validate import utils

    newest = {}
    for version in utils.all_versions():
        major, minor, *_ = (int(part) for part in version.split("."))
        newest[(major, minor)] = version
    return [newest[key] for key in sorted(newest)[-count:]]


VERSIONS = _current_versions()


def _resources() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(TEMPLATE.read_text()) if doc]


@pytest.mark.parametrize("version", VERSIONS)
def test_indexed_job_template_is_valid_kubernetes(version):
    kinds = []
    for resource in _resources():
        kubernetes_validate.validate(resource, version, strict=True)
        kinds.append(resource["kind"])
    assert kinds == ["PersistentVolumeClaim", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Job"]


@pytest.mark.parametrize(
    "break_it, complaint",
    [
        (lambda job: job["spec"].update(backofLimit=0), "backofLimit"),  # a misspelt field
        (lambda job: job["spec"].update(completions="four"), "'four' is not of type 'integer'"),
        (lambda job: job["spec"]["template"]["spec"]["containers"][0].pop("name"), "'name' is a required property"),
    ],
    ids=["unknown-field", "wrong-type", "missing-required"],
)
def test_the_validator_rejects_a_broken_template(break_it, complaint):
    """The check can fail: the same template with one defect does not pass."""
    (job,) = [r for r in _resources() if r["kind"] == "Job"]
    break_it(job)
    with pytest.raises(kubernetes_validate.ValidationError) as raised:
        kubernetes_validate.validate(job, VERSIONS[-1], strict=True)
    assert complaint in str(raised.value)
