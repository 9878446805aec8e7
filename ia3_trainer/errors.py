"""Errors and their one-line form (placeholder on main; the schema branch completes this module)."""


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]
