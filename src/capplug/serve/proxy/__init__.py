"""An OpenAI-compatible reranking proxy: best-of-n chat completions, chosen by capplug's selector.

An app that already speaks OpenAI's API gets reranked answers by changing its base URL::

    app = create_proxy_app("https://api.openai.com/v1", scorer=Scorer())
    # or: capplug serve proxy --upstream https://api.openai.com/v1
    client = openai.OpenAI(base_url="http://127.0.0.1:8787/v1")   # the one-line change

Every route, option, header and guarantee is in docs/proxy.md; the ``capplug`` metadata of an
answer is described once, in the README ("Metadata").

- ``app``: :func:`create_proxy_app` and the routes (chat completions reranked, rerank and score
  answered by the scorer, feedback, everything else passed through);
- ``_requests``: reading what a client asked (the conversation, n, streaming, headers);
- ``_replies``: upstream replies and the answers built from them (texts, usage, stream chunks);
- ``_metrics``: the Prometheus metrics and the middleware that counts and times requests.
"""

from capplug.serve.proxy.app import KEY_HEADER, create_proxy_app

__all__ = ["KEY_HEADER", "create_proxy_app"]
