"""ckptfs: a running process as files, and files back into a running process."""
__version__ = "0.1.0"
