"""The KSI daemon: newline-delimited JSON commands over a Unix socket."""
