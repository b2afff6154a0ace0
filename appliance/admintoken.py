"""Where the admin API's bearer token lives; shared by the daemon (which writes it) and
the CLI client (which reads it), so the daemon need not import the client."""

TOKEN_FILE = "admin.token"  # in state_dir, mode 0600: the admin API's bearer token
