"""The search service's settings (``clipforge-index serve`` flags map onto these)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .image_guard import ImageLimits

QUERY_ENCODERS = ("torch", "onnx", "onnx-int8")


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one search service (``clipforge-index serve`` flags map onto these)."""

    index_dir: str
    """The ``INDEX_DIR`` to serve."""
    model: str | None = None
    """Query model (run dir / model folder / checkpoint); None: the index's own copy
    (``INDEX_DIR/model/``), or ``model_source`` for indexes built before it was kept."""
    device: str = "cpu"
    """Device of the query model."""
    mmap: bool = False
    """Memory-map the index files instead of reading them into RAM: the service's resident
    memory is then what searches touch (the kernel pages the rest in and out), so an index
    larger than RAM can be served (``Searcher.open(..., mmap=True)``)."""
    max_k: int = 1000
    """Largest ``k`` a request may ask for (also capped by the collection size)."""
    max_text_chars: int = 1000
    """Longest text query in characters (the tokenizer keeps ~77 tokens anyway; this bounds the
    work and memory one request can cause)."""
    max_upload_bytes: int = 10 * 1024 * 1024
    """Largest request body: an uploaded image with its form fields, or a JSON query."""
    max_image_pixels: int = 40_000_000
    """Largest uploaded image in pixels (checked from the header before decoding, so a small
    file that decompresses to gigabytes is refused instead of exhausting memory)."""
    max_batch: int = 64
    """Most queued queries encoded together in one forward pass."""
    max_image_side: int = 16_384
    """Longest side of an uploaded image in pixels (from the header, before decoding)."""
    max_image_aspect: float = 20.0
    """Largest aspect ratio of an uploaded image: the model scales the shorter side up to its
    input size, so a 200,000 x 1 image would become 44.8 million x 224 pixels."""
    image_work_side: int = 1024
    """Images with a shorter side over twice this are reduced (JPEG: decoded at 1/2..1/8 scale)
    to a shorter side of this .. twice this before the model's own resize."""
    api_key: str | None = field(default=None, repr=False)
    """When set, every route but /health, the page and its assets and the API description needs
    ``Authorization: Bearer <api_key>``."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed to call the API from their pages (CORS); none by default."""
    max_requests_per_minute: int | None = None
    """Requests one client address may make in any 60 s (429 with Retry-After beyond)."""
    header_timeout_s: float = 10.0
    """Seconds a request may take to deliver its headers (408 and the connection closed)."""
    body_timeout_s: float = 60.0
    """Seconds a search request may take to deliver its body (408 and the connection closed)."""
    query_encoder: str = "torch"
    """What encodes text queries: ``torch``, or the exported ONNX text graph run by
    onnxruntime, ``onnx`` (fp32, the same vectors) or ``onnx-int8`` (int8 weights)."""
    onnx_export: str | None = None
    """The ``clipforge-export onnx`` directory of the index's model (for ``onnx*``)."""
    keep_alive_s: float = 15.0
    """Seconds an idle kept-alive connection stays open (uvicorn's ``timeout_keep_alive``).
    Longer than client pools keep idle connections (httpx: 5 s): at uvicorn's default of 5 s
    both sides time out together, and a client reusing the connection as the server closes it
    gets a reset (measured: 1 ReadError in a 2,000-request load test)."""

    def __post_init__(self) -> None:
        for name in (
            "max_k",
            "max_text_chars",
            "max_upload_bytes",
            "max_image_pixels",
            "max_batch",
            "max_image_side",
            "image_work_side",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.max_image_aspect >= 1:
            raise ValueError(f"max_image_aspect must be >= 1, got {self.max_image_aspect}")
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if self.max_requests_per_minute is not None and self.max_requests_per_minute < 1:
            raise ValueError(
                f"max_requests_per_minute must be >= 1, got {self.max_requests_per_minute}"
            )
        if self.query_encoder not in QUERY_ENCODERS:
            raise ValueError(
                f"query_encoder must be one of {QUERY_ENCODERS}, got {self.query_encoder!r}"
            )
        if self.query_encoder != "torch" and not self.onnx_export:
            raise ValueError(
                f"query_encoder {self.query_encoder!r} needs onnx_export: the directory "
                "clipforge-export onnx wrote for the index's model"
            )
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty (None turns the key off)")
        for origin in self.cors_origins:
            if origin == "*" or not origin.startswith(("http://", "https://")):
                raise ValueError(
                    f"CORS origin {origin!r} must be a scheme://host[:port] origin, "
                    "like https://example.org ('*' is refused: name the origins)"
                )

    @property
    def image_limits(self) -> ImageLimits:
        """The bounds on one query image."""
        return ImageLimits(
            max_pixels=self.max_image_pixels,
            max_side=self.max_image_side,
            max_aspect=self.max_image_aspect,
            work_side=self.image_work_side,
        )
