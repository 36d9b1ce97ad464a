"""Errors a user can cause. The CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """A mistake in the user's input (bad path, mismatched stores, bad option): one clear line."""


class StoreError(UserError):
    """A store that cannot be read as asked: missing, wrong format version, or mismatched."""
