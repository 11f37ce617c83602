"""The OpenAPI schema, exactly as strict as the server: FastAPI's, plus what it cannot know.

Predict bodies are parsed with orjson and numpy rather than pydantic (server/decoding.py), so their
schemas are added here; the operating points a policy may name and the deepest `max_exit` depend
on the models served, so they are filled in from them. Differences that remain (a schema cannot say
"these bytes are a PNG", or that nested arrays are rectangular) are listed in docs/serving.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI

from branchserve.server.predictor import ServedModel
from branchserve.server.schemas import PredictBody

BODY_SCHEMAS = (PredictBody,)  # referenced by the predict route's openapi_extra


def strict_schema(app: FastAPI, models: Sequence[ServedModel]) -> dict[str, Any]:
    schema = FastAPI.openapi(app)  # makes and keeps app.openapi_schema, this same dict
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for model in BODY_SCHEMAS:
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(doc.pop("$defs", {}))
        components[model.__name__] = doc
    # A policy comes back as it was given (absent fields absent), so its output schema is its input's.
    if "Policy-Output" in components:
        components["Policy-Output"] = {"$ref": "#/components/schemas/Policy-Input"}
    points = sorted({p.name for m in models for p in m.manifest.frontier})
    policy = components["Policy-Input"]["properties"]
    policy["point"]["enum"] = points
    if len(exits := {m.runtime.num_exits for m in models}) == 1:  # one threshold per exit
        policy["thresholds"]["minItems"] = policy["thresholds"]["maxItems"] = exits.pop()
    deepest = max(m.runtime.num_exits for m in models) - 1
    components["Budget"]["properties"]["max_exit"]["anyOf"][0]["maximum"] = deepest
    for path, operations in schema["paths"].items():
        for parameter in operations["post"]["parameters"] if path.endswith("/predict") else []:
            if parameter["name"] == "max_exit":
                parameter["schema"]["anyOf"][0]["maximum"] = deepest
    return schema
