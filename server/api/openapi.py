"""The REST API's description: an OpenAPI 3.1 document of the KServe v2 endpoints this server
serves, with the ensemble's scores as the named outputs an answer may carry.

Served at GET /v2/openapi.json (api/http.py). The output names and their datatypes come from the
KServe outputs (api/kserve_messages.py `OUTPUTS`, the score table's rows), so a new score is
described without an edit here. OpenAPI 3.1 schemas are JSON Schema 2020-12, so any JSON Schema validator checks requests
and answers against them (tests/http/test_openapi.py does, on real traffic).
"""

from __future__ import annotations

import functools
from typing import Any

from snapserve.proto.scores import SCORE_SPECS
from snapserve.server.api.kserve_messages import DEFAULT_OUTPUTS, OUTPUTS

__all__ = ["OPENAPI_PATH", "openapi_document"]

OPENAPI_PATH = "/v2/openapi.json"

_REF = "#/components/schemas/"
_DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
              "FP16", "FP32", "FP64", "BYTES"]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_ERROR = _json(_ref("Error"), "refused: the message says what was wrong and what is expected")
_NO_BODY = {"description": "yes (empty body)"}


def _schemas() -> dict[str, Any]:
    scores = list(OUTPUTS)
    tensor_data = {"type": "array", "description": "the tensor's values, flat, row-major "
                                                    "(nested lists are accepted too)"}
    parameters = {"type": "object", "additionalProperties": True}
    score_outputs = {
        "oneOf": [{"type": "object", "required": ["name", "datatype", "shape"],
                   "properties": {"name": {"const": name,
                                           "description": SCORE_SPECS[name].description},
                                  "datatype": {"const": output.datatype},
                                  "shape": {"type": "array", "items": {"type": "integer"},
                                            "minItems": len(SCORE_SPECS[name].dims),
                                            "maxItems": len(SCORE_SPECS[name].dims),
                                            "description": " x ".join(SCORE_SPECS[name].dims)},
                                  "data": tensor_data,
                                  "parameters": parameters}}
                  for name, output in OUTPUTS.items()]}
    return {
        "Error": {"type": "object", "required": ["error"],
                  "properties": {"error": {"type": "string"}}},
        "InferenceRequest": {
            "type": "object", "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": parameters,
                "inputs": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["name", "shape", "datatype"],
                    "properties": {"name": {"type": "string"},
                                   "shape": {"type": "array", "items": {"type": "integer",
                                                                        "minimum": 0}},
                                   "datatype": {"enum": _DATATYPES},
                                   "parameters": parameters, "data": tensor_data}}},
                "outputs": {"type": "array", "description": "outputs to send (default: all but "
                                                            "those sent on request)",
                            "items": {"type": "object", "required": ["name"],
                                      "properties": {"name": {"enum": scores},
                                                     "parameters": parameters}}}}},
        "InferenceResponse": {
            "type": "object", "required": ["model_name", "outputs"],
            "properties": {"model_name": {"type": "string"}, "model_version": {"type": "string"},
                           "id": {"type": "string"}, "parameters": parameters,
                           "outputs": {"type": "array", "items": score_outputs}}},
        "ServerMetadata": {
            "type": "object", "required": ["name", "version"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                           "extensions": {"type": "array", "items": {"type": "string"}}}},
        "TensorMetadata": {
            "type": "object", "required": ["name", "datatype", "shape"],
            "properties": {"name": {"type": "string"}, "datatype": {"enum": _DATATYPES},
                           "shape": {"type": "array", "items": {"type": "integer"}}}},
        "ModelMetadata": {
            "type": "object", "required": ["name", "inputs", "outputs"],
            "properties": {"name": {"type": "string"}, "platform": {"type": "string"},
                           "versions": {"type": "array", "items": {"type": "string"}},
                           "inputs": {"type": "array", "items": _ref("TensorMetadata")},
                           "outputs": {"type": "array", "items": _ref("TensorMetadata")}}},
        "RepositoryIndex": {
            "type": "array", "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                               "state": {"type": "string"}, "reason": {"type": "string"}}}},
        "Object": {"type": "object", "description": "as Triton's REST answer (a JSON object)"},
    }


