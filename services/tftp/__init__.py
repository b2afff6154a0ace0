"""tftp: read-only TFTP with option negotiation, jailed to boot.tftp_root, boot configs."""

from appliance.service import ServiceSpec
from services.tftp.server import TftpService

SPEC = ServiceSpec("tftp", TftpService, listen_keys=("tftp",))

__all__ = ["SPEC", "TftpService"]
