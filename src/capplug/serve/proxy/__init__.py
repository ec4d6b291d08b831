"""An OpenAI-compatible reranking proxy: best-of-n chat completions, chosen by capplug's selector.

An app that already speaks OpenAI's API gets reranked answers by changing its base URL::

    app = create_proxy_app("https://api.openai.com/v1", scorer=Scorer())
    # or: capplug serve proxy --upstream https://api.openai.com/v1
    client = openai.OpenAI(base_url="http://127.0.0.1:8787/v1")   # the one-line change

Every route, option, header and guarantee is in docs/proxy.md; the ``capplug`` metadata of an
answer is described once, in docs/usage.md ("The capplug metadata").

- ``app``: :func:`create_proxy_app`, its settings, and the routes it installs (chat completions
  reranked, rerank and score answered by the scorer, feedback, everything else passed through);
- ``_chat_routes``: the reranked routes, chat completions (whole or streamed) and Responses;
- ``_scorer_routes``: the rerank and score routes, answered by the scorer alone;
- ``_candidates``: one request's candidates collected from the upstream and chosen among;
- ``_upstream``: the upstream's connections, retried calls, forwarded headers, the
  pass-through, and an upstream's failure as the client sees it;
- ``_requests``: reading what a client asked (the conversation, n, streaming, headers);
- ``_replies``: upstream replies and the answers built from them (texts, usage, stream chunks);
- ``_responses``: the Responses API's requests and answers, read as chat completions;
- ``_metrics``: the Prometheus metrics and the middleware that counts and times requests.
"""

from capplug.serve.proxy.app import KEY_HEADER, create_proxy_app

__all__ = ["KEY_HEADER", "create_proxy_app"]
