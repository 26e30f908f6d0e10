"""Pure translation between the providers' public wire formats and agentspace's internal types.

No I/O here: the ``/v1`` transports parse with these, call providers, and encode with these.
"""
