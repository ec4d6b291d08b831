"""The ``capplug`` command line: :func:`main`, with one module per command group.

- ``score``: score responses (``capplug score``);
- ``training``: ``capplug train``, ``adapt``, ``fit-selector``;
- ``data``: ``capplug data build | clip | merge``;
- ``models``: ``capplug models list | fetch | path``;
- ``serve``: ``capplug serve local | adapters | proxy`` (``capplug proxy`` is the same command);
- ``adapters``: ``capplug adapters train-lora | train-hypernet | generate | answer``;
- ``store``: ``capplug store list | show | lookup | create | import | rm | gc | verify`` (also
  under ``capplug adapters``, where they were first);
- ``feedback``: ``capplug feedback stats | show | add | export``;
- ``mcp``: ``capplug mcp``, the selection tools over the Model Context Protocol;
- ``_common``: the options and the usage error the groups share.

Importing this package never imports torch; each command imports what it needs when it runs.
"""

from capplug.cli.main import main

__all__ = ["main"]
