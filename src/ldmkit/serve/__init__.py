"""`ldmkit serve`: a web page and the AUTOMATIC1111 web UI's HTTP API over ldmkit models.

    app.py       the FastAPI app (page, /sdapi/v1, /docs), basic auth, the address checks, run_server
    schema.py    A1111's request fields, checked against the model before queuing (422 naming the field)
    worker.py    one worker thread, a bounded queue (503 + Retry-After when full), progress, interrupt
    generate.py  a checked request → images with their `parameters` chunk, and A1111's response
    models.py    the checkpoints served, their names and hashes, the one loaded
    page.html    the page: one file, no asset from the internet

FastAPI and uvicorn are the optional extra `serve` (pip install 'ldmkit[serve]').
"""

from ldmkit.serve.app import create_app, run_server

__all__ = ["create_app", "run_server"]
