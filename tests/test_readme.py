"""README.md stays true: linked configs exist, and every paper number it quotes is the one in that config."""
import os
import re

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = os.path.join(ROOT, "README.md")

# A results cell: [73.18ᵖ](configs/...yaml) (paper number) or [—](configs/...yaml) (no number).
CELL = re.compile(r"\[([^\]]*)\]\((configs/[^)]+\.yaml)\)")
PATH = re.compile(r"\b((?:configs|tools|docs|projects)/[\w./-]+\.(?:yaml|py|md|png))")


def _readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def _header(path):
    """The leading comment block of a config file."""
    lines = []
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            lines.append(line)
    return "".join(lines)


def test_every_path_named_in_readme_exists():
    missing = sorted({p for p in PATH.findall(_readme()) if not os.path.exists(os.path.join(ROOT, p))})
    assert not missing, f"README.md names files that do not exist: {missing}"


def test_results_cells_quote_the_config_headers():
    table_rows = [line for line in _readme().splitlines() if line.startswith("|")]
    cells = [cell for line in table_rows for cell in CELL.findall(line)]
    assert len(cells) > 40, "the results tables are missing from README.md"
    paper_cells = 0
    for text, path in cells:
        if text == "—":
            continue
        assert text.endswith("ᵖ"), f"README cell [{text}]({path}): only paper numbers (marked ᵖ) are allowed so far"
        number = text[:-1]
        assert re.fullmatch(r"\d+\.\d+", number), f"README cell [{text}]({path}) is not a number"
        # The number must appear as a number in the header (73.18 must not match 73.185 or 173.18).
        assert re.search(rf"(?<![\d.]){re.escape(number)}(?![\d])", _header(path)), (
            f"README quotes {number} for {path}, but the config's header comment does not"
        )
        paper_cells += 1
    assert paper_cells >= 30
