"""Schemathesis hooks for tests/test_serve_schema.py (loaded through SCHEMATHESIS_HOOKS).

The one rule of the request body that JSON Schema cannot state: prompts x n must fit the server's
max_batch + max_queue (EXAMPLEGPT_CAPACITY). A valid-looking body past it is answered 400, so such
bodies are left out of generation rather than reported as valid data refused.
"""

import os

import schemathesis

CAPACITY = int(os.environ.get("EXAMPLEGPT_CAPACITY", "0"))


@schemathesis.hook
def filter_body(context, body) -> bool:
    if not isinstance(body, dict) or not isinstance(body.get("prompt"), list) or not body["prompt"]:
        return True
    n = body.get("n", 1)
    prompts = 1 if not isinstance(body["prompt"][0], (str, list)) else len(body["prompt"])
    return not isinstance(n, int) or isinstance(n, bool) or prompts * n <= CAPACITY
