"""One chorus-p2p node: identity, ledger, blob store, rounds and the HTTP/WebSocket API."""
