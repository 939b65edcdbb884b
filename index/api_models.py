"""The search API's request and response models (pydantic), and the OpenAPI pieces the
hand-read search body needs. These are the JSON contract of ``POST /search`` and ``/items``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr


class SearchRequest(BaseModel):
    """A JSON search: exactly one of ``text``, ``item`` and ``vector``."""

    # Unknown fields are refused: a misspelt "txt" or "top_k" must not silently search defaults.
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="Text query (text -> image / text -> caption).")
    vector: list[float] | None = Field(
        None,
        description="A query embedding computed elsewhere (the index's dimension; the service "
        "L2-normalises it): search by vector, as clip-retrieval's embedding_input.",
    )
    # strict: JSON true or 1.0 is not item 1
    item: StrictInt | StrictStr | None = Field(
        None,
        description="An indexed item whose stored image is the query ('more like this'): an "
        "integer row id, or a string: the item's key (else a decimal row id; 'key:K' and 'id:N' "
        "say which explicitly).",
    )
    # strict: JSON true is not k=1 (form fields are converted from text before validation)
    k: int = Field(10, ge=1, strict=True, description="Results (1 .. min(count, max_k)).")
    target: Literal["image", "text"] = Field(
        "image", description="Search the image embeddings (default) or the caption embeddings."
    )


class HitOut(BaseModel):
    """One result. Shard paths and byte offsets stay on the server; ``image_url`` serves the
    image."""

    id: int = Field(description="Row id in the index.")
    score: float = Field(description="Cosine similarity to the query (higher is closer).")
    key: str = Field(description="Sample key in its shard.")
    caption: str = Field(description="The sample's caption.")
    source: str = Field(description="The sample's original source path ('' if unknown).")
    image_url: str = Field(description="Path of the item's image on this server.")


class QueryOut(BaseModel):
    """What was searched for."""

    type: Literal["text", "image", "item", "vector"]
    text: str | None = None
    item: int | None = Field(None, description="Row id of the query item (type 'item').")
    filename: str | None = Field(None, description="Uploaded file name (type 'image').")


class SearchResponse(BaseModel):
    """Results of one search, best first."""

    query: QueryOut
    target: Literal["image", "text"]
    k: int
    took_ms: float = Field(description="Server time for this request in milliseconds.")
    hits: list[HitOut]


class ItemOut(BaseModel):
    """An indexed item's metadata."""

    id: int
    key: str
    caption: str
    source: str
    image_url: str
    has_image: bool = Field(description="Whether the stored image bytes can be served.")


class ErrorOut(BaseModel):
    """Every error response."""

    detail: str = Field(description="What was wrong, in one sentence.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    c: {"model": ErrorOut} for c in (400, 404, 413, 415, 422)
}

# The search body is read by hand (JSON or multipart, one endpoint), so its schema is declared
# here for /openapi.json rather than inferred from a parameter.
SEARCH_BODY_SCHEMA = {
    "required": True,
    "content": {
        "application/json": {"schema": SearchRequest.model_json_schema()},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "image": {"type": "string", "format": "binary", "description": "query image"},
                    "text": {"type": "string"},
                    "item": {"type": "string"},
                    "k": {"type": "integer", "default": 10, "minimum": 1},
                    "target": {"type": "string", "enum": ["image", "text"], "default": "image"},
                },
            }
        },
    },
}
