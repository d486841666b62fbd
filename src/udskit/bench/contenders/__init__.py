"""The contenders of ``udskit bench``: one module per way of moving messages.

:mod:`.registry` lists them. Nothing is imported here, so that a peer process imports only
its own contender's module.
"""

__all__: list[str] = []
