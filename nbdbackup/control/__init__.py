"""The control socket: QMP-compatible commands and events for a running server.

- `schema`: THE command table (names, argument schemas, return shapes, events)
  and the declarative argument types; `CommandError`.
- `framing`: sans-IO QMP framing (JSON text splitting, request checks, replies).
- `qmp`: `QMPServer` -- the asyncio Unix-socket (and TCP+TLS) server and handler registry.
- `remote`: remote control -- ``--control-listen`` configuration, access by
  client certificate subject (full / read-only), ``qmps://`` client addresses.
- `client`: `ControlClient` -- the asyncio client the CLI uses.
- `cliutil`: helpers shared by the ``backup``/``job``/``bitmap``/``export`` commands.

Kept separate from the CLI so tests drive the API directly; the CLI stays thin.
"""
