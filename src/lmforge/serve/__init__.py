"""`lmforge serve`: an OpenAI-compatible HTTP server over the decode engine, with a web chat page at `/`.

app.py holds the routes; worker.py runs `Engine.step()` on one thread and hands its events to the requests;
served.py turns OpenAI requests into token ids and engine requests; schemas.py validates the bodies; errors.py
writes OpenAI-style error bodies; metrics.py renders Prometheus text; server.py binds the port and runs uvicorn.
"""
