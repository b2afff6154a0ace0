"""http: boot images, loaders, boot configs and owner-only ignition over HTTP."""
