"""How flow parameters render in the Prefect UI form."""

from pydantic import Field


def form(title: str, **constraints):
    """A parameter's title and constraints for the UI form.

    Prefect sets every parameter's title to its name and overwrites ``Field(title=...)``; a title given through
    ``json_schema_extra`` survives (checked on Prefect 3.9).
    """
    return Field(json_schema_extra={"title": title}, **constraints)
