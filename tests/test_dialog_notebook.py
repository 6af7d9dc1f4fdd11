"""Notebook import and export: .ipynb round trip, Jupyter/Colab/VS Code flavours, bad files, .py and .md."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from dialog import InvalidInput
from dialog.notebook import (MAX_IMPORT_BYTES, export_dialog, export_ipynb, export_md, export_py, import_ipynb,
                             prompt_markdown)
from parts import require_module

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
ANSI_TB = ["\x1b[0;31mZeroDivisionError\x1b[0m  Traceback (most recent call last)",
           "Cell \x1b[0;32mIn[2], line 1\x1b[0m\n----> 1 1/0", "\x1b[0;31mZeroDivisionError\x1b[0m: division by zero"]
FIELDS = ("type", "source", "outputs", "output_meta", "execution_count", "reply", "reply_meta", "pinned", "skipped",
          "is_test", "author")


@pytest.fixture
def dialog(store):
    """A dialog with every kind of cell and output the kernel capture stores."""
    d = store.create_dialog("Tour of outputs", {"model": "smollm2", "temperature": 0.2})
    add = store.add_message
    add(d["id"], "note", "# Setup\n\nSome *notes*.\n", pinned=True)
    add(d["id"], "code", "x = 6 * 7\nprint(x)\nx", execution_count=1,
        outputs=[{"output_type": "stream", "name": "stdout", "text": "42\n"},
                 {"output_type": "execute_result", "execution_count": 1, "data": {"text/plain": "42"}, "metadata": {}}],
        output_meta={"status": "ok", "duration_s": 0.01})
    add(d["id"], "code", "1/0", execution_count=2, skipped=True,
        outputs=[{"output_type": "error", "ename": "ZeroDivisionError", "evalue": "division by zero",
                  "traceback": ANSI_TB}], output_meta={"status": "error"})
    add(d["id"], "code", "show_image()", execution_count=3, author="model",
        outputs=[{"output_type": "display_data", "data": {"image/png": PNG, "text/plain": "<Figure size 1x1>"},
                  "metadata": {"image/png": {"width": 1}}}])
    add(d["id"], "code", "df", execution_count=4, is_test=True, author="human_edit",
        outputs=[{"output_type": "execute_result", "execution_count": 4, "metadata": {},
                  "data": {"text/html": "<table><tr><td>1</td></tr></table>", "text/plain": "   a\n0  1"}}])
    add(d["id"], "prompt", "Why does 1/0 fail?\n\nExplain briefly.",
        reply="Division by zero is undefined:\n\n```python\n1/0\n```", reply_meta={"status": "done", "tokens": 17})
    add(d["id"], "prompt", "A prompt not answered yet")
    add(d["id"], "code", "%matplotlib inline\n!ls\nimport math", execution_count=None)
    add(d["id"], "code", "def broken(:\n    pass")
    add(d["id"], "code", 's = ("%d"\n     % 3)')
    return d


def cells(store, dialog_id):
    return [{k: m[k] for k in FIELDS} for m in store.messages(dialog_id)]


def notebook_bytes(nb: dict) -> bytes:
    return json.dumps(nb).encode()


# -- export ----------------------------------------------------------------------------------------


def test_export_is_a_valid_nbformat_45_notebook(store, dialog):
    nb = nbformat.reads(export_ipynb(store, dialog["id"]), as_version=4)
    nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) == (4, 5)
    assert nb.metadata.kernelspec.name == "python3" and nb.metadata.language_info.name == "python"
    assert nb.metadata.loopbook.title == "Tour of outputs"
    assert nb.metadata.loopbook.settings == {"model": "smollm2", "temperature": 0.2}
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code", "code", "code", "markdown", "markdown",
                                              "code", "code", "code"]
    assert len({c.id for c in nb.cells}) == len(nb.cells)
    outputs = [o.output_type for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert outputs == ["stream", "execute_result", "error", "display_data", "execute_result"]
    prompt = nb.cells[5]
    assert "Why does 1/0 fail?" in prompt.source and "Division by zero is undefined" in prompt.source
    assert prompt.source.index("Why does") < prompt.source.index("Division by zero")
    assert prompt.metadata.loopbook.type == "prompt" and prompt.metadata.loopbook.reply_meta["tokens"] == 17
    assert nb.cells[2].metadata.loopbook.skipped is True and nb.cells[4].metadata.loopbook.is_test is True


def test_export_repairs_outputs_that_would_not_validate(store):
    d = store.create_dialog("Loose outputs")
    store.add_message(d["id"], "code", "f()", execution_count=7, outputs=[
        {"output_type": "stream", "name": "stdout", "text": ["a\n", "b\n"]},
        {"output_type": "execute_result", "data": {"text/plain": ["1"]}},  # no metadata, no execution_count
        {"output_type": "display_data", "data": {"application/json": {"k": [1, 2]}, "text/plain": 3}},
        {"output_type": "clear_output", "wait": False},
        {"output_type": "update_display_data", "display_id": "x", "data": {}, "metadata": {}},
        {"output_type": "stream", "name": "weird", "text": "c"},
        "not an output",
    ])
    nb = nbformat.reads(export_ipynb(store, d["id"]), as_version=4)
    nbformat.validate(nb)
    outs = nb.cells[0].outputs
    assert [o.output_type for o in outs] == ["stream", "execute_result", "display_data", "stream"]
    assert outs[0].text == "a\nb\n" and outs[1].execution_count == 7 and outs[1].metadata == {}
    assert outs[2].data["application/json"] == {"k": [1, 2]} and outs[2].data["text/plain"] == "3"
    assert outs[3].name == "stdout"


def test_round_trip_keeps_every_cell(store, dialog):
    text = export_ipynb(store, dialog["id"])
    new = import_ipynb(store, text.encode())
    assert new["id"] != dialog["id"] and new["title"] == "Tour of outputs"
    assert new["settings"] == {"model": "smollm2", "temperature": 0.2}
    assert new["n_messages"] == 10 and new["notices"] == []
    assert cells(store, new["id"]) == cells(store, dialog["id"])
    # and the second export is the first one, cell ids aside
    again = json.loads(export_ipynb(store, new["id"]))
    first = json.loads(text)
    for nb in (again, first):
        for c in nb["cells"]:
            c.pop("id")
    assert again == first


def test_prompt_edited_in_jupyter_comes_back_as_a_note(store, dialog):
    nb = json.loads(export_ipynb(store, dialog["id"]))
    # an editor's re-save (CRLF, trailing spaces) is not an edit
    nb["cells"][5]["source"] = "".join(nb["cells"][5]["source"]).replace("\n", "  \r\n") + "\n"
    nb["cells"][6]["source"] = "My own words now"
    new = import_ipynb(store, json.dumps(nb), title="Edited")
    ms = store.messages(new["id"])
    assert (ms[5]["type"], ms[5]["source"]) == ("prompt", "Why does 1/0 fail?\n\nExplain briefly.")
    assert (ms[6]["type"], ms[6]["source"]) == ("note", "My own words now")
    assert any("1 Loopbook prompt cell(s) were edited outside Loopbook" in n for n in new["notices"])


def test_exported_notebook_runs_under_nbconvert(store, tmp_path):
    require_module("nbconvert")
    jupyter = Path(sys.executable).with_name("jupyter")
    if not jupyter.exists():
        jupyter = shutil.which("jupyter")
    d = store.create_dialog("Runs in Jupyter")
    store.add_message(d["id"], "note", "Compute the answer.")
    store.add_message(d["id"], "code", "answer = 6 * 7", execution_count=5)
    store.add_message(d["id"], "prompt", "Print it", reply="Use `print(answer)`.")
    store.add_message(d["id"], "code", "print('answer is', answer)", outputs=[
        {"output_type": "stream", "name": "stdout", "text": "stale\n"}])
    path = tmp_path / "runs.ipynb"
    path.write_text(export_ipynb(store, d["id"]))
    proc = subprocess.run([str(jupyter), "nbconvert", "--to", "notebook", "--execute", "--output", "ran.ipynb",
                           str(path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ran = nbformat.read(tmp_path / "ran.ipynb", as_version=4)
    nbformat.validate(ran)
    assert ran.cells[3].outputs[0].text == "answer is 42\n"


# -- import: flavours ------------------------------------------------------------------------------


def jupyter_notebook():
    return {
        "nbformat": 4, "nbformat_minor": 5,
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
                     "language_info": {"name": "python", "version": "3.12.1"}},
        "cells": [
            {"id": "a1", "cell_type": "markdown", "metadata": {},
             "source": ["# Plain Jupyter\n", "![plot](attachment:p.png)"],
             "attachments": {"p.png": {"image/png": PNG}}},
            {"id": "a2", "cell_type": "code", "metadata": {"tags": ["x"]}, "execution_count": 3,
             "source": ["import sys\n", "print('hi')"],
             "outputs": [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]},
                         {"output_type": "error", "ename": "ValueError", "evalue": "bad",
                          "traceback": ["tb1", "tb2"]}]},
            {"id": "a3", "cell_type": "raw", "metadata": {"format": "text/latex"}, "source": "\\section{Raw}"},
            {"id": "a4", "cell_type": "raw", "metadata": {}, "source": ""},
        ],
    }


def test_plain_jupyter_notebook_imports_with_outputs_and_raw_cells(store):
    new = import_ipynb(store, notebook_bytes(jupyter_notebook()), title="From Jupyter")
    ms = store.messages(new["id"])
    assert new["title"] == "From Jupyter" and [m["type"] for m in ms] == ["note", "code", "note"]
    assert ms[0]["source"] == f"# Plain Jupyter\n![plot](data:image/png;base64,{PNG})"
    assert ms[1]["source"] == "import sys\nprint('hi')" and ms[1]["execution_count"] == 3
    assert ms[1]["outputs"] == [
        {"output_type": "stream", "name": "stdout", "text": "hi\n"},
        {"output_type": "error", "ename": "ValueError", "evalue": "bad", "traceback": ["tb1", "tb2"]}]
    assert "\\section{Raw}" in ms[2]["source"] and "raw cell" in new["notices"][0]


def test_colab_notebook_imports(store):
    nb = {
        "nbformat": 4, "nbformat_minor": 0,
        "metadata": {"colab": {"provenance": [], "name": "Colab demo.ipynb", "gpuType": "T4"},
                     "kernelspec": {"name": "python3", "display_name": "Python 3"},
                     "language_info": {"name": "python"}, "accelerator": "GPU"},
        "cells": [
            {"cell_type": "markdown", "source": ["## Colab\n", "text"], "metadata": {"id": "Xy12Ab"}},
            {"cell_type": "code", "execution_count": 1, "source": ["import pandas as pd\n", "pd.DataFrame({'a': [1]})"],
             "metadata": {"id": "Qw34", "colab": {"base_uri": "https://localhost:8080/", "height": 81},
                          "outputId": "f00-ba7"},
             "outputs": [{"output_type": "execute_result", "execution_count": 1,
                          "data": {"text/plain": ["   a\n", "0  1"],
                                   "text/html": ["<div><table>", "<tr><td>1</td></tr></table></div>"],
                                   "application/vnd.google.colaboratory.intrinsic+json": {"type": "dataframe"}},
                          "metadata": {"tags": []}},
                         {"output_type": "display_data", "data": {"image/png": PNG + "\n", "text/plain": "<Figure>"},
                          "metadata": {"needs_background": "light"}}]},
            {"cell_type": "code", "execution_count": None, "source": "", "metadata": {"id": "empty"}, "outputs": []},
        ],
    }
    new = import_ipynb(store, notebook_bytes(nb))
    ms = store.messages(new["id"])
    assert new["title"] == "Colab demo"
    assert [m["type"] for m in ms] == ["note", "code", "code"]
    result, image = ms[1]["outputs"]
    assert result["data"]["text/plain"] == "   a\n0  1"
    assert result["data"]["text/html"] == "<div><table><tr><td>1</td></tr></table></div>"
    assert result["data"]["application/vnd.google.colaboratory.intrinsic+json"] == {"type": "dataframe"}
    assert result["metadata"] == {"tags": []} and result["execution_count"] == 1
    assert image["data"]["image/png"] == PNG + "\n"  # image data stays as it came
    assert ms[2]["source"] == "" and ms[2]["execution_count"] is None
    nbformat.validate(nbformat.reads(export_ipynb(store, new["id"]), as_version=4))


def test_vscode_notebook_imports(store):
    nb = {
        "nbformat": 4, "nbformat_minor": 2,
        "metadata": {"kernelspec": {"name": "python3", "display_name": ".venv", "language": "python"},
                     "language_info": {"name": "python", "version": "3.11.4", "mimetype": "text/x-python",
                                       "codemirror_mode": {"name": "ipython", "version": 3},
                                       "file_extension": ".py", "nbconvert_exporter": "python",
                                       "pygments_lexer": "ipython3"},
                     "vscode": {"interpreter": {"hash": "ab" * 32}}, "orig_nbformat": 4},
        "cells": [
            {"cell_type": "code", "execution_count": 2, "metadata": {},
             "source": ["for i in range(2):\n", "    print(i)"],
             "outputs": [{"name": "stdout", "output_type": "stream", "text": ["0\n", "1\n"]}]},
            {"cell_type": "markdown", "metadata": {}, "source": ["Done."]},
            {"cell_type": "code", "execution_count": None, "metadata": {}, "source": [], "outputs": []},
        ],
    }
    new = import_ipynb(store, notebook_bytes(nb), title="  VS Code  ")
    ms = store.messages(new["id"])
    assert new["title"] == "VS Code" and new["notices"] == []
    assert [(m["type"], m["source"]) for m in ms] == [
        ("code", "for i in range(2):\n    print(i)"), ("note", "Done."), ("code", "")]
    assert ms[0]["outputs"] == [{"output_type": "stream", "name": "stdout", "text": "0\n1\n"}]


def test_nbformat_3_notebook_is_upgraded(store):
    v3 = {"nbformat": 3, "nbformat_minor": 0, "metadata": {"name": "Old analysis"}, "worksheets": [{"cells": [
        {"cell_type": "heading", "level": 2, "source": ["Results"], "metadata": {}},
        {"cell_type": "code", "language": "python", "input": ["print('hi')\n", "1+1"], "prompt_number": 4,
         "collapsed": False, "metadata": {},
         "outputs": [{"output_type": "stream", "stream": "stdout", "text": ["hi\n"]},
                     {"output_type": "pyout", "prompt_number": 4, "text": ["2"], "metadata": {}},
                     {"output_type": "display_data", "png": PNG, "metadata": {}},
                     {"output_type": "pyerr", "ename": "E", "evalue": "v", "traceback": ["t"]}]},
    ]}]}
    new = import_ipynb(store, notebook_bytes(v3))
    ms = store.messages(new["id"])
    assert new["title"] == "Old analysis" and "upgraded" in new["notices"][0]
    assert [(m["type"], m["source"]) for m in ms] == [("note", "## Results"), ("code", "print('hi')\n1+1")]
    assert ms[1]["execution_count"] == 4
    assert [o["output_type"] for o in ms[1]["outputs"]] == ["stream", "execute_result", "display_data", "error"]
    assert ms[1]["outputs"][1]["data"] == {"text/plain": "2"} and ms[1]["outputs"][2]["data"] == {"image/png": PNG}


# -- import: bad input -----------------------------------------------------------------------------


def assert_refused(store, data, *words, **kwargs):
    before = store.query("SELECT (SELECT count(*) FROM dialogs) AS d, (SELECT count(*) FROM messages) AS m")
    with pytest.raises(InvalidInput) as err:
        import_ipynb(store, data, **kwargs)
    for word in words:
        assert word in str(err.value)
    assert store.query("SELECT (SELECT count(*) FROM dialogs) AS d, (SELECT count(*) FROM messages) AS m") == before
    return str(err.value)


def test_truncated_and_damaged_json_are_refused(store, dialog):
    text = export_ipynb(store, dialog["id"])
    assert_refused(store, text[: len(text) // 2].encode(), "truncated", "nothing was imported")
    damaged = text.replace('"cell_type"', '"cell_type" "x"', 1)
    assert_refused(store, damaged, "not valid JSON", "line ")
    assert_refused(store, b"", "empty")
    assert_refused(store, b"\xff\xfe\x00bad", "not UTF-8")


@pytest.mark.parametrize("data", ['{"name": "package.json", "version": "1.0"}', "[1, 2, 3]", '"text"',
                                  '{"nbformat": "4", "cells": []}', '{"cells": []}'])
def test_json_that_is_not_a_notebook_is_refused(store, data):
    assert_refused(store, data, "not a Jupyter notebook")


def test_other_nbformat_versions_are_refused_with_what_to_do(store):
    assert_refused(store, '{"nbformat": 5, "nbformat_minor": 0, "cells": []}', "newer", "nbformat 4")
    assert_refused(store, '{"nbformat": 3, "nbformat_minor": 0, "worksheets": "oops"}', "nbformat 3",
                   "open and save it in Jupyter to upgrade it")
    assert_refused(store, '{"nbformat": 2, "worksheets": []}', "older", "open and save it in Jupyter")


def test_notebook_over_the_size_limit_is_refused(store, dialog):
    text = export_ipynb(store, dialog["id"])
    assert_refused(store, text.encode(), "import limit", "Clear All Outputs", max_bytes=len(text) - 1)
    assert import_ipynb(store, text, max_bytes=len(text))["n_messages"] == 10
    # the default is 50 MB: the size is checked before anything is parsed
    too_big = b'{"nbformat": 4, "cells": []}' + b" " * (MAX_IMPORT_BYTES - 10)
    assert_refused(store, too_big, "This notebook is 50 MB", "over the 50 MB import limit")


def test_a_damaged_later_cell_leaves_nothing_half_imported(store, dialog):
    nb = jupyter_notebook()
    nb["cells"] = nb["cells"][:2] * 3 + [{"cell_type": "code", "source": 42, "metadata": {}, "outputs": []}]
    message = assert_refused(store, notebook_bytes(nb), "Cell 7", "nothing was imported")
    assert "source" in message
    assert [d["id"] for d in store.list_dialogs()] == [dialog["id"]]
    nb["cells"][-1] = "not a cell"
    assert_refused(store, notebook_bytes(nb), "Cell 7")


# -- .py and .md -----------------------------------------------------------------------------------


def test_export_py_is_percent_format_python(store, dialog):
    text = export_py(store, dialog["id"])
    ast.parse(text)
    assert text.startswith("# ---\n# jupyter:\n")
    assert text.count("\n# %%\n") == 7 and text.count("\n# %% [markdown]\n") == 3
    assert "x = 6 * 7\nprint(x)\nx" in text
    assert "# # Setup\n#\n# Some *notes*." in text
    assert "# > Why does 1/0 fail?" in text and "# Division by zero is undefined:" in text
    assert "# %matplotlib inline\n# !ls\nimport math" in text
    assert "# def broken(:" in text and "\ndef broken(:" not in text
    assert 's = ("%d"\n     % 3)' in text  # valid Python is never touched, even a line that starts with %


def test_export_md_reads_as_markdown(store, dialog):
    text = export_md(store, dialog["id"])
    assert text.startswith("# Tour of outputs\n\n# Setup\n\nSome *notes*.")
    assert "```python\nx = 6 * 7\nprint(x)\nx\n```\n\n```\n42\n```\n\n```\n42\n```" in text
    assert "ZeroDivisionError: division by zero" in text and "\x1b" not in text
    assert f"![image/png output](data:image/png;base64,{PNG})" in text
    assert "```\n   a\n0  1\n```" in text and "<table>" not in text
    assert prompt_markdown("Why does 1/0 fail?\n\nExplain briefly.",
                           "Division by zero is undefined:\n\n```python\n1/0\n```") in text
    assert "> **Prompt**\n>\n> Why does 1/0 fail?\n>\n> Explain briefly.\n\n**Reply**\n\nDivision by zero" in text


def test_export_md_fences_code_that_holds_fences(store):
    d = store.create_dialog("Fences")
    store.add_message(d["id"], "code", 's = """\n```\ninside\n```\n"""')
    text = export_md(store, d["id"])
    assert '````python\ns = """\n```\ninside\n```\n"""\n````' in text


def test_export_dialog_gives_text_media_type_and_file_name(store, dialog):
    store.rename_dialog(dialog["id"], "Tour: outputs / 2024")
    text, media, name = export_dialog(store, dialog["id"], "ipynb")
    assert media == "application/x-ipynb+json" and name == "Tour_outputs_2024.ipynb"
    assert json.loads(text)["metadata"]["loopbook"]["title"] == "Tour: outputs / 2024"
    assert export_dialog(store, dialog["id"], "py")[1:] == ("text/x-python", "Tour_outputs_2024.py")
    with pytest.raises(InvalidInput, match="ipynb, py, md"):
        export_dialog(store, dialog["id"], "pdf")
