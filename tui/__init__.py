"""The Textual TUI: ``chorus-node tui``. A client of a node's public HTTP/WebSocket API only."""
