"""The code blocks of the documentation, found and made runnable: every ```python block of
README.md and of every page under docs/ (files a page includes with ``--8<--`` too), and
every ```bash block whose first command (after any comment lines) starts with ``retrofit ``.

A block needs nothing but its page: the blocks of a page run in order, in one Python
namespace, in a fresh folder, as a reader pastes them. Where a block needs weights or data
that cannot be downloaded here, one table, :data:`SUBSTITUTIONS`, says what stands in
(every rule with its reason; a rule that no block uses any more fails a test). A block that
is only illustrative says so in its page, on the line before its fence:

    <!-- snippet: illustrative (why) -->

Run as a script (``python tests/snippets.py BLOCKS.json``), it is the runner of one page:
it runs the blocks of the JSON file in order, in the current folder, and stops at the first
that fails, naming it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.M | re.S)
MARK = re.compile(r"^<!-- snippet: illustrative \((?P<why>[^)]+)\) -->$")
INCLUDE = re.compile(r'^--8<-- "(?P<path>[^"]+)"$', re.M)


@dataclass(frozen=True)
class Block:
    """One code block of a page."""

    page: str  # the page's path from the repository root
    line: int  # the line of its opening fence, 1-based
    lang: str  # "python" or "bash"
    code: str  # as written in the page
    illustrative: str | None = None  # why it is not run, from its mark; None: it runs

    @property
    def where(self) -> str:
        return f"{self.page}:{self.line}"


def pages() -> list[Path]:
    """README.md and every page under docs/, in a stable order: a new page is picked up."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _text(page: Path) -> str:
    """The page as mkdocs reads it, with the files it includes put in place."""
    return INCLUDE.sub(lambda m: (ROOT / m["path"]).read_text(), page.read_text())


def blocks(page: Path) -> list[Block]:
    """The runnable blocks of ``page``, with their illustrative marks."""
    text = _text(page)
    out = []
    for m in FENCE.finditer(text):
        lang, code = m["lang"], m["code"]
        command = next((line for line in code.splitlines() if line.strip() and not line.startswith("#")), "")
        if not (lang == "python" or (lang == "bash" and command.startswith("retrofit "))):
            continue
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = MARK.match(before)
        out.append(Block(str(page.relative_to(ROOT)), line, lang, code, mark["why"] if mark else None))
    return out


def stray_marks(page: Path) -> list[str]:
    """Illustrative marks that do not stand right before a runnable block (a typo, or a
    block that changed language)."""
    text = _text(page)
    marked = {b.line - 1 for b in blocks(page) if b.illustrative}
    return [f"{page.relative_to(ROOT)}:{i + 1}" for i, line in enumerate(text.splitlines())
            if line.startswith("<!-- snippet") and i + 1 not in marked]


@dataclass(frozen=True)
class Substitution:
    """A stand-in for what a block needs and cannot have here."""

    pattern: str  # a regular expression, applied to every runnable block
    replacement: str  # re.sub's replacement; @NAME@ is the path of the stand-in NAME
    why: str


# The one table of stand-ins. Paths (@NAME@) are made by tests/test_snippets.py: a small
# ImageFolder, a fine-tuning checkpoint, a YOLOv8n checkpoint and data set, tiny
# transformers models; nothing is downloaded.
SUBSTITUTIONS: tuple[Substitution, ...] = (
    Substitution(r"pretrained=True", "pretrained=False", "no weight downloads here: random weights"),
    Substitution(r" --pretrained\b", "", "no weight downloads here: random weights"),
    Substitution(r"\b(num_train_epochs|epochs)=\d+", r"\1=1", "one epoch shows the loop works"),
    Substitution(r'"(pets|data)/"', '"@IMAGES@/"', "a small ImageFolder stands in for the reader's images"),
    Substitution(r"\b(PATH|data)/val\b", "@IMAGES@/val", "the same ImageFolder's validation split"),
    Substitution(r"retrofit gates runs/se/best\.pt", "retrofit gates @FIT_CKPT@",
                 "a checkpoint of retrofit.finetune.fit stands in for the page's earlier run"),
    Substitution(r"\bmy_rules\.toml\b", "@RULES@", "a rule file of the reader's: a copy of rules/se.toml"),
    Substitution(r"yolov8n\.pt\b", "@YOLO_PT@", "Ultralytics' pretrained checkpoint: a YOLOv8n with random weights"),
    Substitution(r'data="coco8\.yaml"',
                 'data="@YOLO_DATA@", imgsz=64, batch=4, workers=0, device="cpu", amp=False, plots=False',
                 "COCO8 is a download: a generated 3-class detection set, trained small on the CPU"),
    Substitution(r"\bbus\.jpg\b", "@IMAGE@", "Ultralytics' sample image: one of the generated set's"),
    Substitution(r"transformers:path/to/folder", "transformers:@HF_FOLDER@",
                 "a folder holding config.json: a small ResNet's"),
    Substitution(r'"facebook/convnext-tiny-224"', '"@HF_CONVNEXT@"',
                 "a Hub model: a small ConvNeXt written by save_pretrained"),
)


def substitute(code: str, paths: dict[str, str]) -> tuple[str, set[int]]:
    """``code`` with every substitution applied, and the indexes of the rules that matched."""
    used = set()
    for i, s in enumerate(SUBSTITUTIONS):
        replacement = re.sub(r"@(\w+)@", lambda m: paths[m[1]].replace("\\", "\\\\"), s.replacement)
        code, n = re.subn(s.pattern, replacement, code)
        if n:
            used.add(i)
    return code, used


def run_blocks(items: list[dict[str, str]]) -> int:
    """Run blocks in order in the current folder; 0, or 1 after naming the block that failed."""
    namespace: dict[str, object] = {"__name__": "__main__"}
    for item in items:
        print(f"--- {item['where']} ({item['lang']})", flush=True)
        if item["lang"] == "python":
            try:
                exec(compile(item["code"], item["where"], "exec"), namespace)  # noqa: S102 - the page's own code
            except BaseException:
                traceback.print_exc()
                print(f"FAILED: the python block at {item['where']}", file=sys.stderr)
                return 1
        else:
            r = subprocess.run(["bash", "-euo", "pipefail", "-c", item["code"]])
            if r.returncode != 0:
                print(f"FAILED: the bash block at {item['where']} (exit {r.returncode})", file=sys.stderr)
                return 1
    return 0


def as_json(items: list[Block], code: list[str]) -> str:
    return json.dumps([{**asdict(b), "code": c, "where": b.where} for b, c in zip(items, code, strict=True)])


if __name__ == "__main__":
    sys.exit(run_blocks(json.loads(Path(sys.argv[1]).read_text())))
