import pytest

from dialog.render import ansi_css, ansi_html, markdown_html, strip_ansi


@pytest.mark.parametrize("payload,forbidden", [
    ("<script>alert(1)</script>", "<script"),
    ("<img src=x onerror=alert(1)>", "onerror"),
    ("[x](javascript:alert(1))", 'href="javascript'),
    ("<a href='javascript:alert(1)'>x</a>", "javascript:"),
    ("<iframe src='https://evil.example'></iframe>", "<iframe"),
    ("<a href='data:text/html,<script>alert(1)</script>'>x</a>", "data:text/html"),
    ("<svg onload=alert(1)>", "onload"),
    ("<div style='background:url(javascript:alert(1))'>x</div>", "style="),
])
def test_markdown_is_sanitized(payload, forbidden):
    assert forbidden not in markdown_html(payload).lower()


def test_markdown_renders_real_markup():
    html = markdown_html("# Title\n\n*em* and `code`\n\n```python\nx = 1\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |")
    assert "<h1>Title</h1>" in html and "<em>em</em>" in html and 'class="language-python"' in html
    assert "<table>" in html


def test_data_images_survive_but_not_data_links():
    html = markdown_html("![p](data:image/png;base64,iVBORw0KGgo=)")
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in html


def test_ansi_to_classes_and_escaped():
    html = ansi_html("\x1b[31mred <b>\x1b[0m")
    assert 'class="ansi31"' in html and "&lt;b&gt;" in html and "style=" not in html
    assert ".ansi31" in ansi_css()


def test_strip_ansi():
    assert strip_ansi("\x1b[0;31mZeroDivisionError\x1b[0m: x\x1b]0;title\x07") == "ZeroDivisionError: x"
