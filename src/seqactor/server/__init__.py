"""The server side of seqactor: the WebSocket connection layer (``ws``) and, as the tree moves
here, the gateway, session, ops, actor and hub (docs/architecture.md, "Gateway")."""
