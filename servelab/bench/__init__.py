"""`servelab bench`: replay a standard trace against any OpenAI-compatible server and measure it.

client.py sends the requests (an async streaming client) and times every token; results.py turns the timings
into servelab.metrics numbers and a result JSON with `vllm bench serve`'s field names, and plots a rate sweep.
"""
