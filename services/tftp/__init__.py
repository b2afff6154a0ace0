"""tftp: read-only TFTP with option negotiation, jailed to boot.tftp_root, boot configs."""
