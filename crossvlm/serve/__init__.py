"""The OpenAI-compatible HTTP server behind `crossvlm serve`.

Modules: `schema` (request models and response bodies), `images` (image URLs to images, with the
server's limits), `engine` (one worker thread that batches concurrent requests), `app` (the FastAPI
routes, errors and the chat page in `static/`), `loadtest` (measures a running server).
"""
