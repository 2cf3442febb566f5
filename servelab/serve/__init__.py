"""`servelab serve`: a servelab engine behind an OpenAI-compatible HTTP API.

protocol.py parses and validates a completions request; engines.py holds the step-wise engines; loop.py runs
one of them in its own thread; app.py is the FastAPI app; server.py starts it under uvicorn.
"""
