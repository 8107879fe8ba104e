"""What the GraphQL routes take and give, for the OpenAPI document: Strawberry's routes read the request
themselves, so FastAPI cannot infer it (schemathesis checks the routes against this)."""

from __future__ import annotations

from typing import Any

from fastapi.routing import APIRoute

from replika_server.admin.errors import ErrorBody, errors

__all__ = ["document"]


#: The parts of a GraphQL request, in a POST's JSON body or as a GET's query parameters.
_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["query"],
    "properties": {
        "query": {"type": "string", "minLength": 1, "description": "a GraphQL document"},
        "variables": {"type": ["object", "null"]},
    },
    # Not in the schema, since no schema can say which names the document defines: a name that is not there is
    # a 400.
    "description": "Also operationName: which operation of the document to run, when it holds several.",
}
_JSON_RESULT = {"application/json": {"schema": {"type": "object", "properties": {"data": {}, "errors": {}}}}}
_REFUSED = {
    "model": ErrorBody,
    "description": "not a GraphQL request (no query, a body that is not a JSON object, a mutation over GET, "
    "an operationName the document does not define): text from Strawberry, or the API's JSON error",
    "content": {"text/plain": {"schema": {"type": "string"}}},
}
_POST = {
    "summary": "Run a GraphQL query or mutation",
    "body": {"requestBody": {"required": True, "content": {"application/json": {"schema": _REQUEST}}}},
    "result": {
        "description": "the result; errors in the query are in its 'errors' (GraphQL over HTTP, application/json)",
        "content": _JSON_RESULT,
    },
}
_GET = {
    "summary": "Run a GraphQL query given as ?query=, or (from a browser, without one) the GraphiQL page",
    "body": {
        "parameters": [
            {"name": "query", "in": "query", "required": False, "schema": {"type": "string", "minLength": 1}},
            {"name": "variables", "in": "query", "content": {"application/json": {"schema": {"type": "object"}}}},
        ]
    },
    "result": {
        "description": "the result as JSON; the GraphiQL page as HTML to a browser that asks without a query",
        "content": {**_JSON_RESULT, "text/html": {"schema": {"type": "string"}}},
    },
}


def document(route: APIRoute) -> None:
    """Strawberry's routes read the request themselves: say in the OpenAPI document what they take and give."""
    post = "POST" in (route.methods or ())
    doc: dict[str, Any] = _POST if post else _GET
    route.summary = doc["summary"]
    route.openapi_extra = doc["body"]
    route.responses = {200: doc["result"], 400: _REFUSED, **errors(401, 403, *((413,) if post else ()))}
