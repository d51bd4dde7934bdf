"""The one error type for what a person can fix: launchers print `error: <message>` and exit 2 for it,
and a traceback only for a bug. Each module's error (RecipeError, DataError, ExportError, ...) is one."""


class UserError(Exception):
    """Input that cannot be used as given; the message names the file, key or path and the fix."""
