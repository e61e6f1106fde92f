"""What several test files check the same way: a CLI's one-line error, and the README's Python snippets."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def one_line_error(capsys, *words):
    """The captured stderr is one line `error: ...`, no traceback, naming every word given."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, err
    return err


def readme_python_blocks(heading: str) -> list[str]:
    """The ```python blocks of the README section under `heading`, as written."""
    text = README.read_text()
    section = text[text.index(heading):]
    section = section[:section.index("\n## ", len(heading))]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)
