"""nbdbackup: point-in-time backup exports over NBD.

A pure-Python asyncio NBD server exports a disk live (read-write) and, while a
backup runs, as a frozen snapshot kept consistent by copy-before-write.
"""

__version__ = "0.1.0"
