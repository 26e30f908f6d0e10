"""Names vulture reports as unused that are used, each with the reason; scripts/test runs ``vulture``
([tool.vulture] in pyproject.toml: agentspace/ and this file, at 80% confidence). Dead code is deleted, not
listed here."""

cli  # hookspecs.register_commands(cli): pluggy passes a hook's arguments by name, so the parameter is its API
