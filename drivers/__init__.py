"""Device drivers, after the kernel's drivers/: only ``block`` (the NBD driver)."""

__all__ = ["block"]
