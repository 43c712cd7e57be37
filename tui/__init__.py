"""The Textual TUI (a client of a node's public HTTP/WebSocket API). Not built yet: see issue 6."""
