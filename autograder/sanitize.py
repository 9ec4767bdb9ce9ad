"""What may leave the grader: messages without control characters or hidden tests.

Everything a student's kernel printed is untrusted text. Before it reaches a score table, the
JSON, the CSV files or the feedback HTML:
- terminal escape sequences and control characters are removed;
- any line of a hidden test that appears in it is replaced by "[hidden test]" (a student can
  print the running cell's source into an error message);
- it is capped in length;
- in CSV, a cell that a spreadsheet would read as a formula (= + - @ and tab/CR first) is
  prefixed with an apostrophe.
Feedback notebooks lose the hidden-test regions of their test cells and every traceback
(which would show those lines); the error's name and message stay.
"""

from __future__ import annotations

import re

from .spec import HIDDEN_BEGIN, strip_hidden

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")
MESSAGE_LIMIT = 1500
HIDDEN_MARK = "[hidden test]"


def strip_control(text: str) -> str:
    return CONTROL.sub("", ANSI.sub("", text))


def redact_hidden(text: str, hidden_lines: list[str]) -> str:
    for line in sorted(hidden_lines, key=len, reverse=True):
        if len(line) >= 12 and line in text:
            text = text.replace(line, HIDDEN_MARK)
    # Lines of a hidden test may also come back with their whitespace collapsed.
    squeezed = " ".join(text.split())
    for line in hidden_lines:
        flat = " ".join(line.split())
        if len(flat) >= 12 and flat in squeezed and flat not in text:
            squeezed = squeezed.replace(flat, HIDDEN_MARK)
            text = squeezed
    return text


def clean_message(text: str, hidden_lines: list[str] = (), limit: int = MESSAGE_LIMIT) -> str:
    text = strip_control(str(text)).replace("\r", "")
    text = redact_hidden(text, list(hidden_lines))
    text = " ".join(text.split()) if "\n" not in text.strip() else "\n".join(l.rstrip() for l in text.strip().splitlines())
    if len(text) > limit:
        keep = limit - 30
        text = text[: keep // 2] + " [... cut ...] " + text[-(keep - keep // 2):]
    return text


def csv_cell(value) -> object:
    if isinstance(value, str):
        value = strip_control(value).replace("\n", " | ")
        if value[:1] in ("=", "+", "-", "@", "\t", "\r") or value[:1] == "\uff1d":
            return "'" + value
    return value


def feedback_notebook(nb, hidden_lines: list[str], reveal_hidden: bool = False):
    """A copy of an autograded notebook that is safe to hand back to the student."""
    import copy

    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        source = str(cell.get("source", ""))
        if not reveal_hidden and HIDDEN_BEGIN in source:
            cell["source"] = strip_hidden(source)
        outputs = []
        for output in cell.get("outputs", []) or []:
            kind = output.get("output_type")
            if kind == "error":
                ename = clean_message(str(output.get("ename", "Error")), [] if reveal_hidden else hidden_lines, 200)
                evalue = clean_message(str(output.get("evalue", "")), [] if reveal_hidden else hidden_lines)
                output["ename"], output["evalue"] = ename, evalue
                output["traceback"] = [f"{ename}: {evalue}"]
            elif kind == "stream":
                output["text"] = clean_message(str(output.get("text", "")), [] if reveal_hidden else hidden_lines,
                                               20000)
            elif kind in ("execute_result", "display_data"):
                data = output.get("data", {})
                for mime in list(data):
                    if mime.startswith("text/") or mime.endswith("json") or mime.endswith("javascript"):
                        if mime in ("text/plain",):
                            data[mime] = clean_message(str(data[mime]), [] if reveal_hidden else hidden_lines, 20000)
                        else:
                            del data[mime]  # HTML, JavaScript and JSON from a kernel are not shown
                if not data:
                    continue
            outputs.append(output)
        if cell.get("cell_type") == "code":
            cell["outputs"] = outputs
    return nb
