"""Thin adapters to kernel interfaces of other operating systems (ctypes only).

`oskit.freebsd` is the one module that calls FreeBSD; it imports everywhere and refuses
with errors.Unsupported when called on another system.
"""
