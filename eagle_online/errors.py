"""The one error type for what a person can fix: launchers print `error: <message>` and exit 2 for it,
and a traceback only for a bug. Each module's error (RecipeError, DataError, ExportError, ...) is one."""


class UserError(Exception):
    """Input that cannot be used as given; the message names the file, key or path and the fix."""


class RecipeError(UserError, ValueError):
    """A recipe that cannot be used; the message names the file and the key. Here, beside UserError, so
    that what recipe.py resolves through (gguf_targets) can raise it without importing recipe.py."""
