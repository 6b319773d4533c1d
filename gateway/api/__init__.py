"""The HTTP surface: the OpenAI routes, the admin API, `/health`, `/metrics` and `/dashboard`,
request parsing, uploads, the body limit and the error handlers."""