def _operation(summary: str, responses: dict[str, Any], body: dict[str, Any] | None = None,
               ) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if body is not None:
        operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": body}}}
    return operation


def _model_paths(base: str, parameters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        base: {"parameters": parameters,
               "get": _operation("model metadata", {"200": _json(_ref("ModelMetadata"), "metadata"),
                                                    "404": _ERROR})},
        f"{base}/ready": {"parameters": parameters,
                          "get": _operation("model ready", {"200": _NO_BODY, "503": _ERROR})},
        f"{base}/config": {"parameters": parameters,
                           "get": _operation("model configuration (Triton's)",
                                             {"200": _json(_ref("Object"), "configuration"),
                                              "404": _ERROR})},
        f"{base}/stats": {"parameters": parameters,
                          "get": _operation("model statistics (Triton's)",
                                            {"200": _json(_ref("Object"), "statistics"),
                                             "404": _ERROR})},
        f"{base}/infer": {"parameters": parameters, "post": {
            "summary": "inference: the ensemble's probabilities and uncertainty scores",
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": _ref("InferenceRequest")},
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                             "description": "Triton's binary tensors: the JSON "
                                                            "header, then the tensors' bytes"}}},
            "responses": {"200": {"description": "the scores", "content": {
                              "application/json": {"schema": _ref("InferenceResponse")},
                              "application/octet-stream": {"schema": {"type": "string",
                                                                      "format": "binary"}}}},
                          "400": _ERROR, "404": _ERROR, "429": _ERROR, "503": _ERROR,
                          "504": _ERROR}}},
    }


@functools.cache
def openapi_document(server_version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the REST endpoints (every model shares them)."""
    model = {"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}
    version = {"name": "version", "in": "path", "required": True,
               "schema": {"type": "string", "pattern": "^[0-9]+$"}}
    paths: dict[str, Any] = {
        "/v2": {"get": _operation("server metadata", {"200": _json(_ref("ServerMetadata"), "metadata")})},
        "/v2/health/live": {"get": _operation("server live", {"200": _NO_BODY})},
        "/v2/health/ready": {"get": _operation("server ready: at least one model loaded",
                                               {"200": _NO_BODY, "503": _ERROR})},
        "/v2/models/stats": {"get": _operation("every model's statistics (Triton's)",
                                               {"200": _json(_ref("Object"), "statistics")})},
        "/v2/repository/index": {"post": _operation(
            "the repository's models and versions, with why a version is not served",
            {"200": _json(_ref("RepositoryIndex"), "index")},
            {"type": "object", "properties": {"ready": {"type": "boolean"}}})},
        "/v2/repository/models/{model}/load": {"parameters": [model], "post": _operation(
            "load a model (--allow-repository-control)", {"200": _NO_BODY, "400": _ERROR,
                                                          "404": _ERROR})},
        "/v2/repository/models/{model}/unload": {"parameters": [model], "post": _operation(
            "unload a model (--allow-repository-control)", {"200": _NO_BODY, "400": _ERROR,
                                                            "404": _ERROR})},
        OPENAPI_PATH: {"get": _operation("this document", {"200": _json({"type": "object"},
                                                                        "OpenAPI 3.1")})},
    }
    paths.update(_model_paths("/v2/models/{model}", [model]))
    paths.update(_model_paths("/v2/models/{model}/versions/{version}", [model, version]))
    return {
        "openapi": "3.1.0",
        "info": {"title": "snapserve KServe v2 REST API", "version": server_version,
                 "description": "The Open Inference Protocol (KServe v2) over REST. Answers carry "
                                "the ensemble's scores as named outputs: "
                                + ", ".join(OUTPUTS) + " (by default "
                                + ", ".join(DEFAULT_OUTPUTS) + "; the others when asked for). "
                                  "Errors are {\"error\": message}."},
        "paths": paths,
        "components": {"schemas": _schemas()},
    }
