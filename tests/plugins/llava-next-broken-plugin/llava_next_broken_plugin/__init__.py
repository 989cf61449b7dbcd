"""A plugin whose dependency is not installed: importing it raises ModuleNotFoundError."""

import llava_next_dependency_that_is_not_installed  # noqa: F401
