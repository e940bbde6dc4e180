"""Every Python block of README.md and docs/*.md runs, in order, as the reader would run it.

Per file, one namespace: fenced ```python blocks run as code, ```pycon blocks as doctests,
and ``<!-- python ... -->`` comments (hidden when rendered) hold the setup a block needs.
A block fenced as ```python skip: <reason> is not run and the reason is reported.
"""

import doctest
import pathlib
import re
import warnings

import pytest

import crossent

ROOT = pathlib.Path(__file__).resolve().parents[2]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```(python|pycon)([^\n]*)\n(.*?)^```$|^<!-- python[^\n]*\n(.*?)^-->$", re.M | re.S)


def _blocks(path):
    text = path.read_text()
    for m in _BLOCK.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        if m.group(4) is not None:
            yield line, "python", "", m.group(4)
        else:
            yield line, m.group(1), m.group(2).strip(), m.group(3)


FILES_WITH_CODE = [p for p in FILES if any(True for _ in _blocks(p))]


@pytest.mark.parametrize("path", FILES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save files write here
    namespace = {"__name__": "__docs__"}
    skipped = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", crossent.CrossentWarning)  # examples of mistakes warn
            for line, kind, info, code in _blocks(path):
                where = f"{path.name}:{line}"
                if info.startswith("skip"):
                    skipped.append(f"{where}: {info.partition(':')[2].strip()}")
                    continue
                if kind == "pycon":
                    test = doctest.DocTestParser().get_doctest(code, namespace, where, str(path), line)
                    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
                    runner.run(test, clear_globs=False)
                    assert runner.failures == 0, f"{where}: doctest failed (output above)"
                else:
                    exec(compile(code, where, "exec"), namespace)
    finally:
        crossent.unpatch()  # an example that patches must not leak into other tests
    assert all(s.split(": ", 1)[1] for s in skipped), f"a skipped block gives no reason: {skipped}"
