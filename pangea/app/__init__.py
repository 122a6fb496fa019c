"""The application: the `pangea` command, the local supervisor, status, export, docs."""
