"""Writes k8s/schemas/keda-scaledobject.json: the JSON schema of KEDA's ScaledObject, for validating
k8s/keda/ offline (tests/test_deploy.py, with check-jsonschema).

    python scripts/vendor_keda_schema.py <keda checkout> <its commit>

It takes ``openAPIV3Schema`` from ``config/crd/bases/keda.sh_scaledobjects.yaml`` and makes it strict
where the API server would be but a JSON schema is not: ``apiVersion`` and ``kind`` are fixed, and
every object that lists its properties gets ``additionalProperties: false``, so a misspelled field
fails (the API server prunes unknown fields of a CRD silently; ``kubectl apply --validate=strict``
refuses them). Maps (``additionalProperties`` already given) and ``x-kubernetes-preserve-unknown-
fields`` objects are left open.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

CRD = "config/crd/bases/keda.sh_scaledobjects.yaml"
OUT = Path(__file__).resolve().parent.parent / "k8s" / "schemas" / "keda-scaledobject.json"


def strict(node: Any) -> Any:
    if isinstance(node, dict):
        node = {k: strict(v) for k, v in node.items()}
        open_ended = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
        if "properties" in node and not open_ended:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict(v) for v in node]
    return node


def main(checkout: str, commit: str) -> None:
    crd = yaml.safe_load((Path(checkout) / CRD).read_text())
    [version] = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema = strict(version["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": "keda.sh/v1alpha1"}
    schema["properties"]["kind"] = {"const": "ScaledObject"}
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    out = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": (
            f"openAPIV3Schema of keda.sh/v1alpha1 ScaledObject from kedacore/keda {CRD} at commit "
            f"{commit}, made strict by scripts/vendor_keda_schema.py (see its docstring)"
        ),
        **schema,
    }
    OUT.write_text(json.dumps(out, indent=1, sort_keys=False) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
