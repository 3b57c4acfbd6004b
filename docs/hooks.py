"""An mkdocs hook (mkdocs.yml: ``hooks``): the docstrings keep Sphinx's inline roles
(``:func:`adam```) and ``::`` before a literal block, which Markdown shows as they are; on the
rendered pages the role prefix and the second colon are dropped."""

import re

ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):(<code>)~?")
LITERAL = re.compile(r"::(</p>)")


def on_page_content(html, page, config, files):
  return LITERAL.sub(r":\1", ROLE.sub(r"\1", html))
