"""Fake upstreams speaking the providers' real wire formats over HTTP on 127.0.0.1."""
