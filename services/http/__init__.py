"""http: boot images, loaders, boot configs and owner-only ignition over HTTP."""

from appliance.service import ServiceSpec
from services.http.server import HttpService

SPEC = ServiceSpec("http", HttpService, listen_keys=("http",))

__all__ = ["SPEC", "HttpService"]
