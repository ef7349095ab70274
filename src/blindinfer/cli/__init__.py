"""The `blindinfer` command line: the one place that composes client and server."""
