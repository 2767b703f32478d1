"""CRIU image directories: framing (read_image/write_image), export from any Source, and
ImageSource (a directory as a Source). `from ckptfs import criu` is the public face."""
from .check import check, problems
from .export import export, root_pstree, trim_core
from .framing import (BY_MAGIC, BY_NAME, IMG_COMMON, IMG_SERVICE, KINDS, PE_LAZY, PE_PARENT,
                      PE_PRESENT, image_bytes, read_image, write_image)
from .source import ImageSource, entry_flags, entry_pages

__all__ = ["check", "problems", "export", "root_pstree", "trim_core", "read_image", "write_image", "image_bytes", "ImageSource", "KINDS",
           "BY_NAME", "BY_MAGIC", "IMG_COMMON", "IMG_SERVICE", "PE_PARENT", "PE_LAZY",
           "PE_PRESENT", "entry_pages", "entry_flags"]
