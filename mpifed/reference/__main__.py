"""`python -m mpifed.reference [DOCS_DIR]`: rewrite the generated parts of the reference pages."""

import sys
from pathlib import Path

from mpifed.reference import write_pages

docs = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "docs")
changed = write_pages(docs)
print("updated: " + ", ".join(changed) if changed else "the reference pages are up to date")
