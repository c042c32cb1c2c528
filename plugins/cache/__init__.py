"""The response cache (issue #4), in progress: `policy` holds the RFC 9111 rules as
pure functions; the plugin and its memory/Redis stores build on it."""
