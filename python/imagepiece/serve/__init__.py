"""Online classification over HTTP: `scripts/serve.py` / `imagepiece-serve`.

One job per module: service (an artifact behind an `ip_runtime.Batcher`: upload bytes -> model input
-> top-k) -> app (the FastAPI routes: uploads, limits, errors as JSON) and metrics (Prometheus text:
HTTP counters and latency, the batcher's batch sizes, queue depth and waits) -> cli (uvicorn).
Decoding and preprocessing are predict's own (`imagepiece.predict.decode` / `.preprocess`): a served
image becomes exactly the pixels `imagepiece-predict` and timm's eval transform give it.
"""
from imagepiece.command_line import require_extra

# Before the imports that need them: a missing one is named with the extra that installs it.
require_extra("serve", ("PIL", "fastapi", "uvicorn", "python_multipart|multipart", "prometheus_client"), "imagepiece.serve")

from .app import create_app  # noqa: E402
from .service import ClassificationService, ServeConfig  # noqa: E402

__all__ = ["ClassificationService", "ServeConfig", "create_app"]
