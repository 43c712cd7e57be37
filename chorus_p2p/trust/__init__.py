"""Who may say what: node identities (Ed25519) and join tokens, signed requests with replay
protection, and TLS pinned by node id.

Both ends use it: the node to verify and answer, the SDK client (``chorus_p2p.client``) to sign
and to pin, so it sits outside ``node`` (the node's own participant submits through the SDK).
"""
